"""A minimal MLServer runtime serving an ONNX model with ONNX Runtime, for bench/serve.py's comparison.

MLServer 1.7.1 has no official ONNX runtime, so this is the smallest fair one: one InferenceSession,
every request input decoded with NumpyCodec and fed by name, every output encoded back with NumpyCodec.
MLServer's adaptive batching (``max_batch_size`` / ``max_batch_time`` in model-settings.json) stacks
requests along dim 0 before ``predict`` and splits the response afterwards.

Runs inside MLServer's own venv (see bench/README.md), never imported by edgekit.
Extra settings (``parameters.extra`` in model-settings.json): ``intra_op_threads`` (0 = ORT's default).
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        opts = ort.SessionOptions()
        threads = int(extra.get("intra_op_threads", 0))
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for request_input in payload.inputs:
            if request_input.name not in self._inputs:
                msg = f"unknown input {request_input.name!r}; the model's inputs are {sorted(self._inputs)}"
                raise ValueError(msg)
            feeds[request_input.name] = NumpyCodec.decode_input(request_input)
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, arr) for name, arr in zip(self._outputs, results, strict=True)],
        )
