"""Offline batch scoring: files in, outputs out, through the same Runtime, batcher and backends as serving.

Inputs: ``.npy`` (one input), ``.npz`` (arrays named like the inputs), ``.csv`` (one row per sample,
reshaped to the single input's shape; a header row is skipped) or a folder of images (resized to the
input's height and width, RGB or grayscale, raw 0-255 values; the bundle's preprocessing normalises).
Outputs: ``.npy`` (one output), ``.npz`` (every output, plus ``filenames`` for images) or ``.csv``.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.batching import Outputs
from edgekit_runtime.errors import InvalidInputError, NotFoundError
from edgekit_runtime.images import read_image_folder
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.runtime import Runtime
from edgekit_runtime.tensors import TensorSpec

__all__ = ["read_inputs", "score", "write_outputs"]


def _single(model: LoadedModel, what: str) -> TensorSpec:
    if len(model.inputs) != 1:
        msg = f"{what} holds one array but model {model.name!r} has inputs {model.describe_inputs()}; use .npz"
        raise InvalidInputError(msg)
    return model.inputs[0]


def _read_csv(path: Path, spec: TensorSpec) -> np.ndarray:
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        msg = f"{path}: empty CSV"
        raise InvalidInputError(msg)
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        rows = rows[1:]  # a header
    try:
        data = np.asarray([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        msg = f"{path}: not a numeric CSV with the same number of columns in every row ({e})"
        raise InvalidInputError(msg) from None
    tail = list(spec.shape[1:])
    if -1 in tail or int(np.prod(tail)) != data.shape[1]:
        msg = f"{path}: {data.shape[1]} columns do not fit input {spec.name!r} of shape {spec.shape}"
        raise InvalidInputError(msg)
    return data.reshape(-1, *tail)


def read_inputs(path: str | Path, model: LoadedModel) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The model's inputs from a file or an image folder, and the file names (for images)."""
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such input file or folder"
        raise NotFoundError(msg)
    if path.is_dir():
        images, names = read_image_folder(path, _single(model, f"{path} (images)"))
        return {model.inputs[0].name: images}, names
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {_single(model, str(path)).name: np.load(path, allow_pickle=False)}, None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if len(arrays) == 1 and len(model.inputs) == 1:
                return {model.inputs[0].name: next(iter(arrays.values()))}, None
            return arrays, None
    except (ValueError, OSError) as e:
        msg = f"{path}: not a readable numpy file ({e})"
        raise InvalidInputError(msg) from None
    if suffix == ".csv":
        spec = _single(model, str(path))
        return {spec.name: _read_csv(path, spec)}, None
    msg = f"{path}: unsupported input; give a .npy, .npz, .csv file or a folder of images"
    raise InvalidInputError(msg)


def score(
    runtime: Runtime,
    name: str,
    feeds: dict[str, np.ndarray],
    *,
    chunk: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Outputs:
    """Predict every row in chunks of ``chunk`` rows (default: the model's max batch size) via the batcher.

    At most ``max_enqueued_batches`` chunks are in flight, so the queue never refuses a chunk.
    """
    model = runtime.get(name)
    rows = {v.shape[0] if np.ndim(v) else 0 for v in feeds.values()}
    if len(rows) != 1 or 0 in rows:
        msg = f"every input needs the same, non-zero number of rows; got {sorted(rows)}"
        raise InvalidInputError(msg)
    total = rows.pop()
    for spec in model.inputs:  # the whole file's shape in errors, not one chunk's
        if spec.name in feeds:
            spec.check(np.asarray(feeds[spec.name]))
    b = model.settings.batching
    step = chunk or b.max_batch_size
    window = max(1, b.max_enqueued_batches * b.max_batch_size // step if b.enabled else b.max_enqueued_batches)
    pending: deque[Any] = deque()
    parts: list[Outputs] = []

    def collect() -> None:
        fut, n = pending.popleft()
        parts.append(model.finish(fut.result()))
        if progress is not None:
            progress(n)

    for start in range(0, total, step):
        while len(pending) >= window:
            collect()
        pending.append(model.infer_future({k: v[start : start + step] for k, v in feeds.items()}))
    while pending:
        collect()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def write_outputs(path: str | Path, outputs: Outputs, names: list[str] | None = None) -> Path:
    """Write ``.npy`` (one output), ``.npz`` or ``.csv``; the format follows the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    clean = {k: (v.astype(str) if v.dtype == object else v) for k, v in outputs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        if len(clean) != 1:
            msg = f"the model has several outputs ({', '.join(clean)}); write them to a .npz or .csv file"
            raise InvalidInputError(msg)
        np.save(path, next(iter(clean.values())))
    elif suffix == ".npz":
        extra = {"filenames": np.asarray(names)} if names is not None else {}
        np.savez(path, **clean, **extra)  # type: ignore[arg-type]
    elif suffix == ".csv":
        header: list[str] = ["file"] if names is not None else []
        columns = []
        for k, v in clean.items():
            flat = v.reshape(v.shape[0], -1)
            header += [k] if flat.shape[1] == 1 else [f"{k}_{i}" for i in range(flat.shape[1])]
            columns.append(flat)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(columns[0].shape[0]):
                row: list[Any] = [names[i]] if names is not None else []
                for col in columns:
                    row += col[i].tolist()
                w.writerow(row)
    else:
        msg = f"{path}: unsupported output; use .npy, .npz or .csv"
        raise InvalidInputError(msg)
    return path
