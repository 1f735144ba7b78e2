"""What the fuzz tests and ``scripts/fuzz`` share: typed identity models, a served process, the checks.

The identity models (one input ``x`` of one v2 datatype, shape [-1, 2], returned as ``y``) let the
fuzzers and the datatype tests reach every datatype's decoding, not only FP32 and the quantized INT8.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from dataclasses import dataclass, field
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


# -- schemathesis over a real socket -------------------------------------------------------------


@dataclass
class FuzzResult:
    """What one schemathesis run did: its exit code and output, and every reply it recorded."""

    returncode: int
    output: str
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    # (operation, status) -> count
    by_operation: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> str:
        by_status = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return f"{self.requests} requests; by status: {by_status}; {len(self.problems)} problem replies"


def _operation(method: str, url: str) -> str:
    path = url.split("://", 1)[-1].partition("/")[2]
    return f"{method} /{path.split('?')[0]}"


def run_schemathesis(
    base_url: str,
    har: Path,
    *,
    seed: int,
    max_examples: int | None = None,
    max_time: float | None = None,
    timeout: float = 900,
) -> FuzzResult:
    """``st run`` (every phase: examples, coverage, fuzzing, stateful) against the server's own
    document at ``base_url``/openapi.json, one worker, a reply over 30 s counting as a hang; then every
    reply in its HAR log is checked with ``reply_problem``."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base_url}/openapi.json",
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--checks",
        "not_a_server_error",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--no-color",
    ]
    if max_examples is not None:
        cmd += ["--max-examples", str(max_examples)]
    if max_time is not None:
        cmd += ["--max-time", str(max(1, round(max_time)))]
    # in the HAR's folder: schemathesis keeps a cache folder (.schemathesis) in its working directory
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=har.parent)
    result = FuzzResult(proc.returncode, proc.stdout + proc.stderr)
    for entry in json.loads(har.read_text())["log"]["entries"]:
        req, resp = entry["request"], entry["response"]
        status = int(resp["status"])
        result.statuses[status] += 1
        op = _operation(req["method"], req["url"])
        result.by_operation[op, status] += 1
        content = resp.get("content", {})
        problem = (
            reply_problem(status, content.get("mimeType", ""), content.get("text", "").encode())
            if status >= 100
            else "no reply (connection refused or reset, or a timeout)"
        )
        if problem is not None:
            result.problems.append(f"{op}: {problem}")
    return result
