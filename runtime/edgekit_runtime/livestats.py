"""What each model version did since the last telemetry interval: requests, errors by kind, latency
percentiles, rows, batch sizes and a compact summary of its outputs (the device agent's telemetry,
``agent/telemetry.py``; ``/metrics`` stays the cumulative local view of the same counts).

The request path only adds to a version's ``Window`` under its lock (a few microseconds per
request); ``take()`` hands over what the window holds and starts it afresh, so two intervals never
share a request. Latencies and numeric output values are kept as a uniform reservoir sample
(Vitter's algorithm R) of ``RESERVOIR`` values, so the percentiles of a busy interval cost bounded
memory; the counts are exact.

The output summary, per request:
- **classes**: when the model declares top-k post-processing (``top_k_indices``), or its first
  output looks like class probabilities (floating point, at least 2 dimensions, a last dimension
  over 1, values in [0, 1], rows summing to 1 within 1e-3), each row's top class is counted;
- **numeric** otherwise: per output, count, mean, std, min, max and quantiles of its values.
A version whose every request in the interval was classes reports the class histogram; one with
any numeric request reports the numeric summary (of the requests that were numeric).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "RESERVOIR",
    "Predictions",
    "Window",
    "error_kind",
    "looks_like_scores",
    "output_summary",
    "top_classes",
]

#: Values kept per interval for latency percentiles and per output for its quantiles.
RESERVOIR = 2048
_OUTPUT_RESERVOIR = 512
_PROB_TOL = 1e-3
#: The post-processing output of the top classes (model.py declares it; here so both can import it).
TOP_K_INDICES = "top_k_indices"
#: Output quantiles reported for numeric outputs.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

_KINDS = {400: "invalid_input", 404: "not_found", 413: "too_large", 503: "unavailable", 504: "timeout"}


def error_kind(status: int) -> str:
    """The telemetry name of a failed request's HTTP status."""
    if status in _KINDS:
        return _KINDS[status]
    return "internal" if status >= 500 else "client"


def looks_like_scores(a: np.ndarray) -> bool:
    """Class probabilities: float, >= 2 dims, last dim > 1, values in [0, 1], rows summing to 1.

    On the request path for every answer (the telemetry window and the shadow check), so it makes
    one float64 copy and three reductions: NaN makes min and max NaN and +-Infinity puts them out
    of range, so both fail the range test without a separate finiteness pass."""
    if a.dtype.kind != "f" or a.ndim < 2 or a.shape[-1] < 2 or a.size == 0:
        return False
    x = a.astype(np.float64)
    if not (x.min() >= -_PROB_TOL and x.max() <= 1 + _PROB_TOL):
        return False
    off = x.sum(axis=-1)
    off -= 1.0
    return bool(np.abs(off, out=off).max() <= _PROB_TOL)


def top_classes(outputs: Mapping[str, Any], first: str) -> np.ndarray | None:
    """Each row's top class (flattened), or None when the answer is not class scores."""
    top = outputs.get(TOP_K_INDICES)
    if top is not None:
        a = np.asarray(top)
        return a[..., 0].reshape(-1) if a.ndim >= 1 and a.size else None
    value = outputs.get(first)
    if value is None:
        return None
    a = np.asarray(value)
    if not looks_like_scores(a):
        return None
    return np.asarray(a.argmax(axis=-1)).reshape(-1)


