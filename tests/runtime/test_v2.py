"""The Open Inference Protocol's typing: every datatype decoded exactly, mismatches and bad values are 400s."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.config import Config, ModelConfig, VersionPolicy
from edgekit_runtime.server import create_app, v2
from edgekit_runtime.tensors import numpy_dtype
from tests.runtime import models
from tests.runtime.conftest import Client
from tests.runtime.fuzzing import IDENTITY_DATATYPES, error, identity_bundles, identity_name, sample


@pytest.fixture(scope="module")
def runtime(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    d = tmp_path_factory.mktemp("typed")
    typed = identity_bundles(d)
    strings = models.make_bundle(
        d / "id_bytes.ekb", name="id_bytes", version=1, fmt="onnx", model=models.onnx_identity_of("STRING", ["n", 2])
    )
    rt = Runtime([bundles["mlp"], bundles["int8"], bundles["two"], *typed, strings])
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


def post_binary(client: Client, model: str, doc: dict[str, Any], raw: bytes) -> Any:
    """An infer request in the binary extension's layout: the JSON header ``doc``, then ``raw``."""
    header = json.dumps(doc).encode()
    return client.post(
        f"/v2/models/{model}/infer", content=header + raw, headers={"inference-header-content-length": str(len(header))}
    )


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


# -- exact messages: what a client reads when its request is wrong --------------------------------

SHAPE_MSG = "input 'x': 'shape' must be a list of non-negative integers, got "
ELEMENT_MSG = "each element of 'inputs' must be an object with 'name', 'shape', 'datatype' and 'data'"
TWO_INPUTS = "'a' FP32 (float32) shape [-1, 3], 'b' FP32 (float32) shape [-1, 3]"
X = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}
AB = [{**X, "name": "a", "shape": [1, 3], "data": [1, 2, 3]}, {**X, "name": "b", "shape": [1, 3], "data": [1, 2, 3]}]


@pytest.mark.parametrize(
    ("model", "doc", "message"),
    [
        ("id_fp32", [1], "the body must be a JSON object with a non-empty 'inputs' list"),
        ("id_fp32", {"inputs": [5]}, ELEMENT_MSG),
        ("id_fp32", {"inputs": [{"shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}, ELEMENT_MSG),
        ("id_fp32", {"inputs": [{"name": "x", "datatype": "FP32", "data": [1, 2]}]}, SHAPE_MSG + "None"),
        ("id_fp32", {"inputs": [{**X, "shape": [-1, 2]}]}, SHAPE_MSG + "[-1, 2]"),
        ("id_fp32", {"inputs": [{**X, "shape": [True, 2]}]}, SHAPE_MSG + "[True, 2]"),
        ("id_fp32", {"inputs": [{**X, "shape": [1.5, 2]}]}, SHAPE_MSG + "[1.5, 2]"),
        (
            "id_fp32",
            {"inputs": [{"name": "x", "shape": [1, 2], "data": [1, 2]}]},
            "input 'x': 'datatype' is missing (one of BOOL, UINT8..64, INT8..64, FP16, FP32, FP64, BYTES)",
        ),
        ("id_fp32", {"inputs": [{**X, "parameters": 5}]}, "input 'x': 'parameters' must be an object"),
        ("id_fp32", {"id": 7, "inputs": [X]}, "'id' must be a string, got int"),
        ("id_fp32", {"inputs": [X, X]}, "input 'x' is given twice"),
        (
            "id_fp32",
            {"inputs": [{**X, "shape": [1] * 99 + [2]}]},
            f"input 'x': shape {[1] * 99 + [2]} is not a shape an array can have",
        ),
        (
            "id_fp32",
            {"inputs": [{**X, "datatype": "INT32"}]},
            "input 'x' is INT32, but model 'id_fp32' expects 'x' FP32 (float32) shape [-1, 2]; "
            "send FP32 data (the v2 protocol converts no datatypes)",
        ),
        ("two", {"inputs": [{**X, "name": "nope"}]}, f"model 'two' has no input 'nope'; its inputs: {TWO_INPUTS}"),
        ("id_fp32", {"inputs": [X], "outputs": 5}, "'outputs' must be a list of {'name': ...} objects"),
        (
            "two",
            {"inputs": AB, "outputs": [{"name": "nope"}]},
            "requested output 'nope' does not exist; outputs are: sum, prod",
        ),
        ("two", {"inputs": AB, "outputs": ["nope"]}, "requested output 'nope' does not exist; outputs are: sum, prod"),
    ],
)
def test_bad_infer_documents_are_400_with_the_exact_message(client: Client, model: str, doc: Any, message: str) -> None:
    assert error(client.post(f"/v2/models/{model}/infer", json=doc)) == message


def bytes_input(raw: bytes, shape: list[int], name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}


def fp32_input(size: int) -> dict[str, Any]:
    return {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(
    ("doc", "raw", "message"),
    [
        (
            {"inputs": [bytes_input(struct.pack("<I", 5) + b"ab", [1])]},
            struct.pack("<I", 5) + b"ab",
            "input 'x': BYTES element 0 is longer than the data",
        ),
        (
            {"inputs": [bytes_input(struct.pack("<I", 1) + b"azz", [1])]},
            struct.pack("<I", 1) + b"azz",
            "input 'x': 2 bytes left after 1 BYTES elements",
        ),
        ({"inputs": [fp32_input(-1)]}, bytes(8), "input 'x': binary_data_size -1 does not fit the 8 binary bytes left"),
        (
            {"inputs": [fp32_input(8), fp32_input(100)]},
            bytes(8),
            "input 'x': binary_data_size 100 does not fit the 0 binary bytes left",
        ),
        ({"inputs": [fp32_input(8)]}, bytes(12), "4 bytes of binary data after the last input"),
        (
            {"inputs": [{**fp32_input(2), "datatype": "BOOL"}]},
            bytes([1, 2]),
            "input 'x': BOOL binary data must be bytes 0 (false) or 1 (true)",
        ),
    ],
)
def test_bad_binary_data_is_400_with_the_exact_message(
    client: Client, doc: dict[str, Any], raw: bytes, message: str
) -> None:
    model = "id_bool" if doc["inputs"][0]["datatype"] == "BOOL" else "id_fp32"
    assert error(post_binary(client, model, doc, raw)) == message


def test_binary_bytes_elements_are_decoded_one_by_one(runtime: Runtime) -> None:
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (b"ab", b"", b"c", b"def"))
    header = json.dumps({"inputs": [bytes_input(raw, [2, 2])]}).encode()
    feeds, _, _ = v2.decode(header + raw, len(header), runtime.get("id_bytes"))
    assert feeds["x"].dtype == object
    assert feeds["x"].tolist() == [[b"ab", b""], [b"c", b"def"]]


def test_a_big_json_header_with_binary_data_is_read_like_a_small_one(client: Client) -> None:
    # over 32 KiB, the header takes the fast JSON path, which turns "data" lists into arrays
    x = np.arange(2 * 100, dtype=np.float32)
    doc = {"id": "i" * 40000, "inputs": [{"name": "x", "shape": [100, 2], "datatype": "FP32", "data": x.tolist()}]}
    r = post_binary(client, "id_fp32", doc, b"")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == doc["id"]
    np.testing.assert_array_equal(r.json()["outputs"][0]["data"], x)


def test_binary_data_decodes_the_same_on_the_big_endian_path(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # the host here is little-endian; the other branch reads the data as little-endian explicitly
    monkeypatch.setattr(v2, "_LITTLE", False)
    x = np.array([[1.5, -2.0]], dtype="<f4")
    r = binary_infer(client, "id_fp32", "FP32", x.tobytes(), [1, 2])
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1.5, -2.0]


def test_an_outputs_own_parameters_without_binary_data_keep_the_requests_choice(client: Client) -> None:
    doc = {
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.0]}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "y", "parameters": {}}],
    }
    r = client.post("/v2/models/id_fp32/infer", json=doc)
    assert r.status_code == 200, r.text
    header = json.dumps(
        {
            "model_name": "id_fp32",
            "model_version": "1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}],
        },
        separators=(",", ":"),
    ).encode()
    assert r.headers["inference-header-content-length"] == str(len(header))
    assert r.content == header + np.array([1.5, 2.0], "<f4").tobytes()


