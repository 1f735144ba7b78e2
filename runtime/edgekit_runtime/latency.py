"""Host latency measurement of a backend: percentiles and throughput at a batch size.

Used by the converter's validation report and by `edgekit bench`, so both measure the same way:
warm-up runs first (allocation, XNNPACK packing), then timed runs of one batch each.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from edgekit_runtime.backends import Backend


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    rows_per_s: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def sample_inputs(backend: Backend, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's dtypes and shapes (dynamic dims other than batch become 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in backend.signature.inputs:
        shape = [batch_size, *[d if d > 0 else 1 for d in spec.shape[1:]]]
        dtype = spec.np_dtype
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            feeds[spec.name] = rng.integers(max(info.min, -128), min(info.max, 127), size=shape, dtype=dtype)
        elif dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
    return feeds


def measure(
    backend: Backend,
    batch_size: int,
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 2000,
    budget_s: float = 2.0,
    feeds: dict[str, np.ndarray] | None = None,
) -> LatencyStats:
    """Time ``backend.run`` at ``batch_size``: at least ``min_runs`` runs, then until ``budget_s`` is spent."""
    feeds = feeds if feeds is not None else sample_inputs(backend, batch_size)
    for _ in range(warmup):
        backend.run(feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        backend.run(feeds)
        times.append(time.perf_counter() - t0)
    arr = np.array(times) * 1000.0
    return LatencyStats(
        batch_size=batch_size,
        runs=len(times),
        p50_ms=float(np.percentile(arr, 50)),
        p95_ms=float(np.percentile(arr, 95)),
        p99_ms=float(np.percentile(arr, 99)),
        mean_ms=float(arr.mean()),
        rows_per_s=float(batch_size * len(times) / (arr.sum() / 1000.0)),
    )
