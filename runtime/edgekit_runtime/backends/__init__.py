"""Inference backends: one small class per engine behind one interface.

The converter validates with exactly these classes, so what is validated is what the device runs.
A backend instance is owned by one thread at a time (a LiteRT interpreter is not thread-safe);
the batcher gives each of its worker threads its own instance.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.bundle import RuntimeSettings
from edgekit_runtime.errors import InvalidInputError, MissingDependencyError
from edgekit_runtime.tensors import Signature, TensorSpec, coerce_input

__all__ = ["Backend", "load_backend"]


class Backend(abc.ABC):
    """A loaded model that maps named, batched input arrays to named output arrays."""

    format: str
    signature: Signature
    #: what actually accelerates this instance (delegates / execution providers), after fallbacks
    accelerators: list[str]
    #: human-readable notes about fallbacks taken at load (a delegate that is not on this device, ...)
    notes: list[str]

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch whose arrays already have the model's dtypes."""

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with when it is static (often 1), else None."""
        dims = {s.shape[0] for s in self.signature.inputs if s.shape}
        if len(dims) == 1 and (d := next(iter(dims))) > 0:
            return d
        return None

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names and shapes and coerce dtypes; InvalidInputError names the input that is wrong."""
        specs = self.signature.inputs
        missing = [s.name for s in specs if s.name not in feeds]
        extra = [k for k in feeds if k not in {s.name for s in specs}]
        if missing or extra:
            want = ", ".join(s.describe() for s in specs)
            msg = f"inputs {sorted(feeds)} do not match the model's inputs ({want})"
            if missing:
                msg += f"; missing {missing}"
            if extra:
                msg += f"; unknown {extra}"
            raise InvalidInputError(msg)
        out: dict[str, np.ndarray] = {}
        rows: int | None = None
        for spec in specs:
            value = np.asarray(feeds[spec.name])
            spec.check(value)
            if rows is None:
                rows = value.shape[0]
            elif value.shape[0] != rows:
                msg = f"all inputs must have the same batch size; {spec.name!r} has {value.shape[0]}, others {rows}"
                raise InvalidInputError(msg)
            out[spec.name] = coerce_input(value, spec)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check, coerce and run a batch. Models exported with a fixed batch run chunk by chunk."""
        return self.run_prepared(self.prepare(feeds))

    def run_prepared(self, prepared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch that ``prepare`` (or an equivalent per-request check, as the server's) already
        checked and coerced; the batcher calls this so each batch is not validated a second time."""
        fixed = self.fixed_batch
        rows = next(iter(prepared.values())).shape[0]
        if fixed is None or rows == fixed:
            return self._run(prepared)
        if rows % fixed:
            msg = f"this model has a fixed batch of {fixed}; send a multiple of {fixed} rows, got {rows}"
            raise InvalidInputError(msg)
        parts = [self._run({k: v[i : i + fixed] for k, v in prepared.items()}) for i in range(0, rows, fixed)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:  # noqa: B027 - optional hook with a safe default
        """Release engine resources; the default does nothing."""


def load_backend(fmt: str, model: Path | bytes, settings: RuntimeSettings | None = None) -> Backend:
    """Load ``model`` (a path or bytes) with the engine for ``fmt`` ("tflite" or "onnx")."""
    settings = settings or RuntimeSettings()
    if fmt == "tflite":
        try:
            from edgekit_runtime.backends.litert import LiteRTBackend
        except ImportError as e:
            msg = f"TFLite bundles need LiteRT: pip install 'edgekit-ml-runtime[tflite]' ({e})"
            raise MissingDependencyError(msg) from e
        return LiteRTBackend(model, settings)
    if fmt == "onnx":
        try:
            from edgekit_runtime.backends.onnxrt import OnnxRuntimeBackend
        except ImportError as e:
            msg = f"ONNX bundles need ONNX Runtime: pip install 'edgekit-ml-runtime[onnx]' ({e})"
            raise MissingDependencyError(msg) from e
        return OnnxRuntimeBackend(model, settings)
    msg = f"unknown model format {fmt!r}; edgekit runs 'tflite' and 'onnx'"
    raise InvalidInputError(msg)


def spec_from(name: str, dtype: Any, shape: list[int], quant: tuple[list[float], list[int], int] | None) -> TensorSpec:
    from edgekit_runtime.tensors import QuantParams

    q = None
    if quant is not None and quant[0]:
        q = QuantParams(scale=quant[0], zero_point=quant[1], axis=quant[2])
    return TensorSpec(name=name, dtype=np.dtype(dtype).name, shape=shape, quantization=q)