class _Reservoir:
    """A uniform sample of at most ``size`` values out of ``seen``."""

    __slots__ = ("seen", "size", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(x)
            return
        j = random.randrange(self.seen)  # noqa: S311 - sampling, not crypto
        if j < self.size:
            self.values[j] = x

    def add_many(self, xs: np.ndarray) -> None:
        room = self.size - len(self.values)
        if room > 0:
            head = xs[:room]
            self.values.extend(head.tolist())
            self.seen += len(head)
            xs = xs[room:]
        if not len(xs):
            return
        # algorithm R for the rest, vectorised: value i (seen+i+1-th) replaces slot j < size
        seen = self.seen + np.arange(1, len(xs) + 1)
        slots = (np.random.random(len(xs)) * seen).astype(np.int64)
        for j, v in zip(slots[slots < self.size], xs[slots < self.size], strict=True):
            self.values[int(j)] = float(v)
        self.seen += len(xs)


class _Numeric:
    __slots__ = ("count", "max", "min", "sample", "sum", "sumsq")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.sample = _Reservoir(_OUTPUT_RESERVOIR)

    def add(self, a: np.ndarray) -> None:
        x = np.asarray(a, dtype=np.float64).reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            x = x[finite]
        if not x.size:
            return
        self.count += int(x.size)
        self.sum += float(x.sum())
        self.sumsq += float(np.dot(x, x))
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.sample.add_many(x if x.size <= 4 * _OUTPUT_RESERVOIR else x[:: max(1, x.size // (4 * _OUTPUT_RESERVOIR))])

    def summary(self) -> dict[str, Any]:
        mean = self.sum / self.count
        var = max(0.0, self.sumsq / self.count - mean * mean)
        qs = np.quantile(np.asarray(self.sample.values), QUANTILES) if self.sample.values else []
        return {
            "count": self.count,
            "mean": mean,
            "std": math.sqrt(var),
            "min": self.min,
            "max": self.max,
            "quantiles": {f"p{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        }


class Window:
    """One model version's figures since the last ``take()``; thread-safe."""

    def __init__(self, model: str, version: int, *, first_output: str = "", clock: Any = time.time) -> None:
        self.model = model
        self.version = version
        self.first_output = first_output
        self._clock = clock
        self._lock = threading.Lock()
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.start = now
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.latencies = _Reservoir(RESERVOIR)
        self.engine_times = _Reservoir(RESERVOIR)
        self.rows = 0
        self.batches: dict[int, int] = {}
        self.class_requests = 0
        self.classes: dict[int, int] = {}
        self.numeric_requests = 0
        self.numeric: dict[str, _Numeric] = {}
        self.feedback_rows = 0
        self.feedback_correct = 0
        self.feedback_abs_err = 0.0
        self.feedback_kind = ""

    # -- the request path -----------------------------------------------------------------------

    def request(self, status: int | None) -> None:
        """One request ended: ``status`` None when it succeeded, else its HTTP status."""
        with self._lock:
            self.requests += 1
            if status is not None:
                kind = error_kind(status)
                self.errors[kind] = self.errors.get(kind, 0) + 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies.add(seconds)

    def engine(self, seconds: float) -> None:
        """The engine's time for one batch (the batcher's worker), apart from queueing and HTTP."""
        with self._lock:
            self.engine_times.add(seconds)

    def batch(self, rows: int) -> None:
        with self._lock:
            self.rows += rows
            self.batches[rows] = self.batches.get(rows, 0) + 1

    def outputs(self, outputs: Mapping[str, Any]) -> None:
        """Summarise one answered request's outputs (never raises: a summary must not cost a reply)."""
        try:
            tops = top_classes(outputs, self.first_output or next(iter(outputs), ""))
            if tops is not None:
                counts = np.bincount(tops.astype(np.int64)) if tops.size and tops.min() >= 0 else None
                with self._lock:
                    self.class_requests += 1
                    if counts is not None:
                        for cls in np.flatnonzero(counts):
                            self.classes[int(cls)] = self.classes.get(int(cls), 0) + int(counts[cls])
                return
            numeric = {k: np.asarray(v) for k, v in outputs.items()}
            with self._lock:
                self.numeric_requests += 1
                for name, a in numeric.items():
                    if a.dtype.kind in "fiub":
                        self.numeric.setdefault(name, _Numeric()).add(a)
        except (TypeError, ValueError):  # an output numpy cannot summarise (strings): not summarised
            return

    def feedback(self, rows: int, *, correct: int | None = None, abs_err: float | None = None) -> None:
        """Ground truth for ``rows`` earlier answers: how many had the right class, or their summed
        absolute error (regressions)."""
        with self._lock:
            self.feedback_rows += rows
            if correct is not None:
                self.feedback_correct += correct
                self.feedback_kind = self.feedback_kind or "classes"
            if abs_err is not None:
                self.feedback_abs_err += abs_err
                self.feedback_kind = self.feedback_kind or "values"

    # -- the telemetry side ---------------------------------------------------------------------

    def take(self, now: float | None = None) -> dict[str, Any]:
        """What happened since the last take, as the telemetry message's model fields; starts afresh."""
        now = self._clock() if now is None else now
        with self._lock:
            start, requests, errors = self.start, self.requests, self.errors
            lat, rows, batches = self.latencies.values, self.rows, self.batches
            engine = self.engine_times.values
            class_requests, classes = self.class_requests, self.classes
            numeric_requests, numeric = self.numeric_requests, self.numeric
            fb = (self.feedback_kind, self.feedback_rows, self.feedback_correct, self.feedback_abs_err)
            self._reset(now)
        span = max(now - start, 1e-9)
        p50 = p95 = p99 = None
        if lat:
            ms = np.quantile(np.asarray(lat) * 1000.0, (0.5, 0.95, 0.99))
            p50, p95, p99 = (round(float(v), 4) for v in ms)
        e50 = e95 = None
        if engine:
            e50, e95 = (round(float(v), 4) for v in np.quantile(np.asarray(engine) * 1000.0, (0.5, 0.95)))
        out: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "interval_start": start,
            "interval_end": now,
            "requests": requests,
            "errors": sum(errors.values()),
            "errors_by_kind": errors,
            "rejected": errors.get("unavailable", 0),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "rows": rows,
            "rows_per_s": round(rows / span, 3),
            "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
            "engine_p50_ms": e50,
            "engine_p95_ms": e95,
        }
        if numeric_requests:
            out["outputs"] = {
                "kind": "numeric",
                "requests": numeric_requests,
                "outputs": {k: v.summary() for k, v in sorted(numeric.items()) if v.count},
            }
        elif class_requests:
            out["outputs"] = {
                "kind": "classes",
                "requests": class_requests,
                "classes": {str(k): v for k, v in sorted(classes.items())},
            }
        kind, fb_rows, fb_correct, fb_err = fb
        if fb_rows:
            if kind == "classes":
                out["feedback"] = {"rows": fb_rows, "correct": fb_correct, "accuracy": fb_correct / fb_rows}
            else:
                out["feedback"] = {"rows": fb_rows, "mae": fb_err / fb_rows}
        return out


def output_summary(outputs: Mapping[str, Any], first: str, *, chunk: int = 256) -> dict[str, Any] | None:
    """The telemetry ``outputs`` summary of a whole set of answers (rows along the first axis), as
    the device would report them if it had answered them in chunks of ``chunk`` rows: the converter
    records it for the validation data, the reference the hub's drift check compares with."""
    w = Window("", 1, first_output=first)
    rows = min((np.asarray(v).shape[0] for v in outputs.values() if np.ndim(v)), default=0)
    for i in range(0, rows, chunk):
        w.outputs({k: np.asarray(v)[i : i + chunk] for k, v in outputs.items()})
    summary: dict[str, Any] | None = w.take(0.0).get("outputs")
    return summary


#: Answers remembered per model for ground-truth feedback, newest kept.
REMEMBERED = 10_000
_MAX_ID = 256


class Predictions:
    """What a model answered to requests that carried an id (the v2 ``id``), so that a client can
    later post the true label or value for it (``POST /v2/models/NAME/feedback``): per id, the
    version and each row's top class (classifiers) or first-output values. The newest REMEMBERED
    are kept per model."""

    def __init__(self, keep: int = REMEMBERED) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._by_model: dict[str, OrderedDict[str, tuple[int, str, np.ndarray]]] = {}

    def remember(self, model: str, version: int, request_id: str, outputs: Mapping[str, Any], first: str) -> None:
        if not request_id or len(request_id) > _MAX_ID:
            return
        entry: tuple[int, str, np.ndarray]
        try:
            tops = top_classes(outputs, first or next(iter(outputs), ""))
            if tops is not None:
                entry = (version, "classes", np.asarray(tops, dtype=np.int64).copy())
            else:
                value = np.asarray(outputs[first or next(iter(outputs))])
                if value.dtype.kind not in "fiub":
                    return
                entry = (version, "values", value.astype(np.float64).reshape(value.shape[0] if value.ndim else 1, -1))
        except (TypeError, ValueError, KeyError, StopIteration):
            return
        with self._lock:
            seen = self._by_model.setdefault(model, OrderedDict())
            seen[request_id] = entry
            seen.move_to_end(request_id)
            while len(seen) > self.keep:
                seen.popitem(last=False)

    def get(self, model: str, request_id: str) -> tuple[int, str, np.ndarray] | None:
        with self._lock:
            return self._by_model.get(model, OrderedDict()).get(request_id)

    def pop(self, model: str, request_id: str) -> tuple[int, str, np.ndarray] | None:
        """The remembered answer to ``request_id`` (forgotten once taken: feedback counts once)."""
        with self._lock:
            return self._by_model.get(model, OrderedDict()).pop(request_id, None)
