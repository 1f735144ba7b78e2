"""The Open Inference Protocol's typing: every datatype decoded exactly, mismatches and bad values are 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.server import create_app
from edgekit_runtime.tensors import numpy_dtype
from tests.runtime.conftest import Client
from tests.runtime.fuzzing import IDENTITY_DATATYPES, error, identity_bundles, identity_name, sample


@pytest.fixture(scope="module")
def runtime(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    typed = identity_bundles(tmp_path_factory.mktemp("typed"))
    rt = Runtime([bundles["mlp"], bundles["int8"], *typed])
    rt.start(poll_seconds=0)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> Iterator[Client]:
    c = Client(create_app(runtime))
    yield c
    c.close()


def infer(client: Client, model: str, datatype: str, data: Any, shape: list[int] | None = None) -> Any:
    shape = shape if shape is not None else [1, len(data)] if isinstance(data, list) else [1, 1]
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    return client.post(f"/v2/models/{model}/infer", json=body)


def binary_infer(client: Client, model: str, datatype: str, raw: bytes, shape: list[int]) -> Any:
    params = {"binary_data_size": len(raw)}
    doc = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "parameters": params}]}
    header = json.dumps(doc).encode()
    return client.post(
        f"/v2/models/{model}/infer", content=header + raw, headers={"inference-header-content-length": str(len(header))}
    )


@pytest.mark.parametrize("datatype", list(IDENTITY_DATATYPES))
def test_every_datatype_round_trips_exactly(client: Client, datatype: str) -> None:
    x = sample(datatype, rows=3)
    data = x.ravel().tolist()
    r = infer(client, identity_name(datatype), datatype, data, [3, 2])
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["datatype"] == datatype
    np.testing.assert_array_equal(np.asarray(out["data"], dtype=numpy_dtype(datatype)), x.ravel())
    r = binary_infer(client, identity_name(datatype), datatype, x.astype(x.dtype.newbyteorder("<")).tobytes(), [3, 2])
    assert r.status_code == 200, r.text


def test_int8_out_of_range_is_a_400_naming_input_datatype_and_range(client: Client) -> None:
    # was: 500 "internal error: OverflowError: Python integer 200 out of bounds for int8"
    msg = error(infer(client, "int8", "INT8", [200, 1, 2, 3]))
    for needle in ("'x'", "INT8", "[-128, 127]", "200"):
        assert needle in msg, msg


@pytest.mark.parametrize(
    ("datatype", "bad"),
    [
        ("INT8", -129),
        ("UINT8", -1),
        ("UINT8", 256),
        ("INT16", 40000),
        ("UINT16", 70000),
        ("INT32", 2**31),
        ("UINT32", -1),
        ("INT64", 2**63),
        ("UINT64", -1),
        ("FP16", 1e6),
        ("FP32", 1e300),
    ],
)
def test_values_outside_the_datatype_are_400(client: Client, datatype: str, bad: float) -> None:
    msg = error(infer(client, identity_name(datatype), datatype, [bad, 0]))
    assert "'x'" in msg
    assert datatype in msg


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("BOOL", [200, 1]),  # was: silently True
        ("BOOL", [1, 0]),  # JSON BOOL data is true / false
        ("BOOL", ["true", "false"]),
        ("INT8", [1.5, 2]),  # was: silently truncated to 1
        ("INT8", ["1", "2"]),  # was: parsed from the strings
        ("INT64", [True, False]),
        ("FP32", ["1.5", "2"]),
        ("FP32", [None, 1.0]),  # was: NaN
        ("FP32", [True, False]),
        ("FP32", [{}, 1.0]),
        ("BYTES", [1, 2]),
    ],
)
def test_values_not_of_the_declared_datatype_are_400(client: Client, datatype: str, data: list[Any]) -> None:
    model = identity_name(datatype) if datatype != "BYTES" else "mlp"
    msg = error(infer(client, model, datatype, data))
    assert "'x'" in msg
    assert datatype in msg


@pytest.mark.parametrize(
    ("model", "datatype", "data"),
    [
        ("mlp", "INT8", [1, 2, 3, 4]),  # was: accepted and cast
        ("mlp", "BOOL", [True, False, True, True]),  # was: accepted as 1.0 / 0.0
        ("mlp", "FP64", [0.5, 1, 2, 3]),  # was: accepted and rounded to float32
        ("mlp", "FP16", [0.5, 1, 2, 3]),
        ("int8", "FP32", [0.5, 1, 2, 3]),  # quantizing is the client's job on v2
        ("int8", "INT16", [1, 2, 3, 4]),
    ],
)
def test_a_datatype_other_than_the_models_is_400_naming_both(
    client: Client, runtime: Runtime, model: str, datatype: str, data: list[Any]
) -> None:
    msg = error(infer(client, model, datatype, data, [1, 4]))
    want = {"mlp": "FP32", "int8": "INT8"}[model]
    assert "'x'" in msg
    assert datatype in msg
    assert want in msg


def test_binary_datatype_mismatch_is_400(client: Client) -> None:
    msg = error(binary_infer(client, "mlp", "INT32", np.arange(4, dtype="<i4").tobytes(), [1, 4]))
    assert "INT32" in msg
    assert "FP32" in msg
    msg = error(binary_infer(client, "mlp", "FP64", np.arange(4, dtype="<f8").tobytes(), [1, 4]))
    assert "FP64" in msg


def test_binary_bool_bytes_must_be_0_or_1(client: Client) -> None:
    msg = error(binary_infer(client, "id_bool", "BOOL", bytes([1, 200]), [1, 2]))
    assert "'x'" in msg
    assert "BOOL" in msg


def test_an_unknown_input_name_lists_the_models_inputs(client: Client) -> None:
    body = {"inputs": [{"name": "nope", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    msg = error(client.post("/v2/models/mlp/infer", json=body))
    assert "'nope'" in msg
    assert "'x' FP32 (float32) shape [-1, 4]" in msg


@pytest.mark.parametrize(
    "shape",
    [[0, 10**30], [0, 2**62, 2**62], [1] * 100, [2**40, 2]],
)
def test_impossible_shapes_are_400(client: Client, shape: list[int]) -> None:
    for datatype, model in (("FP32", "id_fp32"), ("BYTES", "mlp")):
        body = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": []}]}
        error(client.post(f"/v2/models/{model}/infer", json=body))
        header = json.dumps(
            {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": 0}}]}
        ).encode()
        r = client.post(
            f"/v2/models/{model}/infer", content=header, headers={"inference-header-content-length": str(len(header))}
        )
        error(r)


@pytest.mark.parametrize("request_id", [b"7", b"null", b'{"a": 1}', b"[1]", b'{"a":' * 1000 + b"1" + b"}" * 1000])
def test_the_id_must_be_a_string(client: Client, request_id: bytes) -> None:
    # any JSON value was echoed into the reply; one nested 1000 deep made the JSON writer raise (a 500)
    inputs = b'[{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]'
    body = b'{"id": ' + request_id + b', "inputs": ' + inputs + b"}"
    assert "'id'" in error(client.post("/v2/models/id_fp32/infer", content=body))


def test_integral_numbers_are_integers(client: Client) -> None:
    # JSON (and JSON Schema) do not tell 2 from 2.0: the conversion is exact, so it is accepted
    body = {"inputs": [{"name": "x", "shape": [1.0, 2.0], "datatype": "INT32", "data": [1.0, -2.0]}]}
    r = client.post("/v2/models/id_int32/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1, -2]
    body["inputs"][0]["data"] = [1e10, 0]
    assert "[-2147483648, 2147483647]" in error(client.post("/v2/models/id_int32/infer", json=body))


def test_nan_and_infinity_are_fp_values(client: Client) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [NaN, Infinity]}]}'
    r = client.post("/v2/models/id_fp32/infer", content=body)
    assert r.status_code == 200, r.text


def test_500s_are_counted_too(client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = runtime.get("id_fp32")

    def broken(*_: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lm, "finish", broken)
    r = infer(client, "id_fp32", "FP32", [1, 2])
    assert r.status_code == 500
    assert "ZeroDivisionError" in r.json()["error"]
    client.get("/v2/models/nope")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert 'edgekit_request_errors_total{code="500",model="id_fp32",version="1"} 1.0' in text
    assert 'edgekit_http_errors_total{code="500",kind="ZeroDivisionError"} 1.0' in text
    assert 'edgekit_http_errors_total{code="404",kind="NotFoundError"}' in text
    assert 'edgekit_http_errors_total{code="404",kind="RouteNotFoundError"}' in text


# -- metadata, readiness and the repository routes: whole documents -----------------------------


def test_model_metadata_is_the_whole_protocol_document(client: Client) -> None:
    doc = {
        "name": "mlp",
        "versions": ["1"],
        "platform": "tensorflow_lite",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}],
    }
    r = client.get("/v2/models/mlp")
    assert r.status_code == 200
    assert r.json() == doc
    assert client.get("/v2/models/mlp/versions/1").json() == doc
    assert client.get("/v2/models/mlp/versions/2").status_code == 404  # the version asked, not the newest


def test_model_ready_says_why_not(client: Client) -> None:
    assert client.get("/v2/models/mlp/versions/1/ready").json() == {"name": "mlp", "ready": True}
    r = client.get("/v2/models/mlp/versions/2/ready")
    assert r.status_code == 400
    doc = r.json()
    assert set(doc) == {"name", "ready", "error"}
    assert (doc["name"], doc["ready"]) == ("mlp", False)
    assert "version 2" in doc["error"]


def test_load_retries_the_model_and_answers_an_empty_object(client: Client) -> None:
    r = client.post("/v2/repository/models/mlp/load")
    assert (r.status_code, r.json()) == (200, {})
    r = client.post("/v2/repository/models/nope/load")
    assert r.status_code == 404
    assert "nope" in r.json()["error"]


def test_binary_outputs_are_raw_little_endian_and_bytes_are_length_prefixed() -> None:
    from edgekit_runtime.server.v2 import _raw

    assert _raw(np.array([[1, 2], [3, 4]], dtype="<i2")) == b"\x01\x00\x02\x00\x03\x00\x04\x00"
    assert _raw(np.array([1, 2], dtype=">i2")) == b"\x01\x00\x02\x00"  # big-endian data leaves little-endian
    assert _raw(np.array([1.0], dtype=">f4")) == np.array([1.0], "<f4").tobytes()
    assert _raw(np.arange(6, dtype="<i4").reshape(2, 3).T) == np.arange(6, dtype="<i4").reshape(2, 3).T.tobytes()
    text = np.array([[b"ab", "c"], [b"", 7]], dtype=object)
    assert _raw(text) == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c\x00\x00\x00\x00\x01\x00\x00\x007"
