"""The transport-free serving logic both HTTP protocols share: find the model, infer, count, report.

The HTTP adapters (``server/v1.py``, ``server/v2.py``) only decode their wire format into
``{input name: array}`` and encode the outputs back; everything else is here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from edgekit_runtime import __version__
from edgekit_runtime.batching import BatcherClosedError, Outputs
from edgekit_runtime.errors import EdgekitError, InvalidInputError, NotFoundError
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.runtime import Runtime, VersionStatus

__all__ = ["DataPlane"]

SERVER_NAME = "edgekit-runtime"
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def parse_version(version: str | None) -> int | None:
    if version is None:
        return None
    # str.isdigit() also takes digits like '¹' that int() refuses, and int() takes '1_0' and ' 1'
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or int(version) < 1:
        msg = f"version {version!r} does not exist: versions are positive integers"
        raise NotFoundError(msg)
    return int(version)


class DataPlane:
    """What a server can ask of the runtime, independent of the wire format."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics

    # -- inference ----------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The model version a request addresses; NotFoundError (404) / UnavailableError (503) if none."""
        return self.runtime.get(name, parse_version(version))

    async def infer(
        self, model: LoadedModel, feeds: dict[str, Any], *, pinned: bool = False, request_id: str | None = None
    ) -> Outputs:
        """Run one request's rows through the model's batcher, timing it (see ``counted`` for the
        counts); with ``request_id``, its answer is remembered for ground-truth feedback."""
        m = model.metrics
        start = time.perf_counter()
        try:
            try:
                out = await model.infer_async(feeds)
            except BatcherClosedError:
                # The version was swapped out between lookup and enqueue: the new one answers.
                model = self.runtime.get(model.name, model.version if pinned else None)
                out = await model.infer_async(feeds)
            if not pinned:
                self.runtime.observe(model, feeds, out)  # a shadow check mirrors from here
            answered = model.metrics
            if answered is not None and answered.window is not None:
                answered.window.outputs(out)
                if request_id:
                    self.metrics.predictions.remember(
                        model.name, model.version, request_id, out, answered.window.first_output
                    )
            return out
        finally:
            if m is not None:
                elapsed = time.perf_counter() - start
                m.latency.observe(elapsed)
                if m.window is not None:
                    m.window.latency(elapsed)

    @contextmanager
    def counted(self, model: LoadedModel) -> Iterator[None]:
        """Count one request to ``model`` (decoding, inference and encoding) and, if it fails, its
        HTTP status: an EdgekitError's own, 500 for anything else (a bug, which must show up too)."""
        m = model.metrics
        status: int | None = None
        try:
            yield
        except Exception as e:
            status = e.http_status if isinstance(e, EdgekitError) else 500
            if m is not None:
                m.errors_by_code(status).inc()
            raise
        finally:
            if m is not None:
                m.requests.inc()
                if m.window is not None:
                    m.window.request(status)

    def feedback(self, name: str, items: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
        """Ground truth for earlier answers by request id: each item's true class per row (integers)
        or true values. Counts into the answering version's telemetry window (live accuracy, or the
        mean absolute error); ids not remembered (never seen, already given, or too old) are listed.
        Every item is checked before any counts: a bad one fails the call and counts nothing."""
        self.runtime.get(name)  # 404 for an unknown model, 503 when none serves
        predictions = self.metrics.predictions
        checked: list[tuple[str, int, int, int | None, float | None]] = []
        unknown: list[str] = []
        for request_id, truth in items:
            seen = predictions.get(name, request_id)
            if seen is None:
                unknown.append(request_id)
                continue
            version, kind, answer = seen
            if kind == "classes":
                labels = truth.reshape(-1)
                if labels.dtype.kind not in "iu" or labels.size != answer.size:
                    msg = (
                        f"feedback for {request_id!r}: give {answer.size} integer class label(s), one per row of "
                        f"the request, not {labels.size} of type {labels.dtype}"
                    )
                    raise InvalidInputError(msg)
                checked.append((request_id, version, int(answer.size), int(np.count_nonzero(labels == answer)), None))
            else:
                if truth.size != answer.size:
                    shape = list(answer.shape)
                    msg = f"feedback for {request_id!r}: give {answer.size} true value(s) (the answer's shape {shape})"
                    raise InvalidInputError(msg)
                err = float(np.abs(truth.astype(np.float64).reshape(answer.shape) - answer).mean(axis=1).sum())
                checked.append((request_id, version, int(answer.shape[0]), None, err))
        rows = 0
        for request_id, version, n, correct, abs_err in checked:
            if predictions.pop(name, request_id) is None:
                unknown.append(request_id)  # another feedback call took it meanwhile
                continue
            window = self.metrics.window(name, version)
            if window is not None:
                window.feedback(n, correct=correct, abs_err=abs_err)
            rows += n
        return {"accepted": len(items) - len(unknown), "rows": rows, "unknown": unknown}

    # -- health and status --------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.runtime.is_ready()

    def model_ready(self, name: str, version: str | None = None) -> tuple[bool, str]:
        """(ready, why not) of a model or one version; NotFoundError for an unknown model."""
        try:
            self.model(name, version)
        except NotFoundError as e:
            if name not in self.runtime.models():
                raise
            return False, e.message
        except EdgekitError as e:
            return False, e.message
        return True, ""

    def status(self, name: str, version: str | None = None) -> list[VersionStatus]:
        return self.runtime.status(name, parse_version(version))

    def versions(self, name: str) -> list[int]:
        return [s.version for s in self.runtime.status(name) if s.state == "AVAILABLE"]

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def repository_index(self) -> list[dict[str, Any]]:
        out = []
        for name in self.runtime.models():
            for st in self.runtime.status(name):
                item: dict[str, Any] = {
                    "name": name,
                    "version": str(st.version),
                    "state": _V2_STATE.get(st.state, st.state),
                }
                if st.error_message:
                    item["reason"] = st.error_message
                out.append(item)
        return out

    def reload(self, name: str | None = None) -> list[VersionStatus]:
        return self.runtime.reload(name)


_V2_STATE = {
    "AVAILABLE": "READY",
    "LOADING": "LOADING",
    "UNLOADING": "UNLOADING",
    "END": "UNAVAILABLE",
    "START": "LOADING",
}
