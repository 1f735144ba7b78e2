"""The shadow check: a share of the live requests the serving version answers is mirrored, off the
reply path, to a candidate version loaded beside it, and the two answers are compared.

Bounds, so that a shadow check cannot starve the serving version: every SHARE-th request the
serving version answers is offered (the others are not looked at); an offered request waits in a
queue of QUEUE and is dropped when the queue is full; one thread, niced by NICE, sends the mirrored
requests to the candidate one at a time and compares. The reply to the client is computed before
the request is offered and offering never blocks, so clients see no difference.

The comparison, decided on the serving version's first output (the signature's order):

- ``top1`` (the share of rows whose argmax over the last dimension is the same) when the model
  declares top-k post-processing (its ``top_k_indices`` are compared), or when that output is
  floating point with at least two dimensions, a last dimension over 1, every value in [0, 1] and
  every row summing to 1 within 1e-3, i.e. class probabilities such as a softmax's. Each request
  must look so; one that does not makes the check ``max_abs_diff``. A mirrored request that the
  candidate fails counts as rows that disagree.
- ``max_abs_diff`` otherwise: the largest absolute difference over every numeric output.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from typing import Any

import numpy as np

from edgekit_runtime.batching import Outputs
from edgekit_runtime.livestats import TOP_K_INDICES, looks_like_scores
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.runtime import Runtime

__all__ = ["NICE", "QUEUE", "SHARE", "Comparison", "Shadow", "describe"]

log = logging.getLogger("edgekit_runtime.agent")

#: Every SHARE-th request the serving version answers is mirrored.
SHARE = 4
#: Mirrored requests waiting for the candidate; more are dropped.
QUEUE = 8
#: How much nicer than the serving process the shadow thread runs (Linux: niceness is per thread).
NICE = 10


def _tops(served: Outputs, got: Outputs, first: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's top class in both answers, or None when the answer is not class scores."""
    ref = served.get(TOP_K_INDICES)
    if ref is not None and TOP_K_INDICES in got:
        return np.asarray(ref)[..., 0], np.asarray(got[TOP_K_INDICES])[..., 0]
    a, b = np.asarray(served[first]), np.asarray(got.get(first, np.empty(0)))
    if looks_like_scores(a) and a.shape == b.shape:
        return a.argmax(axis=-1), b.argmax(axis=-1)
    return None


class Comparison:
    """What the two versions answered so far, request by request."""

    def __init__(self, first: str) -> None:
        self.first = first
        self.requests = 0
        self.rows = 0
        self.agree = 0
        self.classifier = True
        self.max_abs_diff = 0.0
        self.errors = 0

    def add(self, served: Outputs, got: Outputs) -> None:
        self.requests += 1
        tops = _tops(served, got, self.first)
        if tops is None:
            self.classifier = False
        else:
            self.rows += int(tops[0].size)
            self.agree += int(np.count_nonzero(tops[0] == tops[1]))
        for name, value in served.items():
            a, b = np.asarray(value), got.get(name)
            if b is None or a.dtype.kind not in "fiub":
                continue
            b = np.asarray(b)
            if a.shape != b.shape or not a.size:
                continue
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if np.any(~np.isnan(d)):
                self.max_abs_diff = max(self.max_abs_diff, float(np.nanmax(d)))

    def failed(self, served: Outputs) -> None:
        """The candidate failed a request the serving version answered: its rows disagree."""
        self.requests += 1
        self.errors += 1
        a = np.asarray(served.get(TOP_K_INDICES, served[self.first]))
        self.rows += int(a.size // a.shape[-1]) if a.ndim >= 2 and a.shape[-1] else int(a.size)

    def result(self, source: str) -> dict[str, Any]:
        top1 = self.classifier and self.rows > 0
        value = self.agree / self.rows if top1 else self.max_abs_diff
        metric = "top1" if top1 else "max_abs_diff"
        return {"metric": metric, "value": value, "requests": self.requests, "source": source}


def describe(result: dict[str, Any]) -> str:
    """``top-1 agreement 97.5%`` or ``max |diff| 0.0012``."""
    if result["metric"] == "top1":
        return f"top-1 agreement {result['value']:.1%}"
    return f"max |diff| {result['value']:.3g}"


class Shadow:
    """Mirrors the serving version's requests to ``candidate`` until ``close``.

    Keyword arguments:
        serving, candidate: the version clients get and the one being checked (both loaded).
        share, bound: every ``share``-th request is mirrored; at most ``bound`` wait.
    """

    def __init__(
        self, runtime: Runtime, model: str, *, serving: int, candidate: int, share: int = SHARE, bound: int = QUEUE
    ) -> None:
        self.runtime = runtime
        self.model = model
        self.serving = serving
        self.candidate = candidate
        self.share = share
        self.dropped = 0
        self._count = itertools.count()
        self._queue: queue.Queue[tuple[dict[str, Any], Outputs]] = queue.Queue(bound)
        self._lock = threading.Lock()
        self._cmp = Comparison(runtime.get(model, serving).outputs[0].name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"edgekit-shadow-{model}", daemon=True)
        self._thread.start()

    def offer(self, lm: LoadedModel, inputs: dict[str, Any], outputs: Outputs) -> None:
        """The runtime's tap: on the reply path, so it only counts and enqueues, never blocks."""
        if lm.version != self.serving or next(self._count) % self.share:
            return
        try:
            self._queue.put_nowait((inputs, outputs))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        try:  # per thread on Linux: the engines' own threads keep their priority
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
        except (AttributeError, OSError):  # not Linux, or not allowed: still one request at a time
            pass
        while not self._stop.is_set():
            try:
                inputs, served = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                got = self.runtime.predict(self.model, inputs, version=self.candidate, timeout=60)
            except Exception as e:  # noqa: BLE001 - any failure of the candidate is a disagreement
                log.info("shadow %s v%d failed a mirrored request: %s", self.model, self.candidate, e)
                with self._lock:
                    self._cmp.failed(served)
                continue
            with self._lock:
                self._cmp.add(served, got)

    def result(self) -> dict[str, Any]:
        with self._lock:
            return self._cmp.result("live")

    @property
    def errors(self) -> int:
        with self._lock:
            return self._cmp.errors

    def golden(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Both versions on the candidate's golden samples: the comparison when no live request came."""
        cmp = Comparison(self._cmp.first)
        served = self.runtime.predict(self.model, dict(inputs), version=self.serving, timeout=60)
        try:
            got = self.runtime.predict(self.model, dict(inputs), version=self.candidate, timeout=60)
        except Exception:  # noqa: BLE001 - as for live requests: a failure disagrees
            cmp.failed(served)
        else:
            cmp.add(served, got)
        out = cmp.result("golden")
        out["requests"] = 0  # no live request was compared
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
