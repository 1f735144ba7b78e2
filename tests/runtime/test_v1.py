"""TF Serving REST: edge cases the fuzzers found (odd numbers, deep nesting and odd versions are 4xx, never 500)
and the metadata and status documents, whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.server import create_app
from tests.runtime.conftest import Client
from tests.runtime.fuzzing import error, identity_bundles


@pytest.fixture(scope="module")
def client(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    typed = identity_bundles(tmp_path_factory.mktemp("typed"), ["INT32", "FP16", "BOOL"])
    rt = Runtime([bundles["mlp"], bundles["int8"], *typed])
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    yield c
    c.close()
    rt.close()


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
