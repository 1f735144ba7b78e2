"""Calibration and validation data: read ``.npy`` / ``.npz`` / image folders, check them, split them.

Every array is checked against the model's inputs before any conversion starts; a mismatch names
the input, the expected shape (``-1`` = any size) and what was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import InvalidInputError, NotFoundError
from edgekit_runtime.bundle import Preprocessing
from edgekit_runtime.images import read_image_folder
from edgekit_runtime.tensors import TensorSpec

IMAGE_RANGES: dict[str, tuple[float, float]] = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0), "0,255": (0.0, 255.0)}
LABELS_KEY = "labels"
SYNTHETIC_NOTE = "synthetic random data: accuracy numbers are NOT trustworthy; pass --calibration / --validation"


@dataclass(frozen=True)
class Dataset:
    """Named input arrays with the same number of rows, where they came from, optional labels."""

    inputs: dict[str, np.ndarray]
    origin: str
    synthetic: bool = False
    labels: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, index: np.ndarray, origin: str | None = None) -> Dataset:
        labels = self.labels[index] if self.labels is not None else None
        return Dataset({k: v[index] for k, v in self.inputs.items()}, origin or self.origin, self.synthetic, labels)

    def head(self, n: int) -> Dataset:
        return self.take(np.arange(min(n, self.rows)))


def _expected(spec: TensorSpec) -> str:
    return str(spec.shape)


def check_arrays(arrays: dict[str, np.ndarray], inputs: list[TensorSpec], what: str) -> dict[str, np.ndarray]:
    """Shapes and dtypes against the model's inputs; returns arrays cast to the input dtypes."""
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "nothing"
        msg = (
            f"{what} has no array for input(s) {', '.join(map(repr, missing))} (it has: {have}); "
            f"the model's inputs are {', '.join(s.describe() for s in inputs)}"
        )
        raise InvalidInputError(msg)
    out: dict[str, np.ndarray] = {}
    rows: int | None = None
    for spec in inputs:
        value = np.asarray(arrays[spec.name])
        got = list(value.shape)
        if len(got) != len(spec.shape) or any(e not in (-1, g) for e, g in zip(spec.shape[1:], got[1:], strict=False)):
            msg = (
                f"{what}: input {spec.name!r} has shape {got}; expected {_expected(spec)} "
                f"(first dimension = samples, -1 = any size)"
            )
            raise InvalidInputError(msg)
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            msg = (
                f"{what}: input {spec.name!r} has dtype {value.dtype}; "
                f"expected numbers ({spec.dtype}), shape {spec.shape}"
            )
            raise InvalidInputError(msg)
        if np.issubdtype(spec.np_dtype, np.integer) and np.issubdtype(value.dtype, np.floating):
            msg = f"{what}: input {spec.name!r} has dtype {value.dtype}; the model expects {spec.dtype}"
            raise InvalidInputError(msg)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value))[0]
            msg = (
                f"{what}: input {spec.name!r} holds NaN or infinite values (first at index {bad.tolist()}); "
                "remove or replace them (TensorFlow's int8 calibrator crashes on them, and they are no one's input)"
            )
            raise InvalidInputError(msg)
        if rows is not None and got[0] != rows:
            msg = f"{what}: inputs have different numbers of samples ({spec.name!r} has {got[0]}, others {rows})"
            raise InvalidInputError(msg)
        rows = got[0]
        out[spec.name] = value.astype(spec.np_dtype, copy=False)
    if not rows:
        msg = f"{what} holds no samples"
        raise InvalidInputError(msg)
    return out


