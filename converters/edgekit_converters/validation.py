"""Run the converted model on the device's runtime backend and compare it with the source model.

The backend is ``edgekit_runtime.backends.load_backend`` with the profile's runtime settings:
exactly the code the device runs. Integer I/O is quantized on the way in by the backend (its
``prepare`` uses the input's scale and zero point) and dequantized here on the way out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import ConversionError
from edgekit.profiles import Profile
from edgekit_converters.calibration import Dataset
from edgekit_runtime.backends import Backend, load_backend
from edgekit_runtime.latency import measure
from edgekit_runtime.livestats import output_summary
from edgekit_runtime.tensors import Signature, dequantize

GOLDEN_COUNT = 8


@dataclass
class Validation:
    """Metrics of one converted model against its source, plus what the bundle needs from the run."""

    metrics: dict[str, Any]
    signature: Signature
    golden_inputs: dict[str, np.ndarray]
    golden_outputs: dict[str, np.ndarray]
    golden_atol: float
    notes: list[str] = field(default_factory=list)


def _flat(outputs: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    rows = outputs[names[0]].shape[0]
    return np.concatenate([outputs[n].reshape(rows, -1).astype(np.float64) for n in names], axis=1)


def compare(reference: dict[str, np.ndarray], converted: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Max abs error, mean per-sample cosine similarity and SQNR (dB) over all outputs, and top-1
    agreement on the first output when it looks like class scores."""
    names = sorted(reference)
    ref = _flat(reference, names)
    got = _flat(converted, names)
    err = ref - got
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(norms > 0, np.sum(ref * got, axis=1) / np.where(norms > 0, norms, 1), 1.0)
    noise = float(np.sum(err**2))
    signal = float(np.sum(ref**2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    first = reference[names[0]]
    top1 = None
    if first.ndim == 2 and first.shape[1] > 1:
        top1 = float(np.mean(np.argmax(first, axis=1) == np.argmax(converted[names[0]], axis=1)))
    return {
        "max_abs_error": float(np.max(np.abs(err))) if err.size else 0.0,
        "cosine_similarity": float(np.mean(cos)),
        "sqnr_db": min(sqnr, 999.0),
        "top1_agreement": top1,
    }


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float | None:
    """Top-1 accuracy (%) of the first output against integer labels; None when it is not a classifier."""
    first = outputs[sorted(outputs)[0]]
    if first.ndim != 2 or first.shape[1] < 2 or not np.issubdtype(labels.dtype, np.integer):
        return None
    return float(np.mean(np.argmax(first, axis=1) == labels.reshape(-1)) * 100.0)


def run_float(
    backend: Backend, feeds: dict[str, np.ndarray], raw: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Run a batch (or take its ``raw`` outputs) and dequantize integer outputs with their scale and
    zero point."""
    raw = backend.run(feeds) if raw is None else raw
    specs = {s.name: s for s in backend.signature.outputs}
    return {k: np.asarray(dequantize(v, specs[k]), dtype=np.float32) for k, v in raw.items()}


def _tile(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    have = next(iter(feeds.values())).shape[0]
    reps = -(-rows // have)
    return {k: np.concatenate([v] * reps)[:rows] for k, v in feeds.items()}


def validate(
    fmt: str,
    model: bytes,
    profile: Profile,
    reference: dict[str, np.ndarray],
    data: Dataset,
    *,
    latency_seconds: float = 1.0,
) -> Validation:
    """Metrics of ``model`` on ``data`` against the source's ``reference`` outputs, latency and golden samples."""
    backend = load_backend(fmt, model, profile.runtime)
    try:
        raw = backend.run(data.inputs)
        converted = run_float(backend, data.inputs, raw)
        missing = sorted(set(reference) - set(converted))
        if missing:
            msg = f"the converted model's outputs {sorted(converted)} do not match the source's {sorted(reference)}"
            raise ConversionError(msg)
        metrics: dict[str, Any] = {
            "samples": data.rows,
            "data": data.origin,
            "trustworthy": not data.synthetic,
            **compare(reference, converted),
        }
        # what the device will report of its live outputs (raw, as it serves them): the hub's drift
        # check compares the two (docs/telemetry.md)
        summary = output_summary(raw, backend.signature.outputs[0].name if backend.signature.outputs else "")
        if summary is not None:
            metrics["outputs"] = summary
        if data.labels is not None:
            before = accuracy(reference, data.labels)
            after = accuracy(converted, data.labels)
            if before is not None and after is not None:
                metrics |= {
                    "accuracy_source": before,
                    "accuracy_converted": after,
                    "accuracy_drop_points": before - after,
                }
        max_batch = profile.runtime.batching.max_batch_size
        for bs in sorted({1, max_batch}):
            feeds = _tile(data.inputs, bs)
            stats = measure(backend, bs, warmup=2, min_runs=5 if bs > 1 else 10, budget_s=latency_seconds, feeds=feeds)
            metrics[f"latency_p50_ms_b{bs}"] = stats.p50_ms
            metrics[f"latency_p95_ms_b{bs}"] = stats.p95_ms
            metrics[f"rows_per_s_b{bs}"] = stats.rows_per_s
        golden_in = {k: v[:GOLDEN_COUNT] for k, v in data.inputs.items()}
        golden_raw = backend.run(golden_in)
        atol = _golden_atol(golden_raw, backend.signature)
        return Validation(metrics, backend.signature, golden_in, golden_raw, atol, list(backend.notes))
    finally:
        backend.close()


def _golden_atol(outputs: dict[str, np.ndarray], signature: Signature) -> float:
    """Tolerance for the device's smoke test: a couple of quantization steps for integer outputs,
    1 % of the output range for float ones (other CPUs and delegates round differently)."""
    atol = 1e-4
    for spec in signature.outputs:
        value = outputs[spec.name]
        if np.issubdtype(value.dtype, np.integer):
            atol = max(atol, 2.0)
        elif value.size:
            atol = max(atol, 0.01 * float(np.max(np.abs(value.astype(np.float64)))))
    return atol
