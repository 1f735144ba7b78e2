"""LiteRT (ai-edge-litert) backend, with one allocated interpreter per batch size seen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import interpreter as litert

from edgekit_runtime.backends import Backend, spec_from
from edgekit_runtime.bundle import RuntimeSettings
from edgekit_runtime.errors import BackendError
from edgekit_runtime.tensors import Signature

# Delegate libraries by the names profiles use. XNNPACK is LiteRT's built-in default CPU delegate.
_DELEGATE_LIBS = {"edgetpu": "libedgetpu.so.1", "gpu": "libtensorflowlite_gpu_delegate.so"}
_MAX_CACHED_SIZES = 8


class LiteRTBackend(Backend):
    format = "tflite"

    def __init__(self, model: Path | bytes, settings: RuntimeSettings) -> None:
        self._content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self._threads = settings.threads or None
        self.notes: list[str] = []
        self.accelerators: list[str] = []
        self._delegates: list[Any] = []
        self._use_xnnpack = True
        for name in settings.delegates:
            if name == "xnnpack":
                self.accelerators.append("xnnpack")
            elif name == "none":
                self._use_xnnpack = False
            elif name in _DELEGATE_LIBS:
                try:
                    self._delegates.append(litert.load_delegate(_DELEGATE_LIBS[name]))
                    self.accelerators.append(name)
                except (ValueError, OSError) as e:
                    self.notes.append(f"delegate {name!r} not available on this device ({e}); running on the CPU")
            else:
                self.notes.append(f"unknown delegate {name!r} ignored")
        self._interpreters: dict[tuple[tuple[int, ...], ...], Any] = {}
        base = self._new_interpreter()
        self.signature = self._read_signature(base)
        self._interpreters[tuple(tuple(base.get_tensor(i).shape) for _, i in self._in_index)] = base

    def _new_interpreter(self) -> Any:
        kwargs: dict[str, Any] = {"model_content": self._content, "num_threads": self._threads}
        if self._delegates:
            kwargs["experimental_delegates"] = self._delegates
        if not self._use_xnnpack:
            kwargs["experimental_op_resolver_type"] = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            interp = litert.Interpreter(**kwargs)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            msg = f"LiteRT cannot load this model: {e}"
            raise BackendError(msg) from e
        return interp

    @staticmethod
    def _io(interp: Any) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
        """(name, details) for inputs and outputs, named by the serving signature when the model has one."""
        sigs = interp.get_signature_list()
        in_details = interp.get_input_details()
        out_details = interp.get_output_details()
        if len(sigs) == 1:
            key = next(iter(sigs))
            runner = interp.get_signature_runner(key)
            ins = sorted(runner.get_input_details().items(), key=lambda kv: kv[1]["index"])
            outs = sorted(runner.get_output_details().items())
            by_index_in = {d["index"]: d for d in in_details}
            by_index_out = {d["index"]: d for d in out_details}
            return (
                [(n, by_index_in.get(d["index"], d)) for n, d in ins],
                [(n, by_index_out.get(d["index"], d)) for n, d in outs],
            )
        return [(d["name"], d) for d in in_details], [(d["name"], d) for d in out_details]

    def _read_signature(self, interp: Any) -> Signature:
        ins, outs = self._io(interp)
        self._in_index = [(n, d["index"]) for n, d in ins]
        self._out_index = [(n, d["index"]) for n, d in outs]

        def spec(name: str, d: dict[str, Any]) -> Any:
            qp = d.get("quantization_parameters") or {}
            scales = [float(s) for s in np.asarray(qp.get("scales", []))]
            zps = [int(z) for z in np.asarray(qp.get("zero_points", []))]
            shape = [int(s) for s in d.get("shape_signature", d["shape"])]
            return spec_from(name, d["dtype"], shape, (scales, zps, int(qp.get("quantized_dimension", 0))))

        return Signature(inputs=[spec(n, d) for n, d in ins], outputs=[spec(n, d) for n, d in outs])

    def _for_shapes(self, feeds: dict[str, np.ndarray]) -> Any:
        """An interpreter allocated for exactly these input shapes (resizing per call would re-plan memory)."""
        key = tuple(feeds[name].shape for name, _ in self._in_index)
        interp = self._interpreters.get(key)
        if interp is not None:
            return interp
        if len(self._interpreters) >= _MAX_CACHED_SIZES:
            self._interpreters.pop(next(iter(self._interpreters)))
        interp = self._new_interpreter()
        try:
            for name, idx in self._in_index:
                interp.resize_tensor_input(idx, list(feeds[name].shape), strict=False)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            msg = f"LiteRT cannot run this model with input shapes {list(key)}: {e}"
            raise BackendError(msg) from e
        self._interpreters[key] = interp
        return interp

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._for_shapes(feeds)
        try:
            for name, idx in self._in_index:
                interp.set_tensor(idx, np.ascontiguousarray(feeds[name]))
            interp.invoke()
            return {name: interp.get_tensor(idx) for name, idx in self._out_index}
        except (ValueError, RuntimeError) as e:
            msg = f"LiteRT failed to run the model: {e}"
            raise BackendError(msg) from e

    def close(self) -> None:
        self._interpreters.clear()