def _read_images(folder: Path, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Raw pixel values 0-255 read exactly as the device's `score` reads them; scaling them to the
    model's range is the bundle's preprocessing (see ``image_preprocessing``)."""
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        msg = f"an image folder needs a model with one image input [N, H, W, C]; this model has {inputs}"
        raise InvalidInputError(msg)
    images, _ = read_image_folder(folder, inputs[0])
    return {inputs[0].name: images}


def image_preprocessing(image_range: str, spec: TensorSpec) -> Preprocessing:
    """The normalisation that maps pixel values 0-255 to ``image_range``: x' = (x - mean) / std."""
    lo, hi = IMAGE_RANGES[image_range]
    std = 255.0 / (hi - lo)
    return Preprocessing(input=spec.name, mean=[-lo * std], std=[std])


def read_dataset(path: Path, inputs: list[TensorSpec], *, what: str) -> Dataset:
    """A ``.npy`` (one input), ``.npz`` (arrays named like the inputs, optional ``labels``) or image folder."""
    path = Path(path)
    if not path.exists():
        msg = f"{what} {path}: no such file or folder"
        raise NotFoundError(msg)
    labels: np.ndarray | None = None
    if path.is_dir():
        arrays = _read_images(path, inputs)
    elif path.suffix.lower() == ".npy":
        if len(inputs) != 1:
            names = ", ".join(s.name for s in inputs)
            msg = (
                f"{what} {path}: a .npy file holds one array, but the model has inputs {names}; "
                "use an .npz with those names"
            )
            raise InvalidInputError(msg)
        arrays = {inputs[0].name: _load(path)}
    elif path.suffix.lower() == ".npz":
        arrays = _load_npz(path)
        if LABELS_KEY in arrays:
            labels = arrays.pop(LABELS_KEY)
        if len(inputs) == 1 and inputs[0].name not in arrays and len(arrays) == 1:
            arrays = {inputs[0].name: next(iter(arrays.values()))}  # one unnamed array for the one input
    else:
        msg = f"{what} {path}: expected a .npy file, an .npz file or a folder of images"
        raise InvalidInputError(msg)
    checked = check_arrays(arrays, inputs, f"{what} {path}")
    rows = next(iter(checked.values())).shape[0]
    if labels is not None and labels.shape[0] != rows:
        msg = f"{what} {path}: 'labels' has {labels.shape[0]} rows but the inputs have {rows}"
        raise InvalidInputError(msg)
    return Dataset(checked, str(path), labels=labels)


def _load(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as e:
        msg = f"{path}: not a readable .npy array ({e})"
        raise InvalidInputError(msg) from e


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        msg = f"{path}: not a readable .npz archive ({e})"
        raise InvalidInputError(msg) from e


def synthetic(inputs: list[TensorSpec], rows: int, seed: int = 0) -> Dataset:
    """Uniform random data in [0, 1) (integers in a small range) shaped like the inputs; flagged synthetic."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [rows, *[d if d > 0 else 1 for d in spec.shape[1:]]]
        if np.issubdtype(spec.np_dtype, np.integer):
            arrays[spec.name] = rng.integers(0, 10, size=shape).astype(spec.np_dtype)
        else:
            arrays[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.np_dtype)
    return Dataset(arrays, "synthetic", synthetic=True)


@dataclass(frozen=True)
class DataPlan:
    """What calibrates and what validates, decided once for a run."""

    calibration: Dataset | None
    validation: Dataset
    notes: list[str]


def plan(
    inputs: list[TensorSpec],
    *,
    calibration: Path | None,
    validation: Path | None,
    synthetic_calibration: bool,
    needs_calibration: bool,
    calibration_samples: int,
    validation_samples: int = 1000,
    needing: str = "",
) -> DataPlan:
    """Read the data files and decide the split: --validation, else a held-out 20 % of the calibration
    data, else synthetic (flagged). A mode that needs calibration and gets none is an error."""
    notes: list[str] = []
    calib = read_dataset(calibration, inputs, what="calibration data") if calibration else None
    valid = read_dataset(validation, inputs, what="validation data") if validation else None
    if calib is None and needs_calibration and not synthetic_calibration:
        msg = (
            f"{needing or 'this profile'} needs calibration data: pass --calibration FILE "
            "(.npy, .npz or a folder of images), or --synthetic-calibration (accuracy then untrustworthy)"
        )
        raise InvalidInputError(msg)
    if valid is None and calib is not None and calib.rows >= 10:
        order = np.random.default_rng(0).permutation(calib.rows)
        cut = max(1, calib.rows // 5)
        valid = calib.take(order[:cut], f"held-out 20% of {calib.origin}")
        calib = calib.take(order[cut:])
        notes.append(f"no --validation: validating on {cut} held-out calibration samples (not used to calibrate)")
    elif valid is None and calib is not None:
        valid = calib
        notes.append("no --validation and too few calibration samples to hold some out: validating on calibration data")
    if calib is None and synthetic_calibration:
        calib = synthetic(inputs, calibration_samples, seed=1)
        notes.append("calibration: " + SYNTHETIC_NOTE)
    if valid is None:
        valid = synthetic(inputs, 32, seed=2)
        notes.append("validation: " + SYNTHETIC_NOTE)
    return DataPlan(calib, valid.head(validation_samples), notes)


def batches(data: Dataset, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` single-sample feeds (batch of 1), the form both calibrators take."""
    n = min(limit, data.rows)
    return [{k: v[i : i + 1] for k, v in data.inputs.items()} for i in range(n)]
