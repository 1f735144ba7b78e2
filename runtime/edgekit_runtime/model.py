"""One loaded model version: its backends and batcher, request checks, golden-sample smoke test,
and the manifest's optional pre/post-processing.

Loading is "load beside, warm up, smoke-test": the backends are created and run on the bundle's
golden samples before the version is handed to the runtime to be switched in; a version that fails
here never serves.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit_runtime.backends import Backend, load_backend
from edgekit_runtime.batching import Batcher, Outputs, batch_sizes
from edgekit_runtime.bundle import Bundle, Manifest, RuntimeSettings
from edgekit_runtime.errors import BundleError, EdgekitError, InvalidInputError, SmokeTestError
from edgekit_runtime.latency import sample_inputs
from edgekit_runtime.livestats import TOP_K_INDICES
from edgekit_runtime.metrics import ModelMetrics
from edgekit_runtime.tensors import TensorSpec, coerce_input, dequantize

__all__ = ["LoadedModel", "check_golden"]

log = logging.getLogger("edgekit_runtime.model")

TOP_K_SCORES = "top_k_scores"
TOP_K_LABELS = "top_k_labels"


def check_golden(bundle: Bundle, backend: Backend) -> str:
    """Run the bundle's golden inputs and compare with the recorded outputs (quantized ones dequantized).

    Returns a one-line summary; raises SmokeTestError naming the output that differs.
    """
    m = bundle.manifest
    if m.golden is None or not bundle.golden_inputs:
        return "no golden samples in this bundle"
    out = backend.run(dict(bundle.golden_inputs))
    worst = 0.0
    for spec in backend.signature.outputs:
        if spec.name not in bundle.golden_outputs:
            msg = f"golden outputs have no {spec.name!r} (they have {sorted(bundle.golden_outputs)})"
            raise SmokeTestError(msg)
        got = np.asarray(dequantize(out[spec.name], spec), dtype=np.float64)
        want = np.asarray(dequantize(bundle.golden_outputs[spec.name], spec), dtype=np.float64)
        if got.shape != want.shape:
            msg = f"output {spec.name!r} on the golden samples has shape {list(got.shape)}, recorded {list(want.shape)}"
            raise SmokeTestError(msg)
        diff = np.abs(got - want)
        if diff.size:
            worst = max(worst, float(np.nanmax(diff)))
        if not np.allclose(got, want, atol=m.golden.atol, rtol=m.golden.rtol, equal_nan=True):
            msg = (
                f"output {spec.name!r} differs from the golden samples: max |diff| {float(np.nanmax(diff)):.6g} "
                f"> atol {m.golden.atol:g} (rtol {m.golden.rtol:g}); the model file does not reproduce its conversion"
            )
            raise SmokeTestError(msg)
    return f"{m.golden.count} golden samples match (max |diff| {worst:.3g}, atol {m.golden.atol:g})"


@dataclass(frozen=True)
class _InputCheck:
    name: str
    spec: TensorSpec
    dtype: np.dtype[Any]
    tail: tuple[int, ...]
    mean: np.ndarray | None
    std: np.ndarray | None

    def expected(self) -> str:
        return f"dtype {self.spec.dtype}, shape {[-1, *self.tail]} (-1 = any size)"


def _serving_spec(spec: TensorSpec) -> TensorSpec:
    """The spec clients see: any number of rows (fixed-batch models are run chunk by chunk)."""
    if not spec.shape:
        return spec
    return spec.model_copy(update={"shape": [-1, *spec.shape[1:]]})


class LoadedModel:
    """A model version ready to serve: checked requests go through its batcher to its backends."""

    def __init__(
        self,
        manifest: Manifest,
        backends: list[Backend],
        settings: RuntimeSettings,
        *,
        origin: str,
        key: Any = None,
        metrics: ModelMetrics | None = None,
        smoke: str = "",
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.origin = origin
        self.key = key
        self.settings = settings
        self.smoke = smoke
        self.metrics = metrics
        backend = backends[0]
        self.fixed_batch = backend.fixed_batch
        self.accelerators = backend.accelerators
        self.notes = backend.notes
        self.inputs = [_serving_spec(s) for s in backend.signature.inputs]
        self.outputs = [_serving_spec(s) for s in backend.signature.outputs]
        if metrics is not None and metrics.window is not None:
            metrics.window.first_output = self.outputs[0].name if self.outputs else ""
        pre = manifest.preprocessing
        pre_input = (pre.input or self.inputs[0].name) if pre is not None else None
        self._checks = []
        for spec in backend.signature.inputs:
            mean = std = None
            if pre is not None and spec.name == pre_input:
                mean = np.asarray(pre.mean, dtype=np.float32)
                std = np.asarray(pre.std, dtype=np.float32)
            self._checks.append(_InputCheck(spec.name, spec, spec.np_dtype, tuple(spec.shape[1:]), mean, std))
        self._names = {c.name for c in self._checks}
        post = manifest.postprocessing
        self._post = post
        self._post_output = (post.output or self.outputs[0].name) if post is not None else ""
        if post is not None:
            if self._post_output not in {s.name for s in self.outputs}:
                msg = f"manifest postprocessing.output {self._post_output!r} is not an output of the model"
                raise BundleError(msg)
            k = post.top_k
            self.outputs = [
                *self.outputs,
                TensorSpec(name=TOP_K_INDICES, dtype="int64", shape=[-1, k]),
                TensorSpec(name=TOP_K_SCORES, dtype="float32", shape=[-1, k]),
            ]
            if post.labels:
                self.outputs.append(TensorSpec(name=TOP_K_LABELS, dtype="object", shape=[-1, k]))
        self.batcher = Batcher(
            backends,
            settings.batching,
            name=f"{self.name}-{self.version}",
            on_batch=metrics.on_batch if metrics is not None else None,
            on_engine=metrics.window.engine if metrics is not None and metrics.window is not None else None,
        )

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        settings: RuntimeSettings,
        *,
        origin: str,
        key: Any = None,
        metrics: ModelMetrics | None = None,
    ) -> LoadedModel:
        """Create one backend per batch thread, smoke-test on the golden samples, warm up every batch size."""
        m = bundle.manifest
        backends: list[Backend] = []
        try:
            for _ in range(settings.batching.num_batch_threads):
                backends.append(load_backend(m.format, bundle.model, settings))
            smoke = check_golden(bundle, backends[0])
            sizes = batch_sizes(settings.batching, backends[0])
            for b in backends:
                for size in sizes:
                    b.run(sample_inputs(b, size))
            return cls(m, backends, settings, origin=origin, key=key, metrics=metrics, smoke=smoke)
        except BaseException:
            for b in backends:
                b.close()
            raise

    # -- the request path ---------------------------------------------------------------------

    def describe_inputs(self) -> str:
        return ", ".join(f"{c.name} ({c.expected()})" for c in self._checks)

    def prepare(self, feeds: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Check names, shapes and dtypes of one request; InvalidInputError names the input and what it expects."""
        if len(feeds) != len(self._checks) or not self._names.issuperset(feeds):
            missing = sorted(self._names - set(feeds))
            unknown = sorted(set(feeds) - self._names)
            msg = f"model {self.name!r} expects inputs: {self.describe_inputs()}"
            if missing:
                msg += f"; missing {missing}"
            if unknown:
                msg += f"; unknown {unknown}"
            raise InvalidInputError(msg)
        out: dict[str, np.ndarray] = {}
        rows = -1
        for c in self._checks:
            value = feeds[c.name]
            if not isinstance(value, np.ndarray):
                value = np.asarray(value)
            shape = value.shape
            if (
                len(shape) != len(c.tail) + 1
                or shape[0] == 0
                or any(t not in (-1, d) for t, d in zip(c.tail, shape[1:], strict=True))
            ):
                msg = f"input {c.name!r} has shape {list(shape)}; expected {c.expected()} with at least one row"
                raise InvalidInputError(msg)
            if rows < 0:
                rows = shape[0]
            elif shape[0] != rows:
                msg = f"all inputs must have the same number of rows; {c.name!r} has {shape[0]}, others {rows}"
                raise InvalidInputError(msg)
            if c.mean is not None and c.std is not None:
                if value.dtype.kind not in "fiub":
                    msg = f"input {c.name!r} expects {c.expected()}; got {value.dtype}"
                    raise InvalidInputError(msg)
                value = (value.astype(np.float32) - c.mean) / c.std
            if value.dtype != c.dtype:
                try:
                    value = coerce_input(value, c.spec)
                except InvalidInputError as e:
                    msg = f"{e.message} (expected {c.expected()})"
                    raise InvalidInputError(msg) from None
                except (TypeError, ValueError):
                    msg = f"input {c.name!r} expects {c.expected()}; got {value.dtype} values that do not convert"
                    raise InvalidInputError(msg) from None
            out[c.name] = value
        return out, rows

    def finish(self, outputs: Outputs) -> Outputs:
        """Apply the manifest's post-processing (top-k with labels); a no-op without one."""
        post = self._post
        if post is None:
            return outputs
        spec = next(s for s in self.outputs if s.name == self._post_output)
        scores = np.asarray(dequantize(outputs[self._post_output], spec), dtype=np.float32)
        flat = scores.reshape(scores.shape[0], -1)
        k = min(post.top_k, flat.shape[1])
        idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
        out = dict(outputs)
        out[TOP_K_INDICES] = idx.astype(np.int64)
        out[TOP_K_SCORES] = np.take_along_axis(flat, idx, axis=1)
        if post.labels:
            labels = np.asarray([*post.labels, ""], dtype=object)
            out[TOP_K_LABELS] = labels[np.minimum(idx, len(post.labels))]
        return out

    async def infer_async(self, feeds: dict[str, Any]) -> Outputs:
        prepared, rows = self.prepare(feeds)
        return self.finish(await self.batcher.submit_async(prepared, rows))

    def infer_future(self, feeds: dict[str, Any]) -> tuple[concurrent.futures.Future[Outputs], int]:
        prepared, rows = self.prepare(feeds)
        return self.batcher.submit(prepared, rows), rows

    def close(self) -> None:
        """Finish in-flight requests, stop the workers, free the engines."""
        try:
            self.batcher.close(drain=True)
        except EdgekitError:  # pragma: no cover - close never raises on purpose
            log.exception("closing %s v%d", self.name, self.version)
