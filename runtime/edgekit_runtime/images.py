"""Reading a folder of images into a batch for a model's image input."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit_runtime.errors import InvalidInputError, MissingDependencyError
from edgekit_runtime.tensors import TensorSpec

__all__ = ["IMAGE_SUFFIXES", "read_image_folder"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image_folder(folder: Path, spec: TensorSpec) -> tuple[np.ndarray, list[str]]:
    """The images of ``folder`` (sorted by name) as float32 pixel values 0-255, resized (bilinear) to
    the input's height and width, NHWC or NCHW like the input; and their file names.

    The one image reader of edgekit: offline scoring on the device and calibration/validation in
    the converter read images the same way, so what was validated is what the device computes.
    Scaling to the model's range is the manifest's preprocessing, not the reader's job."""
    try:
        from PIL import Image
    except ImportError as e:
        msg = "scoring a folder of images needs Pillow: pip install 'edgekit-ml-runtime[images]'"
        raise MissingDependencyError(msg) from e
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        raise InvalidInputError(msg)
    shape = spec.shape
    if len(shape) != 4:
        msg = f"input {spec.name!r} has shape {shape}; images need a 4-d input (NHWC or NCHW)"
        raise InvalidInputError(msg)
    channels_last = shape[3] in (1, 3) or shape[1] not in (1, 3)
    h, w, c = (shape[1], shape[2], shape[3]) if channels_last else (shape[2], shape[3], shape[1])
    if h < 1 or w < 1:
        msg = f"input {spec.name!r} has a dynamic image size {shape}; cannot tell what size to resize to"
        raise InvalidInputError(msg)
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                img = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(img, dtype=np.float32)
        except OSError as e:
            msg = f"{p}: not a readable image ({e})"
            raise InvalidInputError(msg) from None
        if a.ndim == 2:
            a = a[:, :, None]
        arrays.append(a if channels_last else a.transpose(2, 0, 1))
    return np.stack(arrays), [p.name for p in files]
