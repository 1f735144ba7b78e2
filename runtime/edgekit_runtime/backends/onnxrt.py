"""ONNX Runtime backend: one session, execution providers from the profile with CPU fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgekit_runtime.backends import Backend, spec_from
from edgekit_runtime.bundle import RuntimeSettings
from edgekit_runtime.errors import BackendError
from edgekit_runtime.tensors import Signature

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


class OnnxRuntimeBackend(Backend):
    format = "onnx"

    def __init__(self, model: Path | bytes, settings: RuntimeSettings) -> None:
        self.notes: list[str] = []
        available = set(ort.get_available_providers())
        wanted = settings.execution_providers or ["CPUExecutionProvider"]
        providers = [p for p in wanted if p in available]
        for p in wanted:
            if p not in available:
                self.notes.append(f"execution provider {p} not available on this device; falling back")
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        opts = ort.SessionOptions()
        if settings.threads:
            opts.intra_op_num_threads = settings.threads
        opts.inter_op_num_threads = 1
        # ORT's pool spins between runs by default; beside a batcher that idles between batches
        # (and an event loop on the same cores) spinning burns a core for nothing.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model if isinstance(model, bytes) else str(model)
        try:
            self._session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own untyped exceptions (Fail, InvalidGraph, ...)
            msg = f"ONNX Runtime cannot load this model: {e}"
            raise BackendError(msg) from e
        self.accelerators = [p for p in self._session.get_providers() if p != "CPUExecutionProvider"]
        self.signature = Signature(
            inputs=[
                spec_from(i.name, _ORT_TYPES.get(i.type, np.float32), _dims(i.shape), None)
                for i in self._session.get_inputs()
            ],
            outputs=[
                spec_from(o.name, _ORT_TYPES.get(o.type, np.float32), _dims(o.shape), None)
                for o in self._session.get_outputs()
            ],
        )
        self._out_names = [o.name for o in self.signature.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._session.run(self._out_names, feeds)
        except Exception as e:
            msg = f"ONNX Runtime failed to run the model: {e}"
            raise BackendError(msg) from e
        return dict(zip(self._out_names, results, strict=True))
