"""TF Serving REST: edge cases the fuzzers found (odd numbers, deep nesting and odd versions are 4xx, never 500)
and the metadata and status documents, whole."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.server import create_app, v1
from edgekit_runtime.tensors import TensorSpec
from tests.runtime import models
from tests.runtime.conftest import Client
from tests.runtime.fuzzing import error, identity_bundles


@pytest.fixture(scope="module")
def runtime(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    d = tmp_path_factory.mktemp("typed")
    typed = identity_bundles(d, ["INT32", "FP16", "BOOL"])
    # strings, and a dynamic dimension after a fixed one (x: float32[-1, 1, -1])
    strings = models.make_bundle(
        d / "id_bytes.ekb", name="id_bytes", version=1, fmt="onnx", model=models.onnx_identity_of("STRING", ["n", 2])
    )
    inner = models.make_bundle(
        d / "id_inner.ekb",
        name="id_inner",
        version=1,
        fmt="onnx",
        model=models.onnx_identity_of("FLOAT", ["n", 1, "m"]),
    )
    rt = Runtime([bundles["mlp"], bundles["int8"], bundles["two"], *typed, strings, inner])
    rt.start(poll_seconds=0)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> Iterator[Client]:
    c = Client(create_app(runtime))
    yield c
    c.close()


@pytest.mark.parametrize(
    ("model", "body", "needles"),
    [
        # a NaN sends the body to the stdlib parser, which keeps a 400-digit integer exact: was OverflowError
        ("mlp", b'{"instances": [[NaN, 1' + b"0" * 400 + b", 1, 2]]}", ["'x'", "float32"]),
        ("mlp", b'{"instances": [[1e300, 1, 2, 3]]}', ["'x'", "float32"]),  # was: inf (a warning)
        ("id_fp16", b'{"instances": [[70000, 1]]}', ["'x'", "float16"]),
        ("mlp", b'{"instances": [[true, false, true, true]]}', ["'x'", "float32"]),  # was: 1.0 / 0.0
        ("mlp", b'{"instances": [["1", "2", "3", "4"]]}', ["'x'", "float32"]),  # was: parsed from the strings
        ("mlp", b'{"instances": [[null, 1, 2, 3]]}', ["'x'", "float32"]),  # was: NaN
        ("int8", b'{"instances": [[NaN, 1, 2, 3]]}', ["'x'", "NaN"]),  # quantizing NaN was garbage (a warning)
        ("int8", b'{"instances": [[1e300, 1, 2, 3]]}', ["'x'"]),  # saturates like any large value: see below
        ("id_int32", b'{"instances": [[Infinity, 1]]}', ["'x'", "NaN or infinite"]),  # np.mod(inf) warned
        ("id_int32", b'{"instances": [[1e300, 1]]}', ["'x'", "[-2147483648, 2147483647]"]),  # a cast wrapped
        ("id_int32", b'{"instances": [[3000000000, 1]]}', ["'x'", "[-2147483648, 2147483647]"]),
        ("id_bool", b'{"instances": [[1, 2]]}', ["'x'", "bool"]),
    ],
)
def test_odd_numbers(client: Client, model: str, body: bytes, needles: list[str]) -> None:
    r = client.post(f"/v1/models/{model}:predict", content=body)
    if model == "int8" and b"1e300" in body:
        assert r.status_code == 200, r.text  # a quantized input saturates out-of-range floats (documented)
        return
    msg = error(r)
    for n in needles:
        assert n in msg, msg


def test_deeply_nested_b64_is_400(client: Client) -> None:
    # {"b64": ...} leaves are decoded recursively: 1000 levels used to raise RecursionError (500)
    body = b'{"instances": ' + b"[" * 1000 + b'{"b64": "AAAA"}' + b"]" * 1000 + b"}"
    error(client.post("/v1/models/mlp:predict", content=body))
    body = b'{"instances": [[1, 2, 3, 4], ' + b"[" * 1000 + b'{"b64": "AAAA"}' + b"]" * 1000 + b"]}"
    error(client.post("/v1/models/mlp:predict", content=body))


@pytest.mark.parametrize("version", ["%C2%B9", "%C2%B3", "1_0", "+1", "%201", "9" * 5000, "0", "-1"])
def test_odd_versions_are_404(client: Client, version: str) -> None:
    # '¹'.isdigit() is True but int('¹') raises: was a 500 on every versioned route
    for url in (
        f"/v1/models/mlp/versions/{version}",
        f"/v1/models/mlp/versions/{version}/metadata",
        f"/v2/models/mlp/versions/{version}",
        f"/v2/models/mlp/versions/{version}/ready",
    ):
        r = client.get(url)
        assert r.status_code in (400, 404), (url, r.text)
        assert "error" in r.json()
    error(client.post(f"/v1/models/mlp/versions/{version}:predict", json={"instances": [[1, 2, 3, 4]]}), 404)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    error(client.post(f"/v2/models/mlp/versions/{version}/infer", json=body), 404)


def test_metadata_is_tf_servings_whole_document(client: Client) -> None:
    tensor = {
        "x": {"dtype": "DT_FLOAT", "name": "x", "unknown_rank": False, "dims": ["-1", "4"]},
        "output_0": {"dtype": "DT_FLOAT", "name": "output_0", "unknown_rank": False, "dims": ["-1", "3"]},
    }

    def info(name: str) -> dict[str, Any]:
        t = tensor[name]
        return {
            "dtype": t["dtype"],
            "tensor_shape": {"dim": [{"size": d, "name": ""} for d in t["dims"]], "unknown_rank": False},
            "name": t["name"],
        }

    want = {
        "model_spec": {"name": "mlp", "signature_name": "", "version": "1"},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    "serving_default": {
                        "inputs": {"x": info("x")},
                        "outputs": {"output_0": info("output_0")},
                        "method_name": "tensorflow/serving/predict",
                    }
                }
            }
        },
    }
    r = client.get("/v1/models/mlp/metadata")
    assert r.status_code == 200
    assert r.json() == want
    assert client.get("/v1/models/mlp/versions/1/metadata").json() == want
    int8 = client.get("/v1/models/int8/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert int8["serving_default"]["inputs"]["x"]["dtype"] == "DT_INT8"


def test_status_is_tf_servings_whole_document(client: Client) -> None:
    want = {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert client.get("/v1/models/mlp").json() == want
    assert client.get("/v1/models/mlp/versions/1").json() == want
    r = client.post("/v1/models/mlp:reload")
    assert (r.status_code, r.json()) == (200, want)


def test_tf_serving_names_a_dtype_it_lacks_dt_invalid() -> None:
    assert v1._tensor_info(TensorSpec(name="z", dtype="complex64", shape=[-1, 2])) == {
        "dtype": "DT_INVALID",
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "2", "name": ""}], "unknown_rank": False},
        "name": "z",
    }


INT32_EXPECTED = "dtype int32, shape [-1, 2]"
INT32_INPUTS = "x (dtype int32, shape [-1, 2] (-1 = any size))"
SAME_INPUTS = "every instance must be an object with the same inputs (['x'])"


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        ("id_int32", b"[1]", 'the body must be a JSON object with "instances" (rows) or "inputs" (columns)'),
        (
            "id_int32",
            b'{"instances": [], "inputs": []}',
            'give exactly one of "instances" (row format) or "inputs" (columnar format)',
        ),
        ("id_int32", b'{"instances": {}}', '"instances" must be a non-empty list, one element per row'),
        ("id_int32", b'{"instances": [{"x": [1, 2]}, {"y": [1, 2]}]}', f"{SAME_INPUTS}; one lacks 'x'"),
        ("id_int32", b'{"instances": [{"x": [1, 2]}, [1, 2]]}', f"{SAME_INPUTS}; one lacks 'x'"),
        ("id_int32", b'{"instances": [{"x": [1, 2]}, {"x": [1, 2], "y": [1]}]}', SAME_INPUTS),
        (
            "two",
            b'{"inputs": [[1, 2, 3]]}',
            'this model has several inputs; send "inputs" as an object: '
            "a (dtype float32, shape [-1, 3] (-1 = any size)), b (dtype float32, shape [-1, 3] (-1 = any size))",
        ),
        (
            "id_int32",
            b'{"instances": [["a", "b"]]}',
            f"input 'x' has non-numeric or ragged values; expected {INT32_EXPECTED}",
        ),
        # an input the model lacks: what the model takes instead
        (
            "id_int32",
            b'{"inputs": {"y": [["a"]]}}',
            f"input 'y' has non-numeric or ragged values; expected {INT32_INPUTS}",
        ),
        (
            "id_int32",
            b'{"inputs": {"y": [[{"b64": "YQ=="}]]}}',
            f"model 'id_int32' expects inputs: {INT32_INPUTS}; missing ['x']; unknown ['y']",
        ),
        ("id_int32", b'{"instances": [[{"b64": "!!!"}]]}', "input 'x': invalid base64 in a {'b64': ...} value"),
    ],
)
def test_bad_predict_bodies_are_400_with_the_exact_message(
    client: Client, model: str, body: bytes, message: str
) -> None:
    assert error(client.post(f"/v1/models/{model}:predict", content=body)) == message


def test_a_ragged_array_is_400_naming_the_input_and_what_it_expects(client: Client) -> None:
    msg = error(client.post("/v1/models/id_int32:predict", content=b'{"instances": [[1, 2], [1]]}'))
    assert msg.startswith("input 'x' is not a well-formed array (")  # then numpy's own words
    assert msg.endswith(f"); expected {INT32_EXPECTED}")


def test_the_default_signature_may_be_named_or_empty(client: Client) -> None:
    for sig in ("", "serving_default"):
        r = client.post("/v1/models/id_int32:predict", json={"instances": [[1, 2]], "signature_name": sig})
        assert (r.status_code, r.json()) == (200, {"predictions": [[1, 2]]})


def row_b64(*values: float) -> dict[str, str]:
    return {"b64": base64.b64encode(np.array(values, dtype="<f4").tobytes()).decode()}


def test_b64_rows_of_a_numeric_input_take_the_shape_after_the_batch_dimension(client: Client) -> None:
    # x: float32[-1, 1, -1]: each b64 value is one row of 1 x (any number) floats
    r = client.post("/v1/models/id_inner:predict", json={"instances": [row_b64(0, 1, 2), row_b64(3, 4, 5)]})
    assert (r.status_code, r.json()) == (200, {"predictions": [[[0.0, 1.0, 2.0]], [[3.0, 4.0, 5.0]]]})
    # one b64 value for the whole column is one row
    r = client.post("/v1/models/id_inner:predict", json={"inputs": row_b64(0, 1, 2)})
    assert (r.status_code, r.json()) == (200, {"outputs": [[[0.0, 1.0, 2.0]]]})
    r = client.post("/v1/models/mlp:predict", json={"inputs": row_b64(0, 1, 2, 3)})
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["outputs"]).shape == (1, 3)


def test_b64_values_of_a_string_input_are_its_bytes(client: Client, runtime: Runtime) -> None:
    lm = runtime.get("id_bytes")
    for body in (
        b'{"instances": [[{"b64": "YQ=="}, {"b64": "YmM="}]]}',
        b'{"inputs": [[{"b64": "YQ=="}, {"b64": "YmM="}]]}',
        b'{"inputs": {"x": [[{"b64": "YQ=="}, {"b64": "YmM="}]]}}',
    ):
        feeds, _ = v1.decode(body, lm)
        assert feeds["x"].dtype == object
        assert feeds["x"].tolist() == [[b"a", b"bc"]]
        r = client.post("/v1/models/id_bytes:predict", content=body)
        assert r.status_code == 200, r.text
        assert np.asarray(next(iter(r.json().values()))).shape == (1, 2)
    feeds, _ = v1.decode(b'{"instances": [[{"b64": "YQ=="}, {"b64": "Yg=="}], [{"b64": "Yw=="}, {"b64": ""}]]}', lm)
    assert feeds["x"].tolist() == [[b"a", b"b"], [b"c", b""]]


def test_json_strings_for_a_string_input_are_its_values(client: Client) -> None:
    # they used to pass the value check and then be refused by the model's ("expects dtype object; got <U1")
    r = client.post("/v1/models/id_bytes:predict", json={"instances": [["a", "b"], ["c", "\u00e9"]]})
    assert (r.status_code, r.json()) == (200, {"predictions": [["a", "b"], ["c", "\u00e9"]]})
    r = client.post("/v1/models/id_bytes:predict", json={"inputs": {"x": [["a", "b"]]}})
    assert (r.status_code, r.json()) == (200, {"outputs": [["a", "b"]]})


def test_only_requests_to_the_default_version_reach_the_models_tap(client: Client, runtime: Runtime) -> None:
    seen: list[tuple[str, int]] = []
    runtime.set_tap("mlp", lambda lm, inputs, outputs: seen.append((lm.name, lm.version)))
    try:
        body = {"instances": [[1, 2, 3, 4]]}
        assert client.post("/v1/models/mlp/versions/1:predict", json=body).status_code == 200  # pinned: not mirrored
        assert seen == []
        assert client.post("/v1/models/mlp:predict", json=body).status_code == 200
        assert seen == [("mlp", 1)]
    finally:
        runtime.set_tap("mlp", None)
