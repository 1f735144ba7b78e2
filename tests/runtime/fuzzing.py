"""What the fuzz tests and ``scripts/fuzz`` share: typed identity models, a served process, the checks.

The identity models (one input ``x`` of one v2 datatype, shape [-1, 2], returned as ``y``) let the
fuzzers and the datatype tests reach every datatype's decoding, not only FP32 and the quantized INT8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tests.runtime import models

# v2 datatype -> ONNX element type name
IDENTITY_DATATYPES = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FP16": "FLOAT16",
    "FP32": "FLOAT",
    "FP64": "DOUBLE",
}


def identity_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"


def onnx_identity(datatype: str) -> bytes:
    """x: DATATYPE[-1, 2] -> y = x."""
    import onnx
    from onnx import TensorProto, helper

    elem = getattr(TensorProto, IDENTITY_DATATYPES[datatype])
    x = helper.make_tensor_value_info("x", elem, ["n", 2])
    y = helper.make_tensor_value_info("y", elem, ["n", 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def identity_bundles(d: Path, datatypes: list[str] | None = None) -> list[Path]:
    batching = {"max_batch_size": 8, "batch_timeout_micros": 0, "allowed_batch_sizes": [], "max_enqueued_batches": 64}
    out = []
    for dt in datatypes or list(IDENTITY_DATATYPES):
        name = identity_name(dt)
        out.append(
            models.make_bundle(
                d / f"{name}.ekb", name=name, version=1, fmt="onnx", model=onnx_identity(dt), batching=batching
            )
        )
    return out


# -- what every reply must look like ----------------------------------------------------------------


def reply_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why a reply breaks the server's promise (no 5xx; a 4xx is ``{"error": "..."}``), or None."""
    if status >= 500:
        return f"server error {status}: {body[:300]!r}"
    if 400 <= status < 500:
        if not content_type.startswith("application/json"):
            return f"{status} with content type {content_type!r}"
        try:
            doc = json.loads(body)
        except ValueError:
            return f"{status} with a body that is not JSON: {body[:300]!r}"
        if not isinstance(doc, dict) or not isinstance(doc.get("error"), str) or not doc["error"]:
            return f"{status} without an error message: {body[:300]!r}"
    return None


def assert_good_reply(status: int, content_type: str, body: bytes, what: Any = "") -> None:
    problem = reply_problem(status, content_type, body)
    assert problem is None, f"{what}: {problem}"


def error(r: Any, status: int = 400) -> str:
    """The message of an httpx/requests reply that must be ``status`` with exactly ``{"error": "..."}``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    return str(body["error"])


def sample(datatype: str, rows: int = 1) -> np.ndarray:
    """Valid values of ``datatype`` with shape [rows, 2]."""
    from edgekit_runtime.tensors import numpy_dtype

    dt = numpy_dtype(datatype)
    if dt.kind == "b":
        return np.tile(np.array([True, False]), (rows, 1))
    return np.arange(rows * 2).reshape(rows, 2).astype(dt)
