"""Both HTTP protocols in-process (httpx over ASGI): happy paths, every bad input, metrics, OpenAPI."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.config import BatchingOverrides
from edgekit_runtime.errors import UnavailableError
from edgekit_runtime.server import create_app
from edgekit_runtime.server.openapi import ROUTES
from tests.runtime.conftest import Client, Models, reference

X = np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32)
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def runtime(bundles: dict[str, Path]) -> Iterator[Runtime]:
    rt = Runtime([bundles[k] for k in ("mlp", "fixed1", "int8", "two")])
    rt.start(poll_seconds=0)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> Iterator[Client]:
    c = Client(create_app(runtime, max_body_bytes=LIMIT))
    yield c
    c.close()


def error(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    return str(body["error"])


# -- TF Serving REST ------------------------------------------------------------------------------


def test_v1_status_and_metadata(client: Client) -> None:
    r = client.get("/v1/models/mlp")
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert client.get("/v1/models/mlp/versions/1").status_code == 200
    meta = client.get("/v1/models/mlp/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "4"]
    assert client.get("/v1/models/mlp/versions/1/metadata").json()["model_spec"]["version"] == "1"
    assert "nope" in error(client.get("/v1/models/nope"), 404)
    assert "version 9" in error(client.get("/v1/models/mlp/versions/9/metadata"), 404)
    assert error(client.get("/v1/models/mlp/versions/abc"), 404)


def test_v1_predict_row_and_columnar(client: Client, model_files: Models) -> None:
    want = reference(model_files, X)
    r = client.post("/v1/models/mlp:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], want, atol=1e-4)
    r = client.post(
        "/v1/models/mlp/versions/1:predict", json={"signature_name": "serving_default", "inputs": X.tolist()}
    )
    np.testing.assert_allclose(r.json()["outputs"], want, atol=1e-4)
    r = client.post("/v1/models/mlp:predict", json={"inputs": {"x": X.tolist()}})
    np.testing.assert_allclose(r.json()["outputs"], want, atol=1e-4)
    r = client.post("/v1/models/mlp:predict", json={"instances": [{"x": row} for row in X.tolist()]})
    np.testing.assert_allclose(r.json()["predictions"], want, atol=1e-4)


def test_v1_multi_input_multi_output(client: Client) -> None:
    a, b = X[:, :3], X[:, 1:]
    r = client.post(
        "/v1/models/two:predict",
        json={"instances": [{"a": x.tolist(), "b": y.tolist()} for x, y in zip(a, b, strict=True)]},
    )
    preds = r.json()["predictions"]
    assert len(preds) == 4
    np.testing.assert_allclose([p["sum"] for p in preds], a + b, rtol=1e-6)
    np.testing.assert_allclose([p["prod"] for p in preds], a * b, rtol=1e-6)
    r = client.post("/v1/models/two:predict", json={"inputs": {"a": a.tolist(), "b": b.tolist()}})
    np.testing.assert_allclose(r.json()["outputs"]["prod"], a * b, rtol=1e-6)
    assert "several inputs" in error(client.post("/v1/models/two:predict", json={"instances": a.tolist()}), 400)


def test_v1_b64_nan_fixed_batch_and_int8(client: Client, model_files: Models) -> None:
    rows = [{"b64": base64.b64encode(row.tobytes()).decode()} for row in X]
    r = client.post("/v1/models/mlp:predict", json={"instances": rows})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], reference(model_files, X), atol=1e-4)
    r = client.post(
        "/v1/models/mlp:predict",
        content=b'{"instances": [[NaN, 1, 2, Infinity]]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert "null" not in r.text  # a NaN input gives NaN outputs, written as NaN (see test_jsonutil.py)
    assert all(math.isnan(v) for v in json.loads(r.text)["predictions"][0])
    r = client.post("/v1/models/fixed1:predict", json={"instances": X.tolist()})
    np.testing.assert_allclose(r.json()["predictions"], reference(model_files, X), atol=1e-4)
    r = client.post("/v1/models/int8:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["predictions"]).shape == (4, 3)


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (b"{not json", ["malformed JSON"]),
        (b"[1, 2]", ["instances"]),
        (b'{"instances": [[1,2,3,4]], "inputs": [[1,2,3,4]]}', ["exactly one"]),
        (b'{"instances": []}', ["non-empty"]),
        (b'{"instances": [[1,2,3]]}', ["'x'", "float32", "[-1, 4]"]),
        (b'{"instances": [[1,2,3,4],[1,2]]}', ["'x'", "float32"]),
        (b'{"instances": [["a","b","c","d"]]}', ["'x'", "float32"]),
        (b'{"inputs": {"y": [[1,2,3,4]]}}', ["'x'", "float32", "[-1, 4]", "unknown ['y']"]),
        (b'{"instances": [[1,2,3,4]], "signature_name": "other"}', ["signature"]),
        (b'{"instances": [{"b64": "!!!"}]}', ["base64"]),
    ],
)
def test_v1_bad_inputs_are_400_and_name_the_problem(client: Client, body: bytes, needles: list[str]) -> None:
    msg = error(client.post("/v1/models/mlp:predict", content=body), 400)
    for n in needles:
        assert n in msg, msg


def test_v1_routes_and_methods(client: Client) -> None:
    assert error(client.get("/v1/models/mlp:predict"), 405)
    assert error(client.post("/v1/models/mlp:classify", json={}), 501)
    assert error(client.post("/v1/models/mlp:frobnicate", json={}), 404)
    assert error(client.post("/v1/models/nope:predict", json={"instances": [[1]]}), 404)
    assert error(client.post("/v1/models/mlp/versions/5:predict", json={"instances": X.tolist()}), 404)
    assert error(client.get("/nowhere"), 404)


def test_body_limit_is_413(client: Client) -> None:
    big = b'{"instances": [' + b"[1,2,3,4]," * (LIMIT // 10) + b"[1,2,3,4]]}"
    assert "limit" in error(client.post("/v1/models/mlp:predict", content=big), 413)
    assert error(client.post("/v2/models/mlp/infer", content=big), 413)


def test_a_full_queue_is_503_at_once_over_http(bundles: dict[str, Path], model_files: Models) -> None:
    """A real full queue: batches of 4 rows, a queue of one batch and a ten-minute timeout, so a
    3-row request waits in the queue for company; 2 more rows cannot fit and are refused at once."""
    rt = Runtime(
        [bundles["mlp"]],
        batching=BatchingOverrides(
            max_batch_size=4, batch_timeout_micros=600_000_000, batch_timeout_policy="fixed", max_enqueued_batches=1
        ),
    )
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    try:
        waiting = asyncio.run_coroutine_threadsafe(
            c.http.post("/v1/models/mlp:predict", json={"instances": X[:3].tolist()}), c.loop
        )
        batcher = rt.get("mlp").batcher
        end = time.monotonic() + 20
        while batcher.queue_depth < 3:  # the 3 rows are queued
            assert time.monotonic() < end, "the first request never reached the queue"
            time.sleep(0.01)
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X[:2].ravel().tolist()}]}
        assert "queue is full" in error(c.post("/v2/models/mlp/infer", json=body), 503)
        assert "queue is full" in error(c.post("/v1/models/mlp:predict", json={"instances": X[:2].tolist()}), 503)
        assert not waiting.done()
        # one row fits and fills the batch: it runs, and the waiting request with it
        r = c.post("/v1/models/mlp:predict", json={"instances": X[3:4].tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], reference(model_files, X[3:4]), atol=1e-4)
        first = waiting.result(20)
        assert first.status_code == 200, first.text
        np.testing.assert_allclose(first.json()["predictions"], reference(model_files, X[:3]), atol=1e-4)
    finally:
        c.close()
        rt.close()


def test_reload_route(client: Client) -> None:
    r = client.post("/v1/models/mlp:reload")
    assert r.status_code == 200
    assert r.json()["model_version_status"][0]["state"] == "AVAILABLE"
    assert error(client.post("/v1/models/nope:reload"), 404)
    assert client.post("/v2/repository/models/mlp/load").status_code == 200
    index = client.post("/v2/repository/index").json()
    assert {"name": "mlp", "version": "1", "state": "READY"} in index


# -- Open Inference Protocol v2 -------------------------------------------------------------------


def test_v2_health_and_metadata(client: Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/int8").json()
    assert meta["name"] == "int8"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "INT8", "shape": [-1, 4]}]
    assert client.get("/v2/models/mlp/versions/1").json()["platform"] == "tensorflow_lite"
    assert client.get("/v2/models/two").json()["platform"] == "onnxruntime_onnx"
    assert client.get("/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    assert client.get("/v2/models/mlp/versions/1/ready").status_code == 200
    assert client.get("/v2/models/mlp/versions/2/ready").status_code == 400
    assert error(client.get("/v2/models/nope/ready"), 404)
    assert error(client.get("/v2/models/nope"), 404)


def test_v2_infer_json(client: Client, model_files: Models) -> None:
    body = {"id": "req-1", "inputs": [{"name": "x", "shape": [4, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    r = client.post("/v2/models/mlp/infer", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "req-1"
    assert doc["model_name"] == "mlp"
    assert doc["model_version"] == "1"
    (out,) = doc["outputs"]
    assert out["name"] == "output_0"
    assert out["shape"] == [4, 3]
    assert out["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(out["data"], (4, 3)), reference(model_files, X), atol=1e-4)
    # nested data is fine too; FP64 data for this FP32 input is not (v2 converts no datatypes)
    body["inputs"][0]["data"] = X.tolist()
    assert client.post("/v2/models/mlp/versions/1/infer", json=body).status_code == 200
    body["inputs"][0]["datatype"] = "FP64"
    assert "FP32" in error(client.post("/v2/models/mlp/versions/1/infer", json=body), 400)


def test_v2_output_selection(client: Client) -> None:
    a = X[:, :3]
    body = {
        "inputs": [
            {"name": "a", "shape": [4, 3], "datatype": "FP32", "data": a.ravel().tolist()},
            {"name": "b", "shape": [4, 3], "datatype": "FP32", "data": a.ravel().tolist()},
        ],
        "outputs": [{"name": "prod"}],
    }
    outs = client.post("/v2/models/two/infer", json=body).json()["outputs"]
    assert [o["name"] for o in outs] == ["prod"]
    body["outputs"] = [{"name": "nope"}]
    assert "nope" in error(client.post("/v2/models/two/infer", json=body), 400)


def binary_request(
    inputs: dict[str, np.ndarray], *, binary_out: bool = True, outputs: list[dict[str, Any]] | None = None
) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": "FP32", "parameters": {"binary_data_size": v.nbytes}}
            for k, v in inputs.items()
        ],
        "parameters": {"binary_data_output": binary_out},
    }
    if outputs is not None:
        doc["outputs"] = outputs
    header = json.dumps(doc).encode()
    body = header + b"".join(v.astype("<f4").tobytes() for v in inputs.values())
    return body, {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}


def parse_binary(r: Any) -> dict[str, np.ndarray]:
    n = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:n])
    out, pos = {}, n
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(r.content[pos : pos + size], dtype="<f4").reshape(o["shape"])
        pos += size
    return out


def test_v2_binary_in_and_out(client: Client, model_files: Models) -> None:
    body, headers = binary_request({"x": X})
    r = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(parse_binary(r)["output_0"], reference(model_files, X), atol=1e-4)
    # per-output choice: JSON for one output, binary for the other
    a = X[:, :3]
    body, headers = binary_request(
        {"a": a, "b": a},
        binary_out=False,
        outputs=[{"name": "sum"}, {"name": "prod", "parameters": {"binary_data": True}}],
    )
    r = client.post("/v2/models/two/infer", content=body, headers=headers)
    n = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:n])
    assert "data" in doc["outputs"][0]
    np.testing.assert_allclose(np.frombuffer(r.content[n:], "<f4").reshape(4, 3), a * a, rtol=1e-6)


def test_v2_bytes_elements_are_length_prefixed(client: Client) -> None:
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BYTES", "parameters": {"binary_data_size": 4 * 5}}]}
    ).encode()
    raw = b"".join(struct.pack("<I", 1) + b"a" for _ in range(4))
    r = client.post(
        "/v2/models/mlp/infer", content=header + raw, headers={"inference-header-content-length": str(len(header))}
    )
    msg = error(r, 400)  # decoded fine, but the model wants FP32
    assert "'x'" in msg
    assert "float32" in msg


@pytest.mark.parametrize(
    ("doc", "needles"),
    [
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}, ["'x'", "4 elements"]),
        (
            {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            ["'x'", "float32", "[-1, 4]"],
        ),
        (
            {"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
            ["'x'", "float32", "[-1, 4]"],
        ),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP99", "data": [1, 2, 3, 4]}]}, ["unknown datatype"]),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]},
            ["'x'", "FP32"],
        ),
        ({"inputs": [{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": [1]}]}, ["'x'", "shape"]),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, ["'x'", "data"]),
        ({"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}]}, ["'x'", "at least one row"]),
        ({"inputs": []}, ["inputs"]),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]},
            ["binary_data_size"],
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}], "outputs": "all"},
            ["outputs"],
        ),
    ],
)
def test_v2_bad_inputs_are_400_and_name_the_problem(client: Client, doc: dict[str, Any], needles: list[str]) -> None:
    msg = error(client.post("/v2/models/mlp/infer", json=doc), 400)
    for n in needles:
        assert n in msg, msg


def test_v2_bad_binary_framing(client: Client) -> None:
    body, headers = binary_request({"x": X})
    headers["inference-header-content-length"] = str(len(body) + 10)
    assert "larger than the body" in error(client.post("/v2/models/mlp/infer", content=body, headers=headers), 400)
    headers["inference-header-content-length"] = "abc"
    assert error(client.post("/v2/models/mlp/infer", content=body, headers=headers), 400)
    body, headers = binary_request({"x": X})
    assert "after the last input" in error(
        client.post("/v2/models/mlp/infer", content=body + b"xx", headers=headers), 400
    )
    doc = json.loads(body[: int(headers["inference-header-content-length"])])
    doc["inputs"][0]["parameters"]["binary_data_size"] = 60  # not 4 x 4 x 4 bytes
    header = json.dumps(doc).encode()
    r = client.post(
        "/v2/models/mlp/infer",
        content=header + body[-64:][:60],
        headers={"inference-header-content-length": str(len(header))},
    )
    assert "needs 64 bytes" in error(r, 400)


def test_garbage_never_crashes_the_server(client: Client) -> None:
    rng = random.Random(0)
    samples = [
        b"",
        b"null",
        b"{}",
        b'{"inputs": null}',
        b'{"instances": {"x": 1}}',
        b"\xff\xfe\x00",
        b"[" * 5000 + b"]" * 5000,
    ]
    samples += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(30)]
    for body in samples:
        for url in ("/v1/models/mlp:predict", "/v2/models/mlp/infer", "/v2/models/two/infer", "/v1/models/two:predict"):
            r = client.post(url, content=body)
            assert 400 <= r.status_code < 500, (url, body[:50], r.text)
    # and still serves
    assert client.post("/v1/models/mlp:predict", json={"instances": X.tolist()}).status_code == 200


# -- metrics and OpenAPI --------------------------------------------------------------------------


def test_metrics(client: Client) -> None:
    client.post("/v1/models/mlp:predict", json={"instances": X.tolist()})
    client.post("/v1/models/mlp:predict", json={"instances": [[1]]})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'edgekit_requests_total{model="mlp",version="1"}' in text
    assert 'edgekit_request_errors_total{code="400",model="mlp",version="1"}' in text
    assert 'edgekit_request_latency_seconds_bucket{le="0.005",model="mlp",version="1"}' in text
    assert 'edgekit_batch_size_count{model="mlp",version="1"}' in text
    assert 'edgekit_queue_depth{model="mlp",version="1"} 0.0' in text


def test_openapi_matches_the_router(client: Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(m, p) for m, p, _, _ in ROUTES}
    for method, path, _, _ in ROUTES:
        url = path.replace("{model}", "mlp").replace("{version}", "1")
        r = client.request(method.upper(), url, content=b"{}")
        assert not (r.status_code == 404 and "no route" in r.text), (method, path)
        assert r.status_code != 405, (method, path)


def test_overload_warnings_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    from edgekit_runtime.server.errors import _Throttle, error_reply

    throttle = _Throttle(interval=60)
    with caplog.at_level("WARNING", logger="edgekit_runtime.server"):
        for _ in range(100):
            throttle.warn("UnavailableError", "queue full")
        throttle._last["UnavailableError"] -= 61  # the interval has passed
        throttle.warn("UnavailableError", "queue full")
    assert [r.getMessage() for r in caplog.records] == [
        "UnavailableError: queue full",
        "UnavailableError: queue full (and 99 more like it since the last line)",
    ]
    assert error_reply(UnavailableError("queue full")).status == 503