def test_several_binary_outputs_follow_the_header_back_to_back(client: Client) -> None:
    a, b = [1.0, 2.0, 3.0], [2.0, 0.5, -1.0]
    doc = {
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": a},
            {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": b},
        ],
        "parameters": {"binary_data_output": True},
    }
    r = client.post("/v2/models/two/infer", json=doc)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    sizes = [o["parameters"]["binary_data_size"] for o in json.loads(r.content[:n])["outputs"]]
    assert sizes == [12, 12]
    want = np.add(a, b, dtype="<f4").tobytes() + np.multiply(a, b, dtype="<f4").tobytes()
    assert r.content[n:] == want


def test_only_requests_to_the_default_version_reach_the_models_tap(client: Client, runtime: Runtime) -> None:
    seen: list[tuple[str, int]] = []
    runtime.set_tap("id_fp32", lambda lm, inputs, outputs: seen.append((lm.name, lm.version)))
    try:
        body = {"inputs": [X]}
        assert client.post("/v2/models/id_fp32/versions/1/infer", json=body).status_code == 200  # pinned
        assert seen == []
        assert client.post("/v2/models/id_fp32/infer", json=body).status_code == 200
        assert seen == [("id_fp32", 1)]
    finally:
        runtime.set_tap("id_fp32", None)


def test_metadata_lists_every_served_version_unless_one_is_asked(bundles: dict[str, Path]) -> None:
    cfg = Config(models={"mlp": ModelConfig(version_policy=VersionPolicy(latest=2))})
    rt = Runtime([bundles["mlp"], bundles["mlp_v2"]], config=cfg)
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    try:
        assert c.get("/v2/models/mlp").json()["versions"] == ["2", "1"]
        assert c.get("/v2/models/mlp/versions/1").json()["versions"] == ["1"]
        assert c.get("/v2/models/mlp/versions/2").json()["versions"] == ["2"]
    finally:
        c.close()
        rt.close()


def test_load_of_a_model_that_cannot_serve_is_400_saying_why(bundles: dict[str, Path]) -> None:
    rt = Runtime([bundles["mlp_bad"]])  # its only version fails its golden samples
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    try:
        ready = c.get("/v2/models/mlp/ready")
        assert ready.status_code == 400
        why = ready.json()["error"]
        assert why.startswith("model 'mlp' has no version ready: version 3 failed: ")
        r = c.post("/v2/repository/models/mlp/load")
        assert (r.status_code, r.json()) == (400, {"error": why})
        r = c.post("/v2/repository/models/nope/load")
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope' is not served here; served models: mlp"})
    finally:
        c.close()
        rt.close()
