"""The manifest's optional pre/post-processing: ``--normalize`` and ``--labels``.

``--normalize MEAN,STD`` tells the runtime to feed ``(x - mean) / std`` to the model, so clients send
raw values. ``MEAN`` and ``STD`` are each one number (every value) or one number per channel (the
input's last dimension) joined with ``:``, e.g. ``127.5,127.5`` or
``0.485:0.456:0.406,0.229:0.224:0.225``.

Data semantics: ``--calibration`` / ``--validation`` data are **raw** (what clients will send); the
converter normalises them the same way before they reach the source or the converted model, so
calibration ranges, validation metrics and the golden samples are all in the model's input space.
Golden inputs are stored normalised, because the device's smoke test feeds them straight to the
engine (``edgekit_runtime.model.check_golden``), not through the preprocessing. Synthetic data is
random in the model's input space and is not normalised.

``--labels FILE`` (one label per line) adds top-k with labels over one output; the label count must
equal the output's last dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import InvalidInputError, NotFoundError
from edgekit_converters.calibration import Dataset
from edgekit_runtime.bundle import Postprocessing, Preprocessing
from edgekit_runtime.tensors import TensorSpec

DEFAULT_TOP_K = 5
NORMALIZE_SYNTAX = "MEAN,STD where each is a number or per-channel numbers joined by ':' (e.g. 0.485:0.456:0.406)"


@dataclass(frozen=True)
class Normalization:
    """A parsed ``--normalize``: mean and std, each of length 1 (scalar) or one per channel."""

    mean: list[float]
    std: list[float]

    @property
    def channels(self) -> int:
        return max(len(self.mean), len(self.std))


def _numbers(text: str, what: str, raw: str) -> list[float]:
    parts = text.split(":")
    values: list[float] = []
    for part in parts:
        try:
            value = float(part.strip())
        except ValueError:
            msg = f"--normalize {raw!r}: {what} {part.strip()!r} is not a number; expected {NORMALIZE_SYNTAX}"
            raise InvalidInputError(msg) from None
        if not math.isfinite(value):
            msg = f"--normalize {raw!r}: {what} {part.strip()!r} is not a finite number"
            raise InvalidInputError(msg)
        values.append(value)
    return values


def parse_normalize(text: str) -> Normalization:
    """``"127.5,127.5"`` or ``"0.485:0.456:0.406,0.229:0.224:0.225"``; InvalidInputError says what is wrong."""
    pieces = text.split(",")
    if len(pieces) != 2 or not all(p.strip() for p in pieces):
        msg = f"--normalize {text!r}: expected {NORMALIZE_SYNTAX}"
        raise InvalidInputError(msg)
    mean = _numbers(pieces[0], "mean", text)
    std = _numbers(pieces[1], "std", text)
    if any(s <= 0 for s in std):
        msg = f"--normalize {text!r}: std must be positive (the runtime divides by it); got {pieces[1].strip()}"
        raise InvalidInputError(msg)
    if len(mean) > 1 and len(std) > 1 and len(mean) != len(std):
        msg = (
            f"--normalize {text!r}: mean has {len(mean)} channels but std has {len(std)}; "
            "give both per channel with the same count, or one of them as a single number"
        )
        raise InvalidInputError(msg)
    return Normalization(mean, std)


def read_labels(path: Path) -> list[str]:
    """One label per line (UTF-8); trailing empty lines are ignored, empty lines in between are an error."""
    path = Path(path)
    if not path.exists():
        msg = f"labels file {path}: no such file"
        raise NotFoundError(msg)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except IsADirectoryError:
        msg = f"labels file {path}: is a folder; pass a text file with one label per line"
        raise InvalidInputError(msg) from None
    except UnicodeDecodeError as e:
        msg = f"labels file {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8, one label per line"
        raise InvalidInputError(msg) from None
    except OSError as e:
        msg = f"labels file {path}: cannot read it: {e.strerror or e}"
        raise InvalidInputError(msg) from e
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        msg = f"labels file {path}: holds no labels; write one label per line"
        raise InvalidInputError(msg)
    empty = [i + 1 for i, label in enumerate(labels) if not label]
    if empty:
        msg = f"labels file {path}: line {empty[0]} is empty; write one label per line, no blank lines between them"
        raise InvalidInputError(msg)
    return labels


def _pick(names: list[str], wanted: str | None, kind: str, option: str) -> str:
    if wanted is not None:
        if wanted not in names:
            msg = f"{option} {wanted!r}: the model has no {kind} of that name; its {kind}s are {', '.join(names)}"
            raise InvalidInputError(msg)
        return wanted
    if len(names) != 1:
        msg = f"the model has {len(names)} {kind}s ({', '.join(names)}); choose one with {option} NAME"
        raise InvalidInputError(msg)
    return names[0]


def preprocessing(norm: Normalization, inputs: list[TensorSpec], input_name: str | None) -> Preprocessing:
    """Check ``norm`` against the chosen input: a float input whose last dimension has as many channels."""
    name = _pick([s.name for s in inputs], input_name, "input", "--normalize-input")
    spec = next(s for s in inputs if s.name == name)
    if not np.issubdtype(spec.np_dtype, np.floating):
        msg = f"--normalize: input {name!r} is {spec.dtype}; normalised values need a float input"
        raise InvalidInputError(msg)
    if norm.channels > 1:
        last = spec.shape[-1] if len(spec.shape) >= 2 else None
        if last is None:
            msg = f"--normalize: input {name!r} has shape {spec.shape}; per-channel values need a channel dimension"
            raise InvalidInputError(msg)
        if last > 0 and last != norm.channels:
            msg = (
                f"--normalize: {norm.channels} per-channel values, but input {name!r} has shape {spec.shape} "
                f"({last} channels in its last dimension); give {last} values or a single number"
            )
            raise InvalidInputError(msg)
    return Preprocessing(input=name, mean=norm.mean, std=norm.std)


def postprocessing(
    labels: list[str], top_k: int | None, outputs: dict[str, np.ndarray], output_name: str | None, source: Path
) -> Postprocessing:
    """Check the labels against the chosen output's last dimension (from the source's outputs on real data)."""
    name = _pick(sorted(outputs), output_name, "output", "--labels-output")
    shape = list(outputs[name].shape)
    classes = shape[-1] if len(shape) >= 2 else 1
    per_sample = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if len(labels) != classes:
        msg = (
            f"--labels {source}: {len(labels)} labels, but output {name!r} has {classes} values in its last "
            f"dimension (shape {['N', *shape[1:]]}); the labels file needs one line per class"
        )
        raise InvalidInputError(msg)
    if per_sample != classes:
        msg = (
            f"--labels: output {name!r} has shape {['N', *shape[1:]]}; top-k with labels needs one score per "
            f"class per sample ([N, classes]), but it has {per_sample} values per sample"
        )
        raise InvalidInputError(msg)
    k = DEFAULT_TOP_K if top_k is None else top_k
    if top_k is None:
        k = min(k, len(labels))
    elif k > len(labels):
        msg = f"--top-k {k} is more than the {len(labels)} labels in {source}; choose at most {len(labels)}"
        raise InvalidInputError(msg)
    return Postprocessing(output=name, top_k=k, labels=labels)


def normalize(data: Dataset, pre: Preprocessing) -> Dataset:
    """``data`` with ``(x - mean) / std`` applied to the preprocessed input, exactly as the runtime does
    (float32). Synthetic data is already in the model's input space and is returned unchanged."""
    if data.synthetic or pre.input not in data.inputs:
        return data
    value = data.inputs[pre.input]
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    channels = max(mean.size, std.size)
    if channels > 1 and (value.ndim < 2 or value.shape[-1] != channels):
        msg = (
            f"--normalize: {channels} per-channel values, but {data.origin} has input {pre.input!r} "
            f"of shape {list(value.shape)}; give {value.shape[-1]} values or a single number"
        )
        raise InvalidInputError(msg)
    normalised = ((value.astype(np.float32) - mean) / std).astype(value.dtype, copy=False)
    return Dataset({**data.inputs, pre.input: normalised}, data.origin, data.synthetic, data.labels)
