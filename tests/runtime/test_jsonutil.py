"""The big-JSON fast path (simdjson straight into arrays) gives exactly what the orjson path gives."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.errors import InvalidInputError
from edgekit_runtime.server import create_app, jsonutil
from tests.runtime.conftest import Client

KEYS = frozenset({"instances", "inputs"})


def fast(body: bytes, keys: frozenset[str] = KEYS) -> Any:
    old = jsonutil._FAST_PATH_BYTES
    jsonutil._FAST_PATH_BYTES = 0
    try:
        return jsonutil.loads_tensors(body, keys)
    finally:
        jsonutil._FAST_PATH_BYTES = old


def test_nested_numbers_become_one_array_with_their_shape() -> None:
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3))
    doc = fast(orjson.dumps({"instances": x.tolist(), "signature_name": "serving_default"}))
    assert isinstance(doc["instances"], np.ndarray)
    assert doc["instances"].shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(doc["instances"], x)
    assert doc["signature_name"] == "serving_default"


def test_ints_stay_exact_and_mixed_numbers_become_floats() -> None:
    big = 2**60 + 1
    doc = fast(orjson.dumps({"inputs": {"a": [big, 1], "b": [1, 2.5]}}))
    assert doc["inputs"]["a"].dtype == np.int64
    assert int(doc["inputs"]["a"][0]) == big
    assert doc["inputs"]["b"].dtype == np.float64
    np.testing.assert_array_equal(doc["inputs"]["b"], [1.0, 2.5])


@pytest.mark.parametrize(
    "value",
    [
        [[1.0, 2.0], [3.0]],  # ragged: left as lists for the slow path to report
        [{"b64": "AAAA"}],
        ["a", "b"],
        [True, False],
        [],
    ],
)
def test_what_is_not_a_numeric_array_stays_python(value: Any) -> None:
    doc = fast(orjson.dumps({"instances": value}))
    assert doc["instances"] == value


def test_non_tensor_keys_and_nan_bodies_keep_their_json_meaning() -> None:
    body = orjson.dumps({"id": "r1", "inputs": [{"name": "x", "shape": [1, 2], "data": [1.0, 2.0]}]})
    doc = fast(body, frozenset({"data"}))
    assert doc["id"] == "r1"
    assert doc["inputs"][0]["shape"] == [1, 2]
    assert isinstance(doc["inputs"][0]["data"], np.ndarray)
    nan = fast(b'{"instances": [NaN, 1.0]}')
    assert math.isnan(nan["instances"][0])


@pytest.fixture(scope="module")
def client(bundles: dict[str, Path]) -> Iterator[Client]:
    rt = Runtime([bundles["mlp"], bundles["two"]])
    rt.start(poll_seconds=0)
    c = Client(create_app(rt))
    yield c
    c.close()
    rt.close()


X = np.random.default_rng(5).normal(size=(6, 4))


def v2(shape: list[int], data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}


REQUESTS: list[tuple[str, Any]] = [
    ("/v1/models/mlp:predict", {"instances": X.tolist()}),
    ("/v1/models/mlp:predict", {"inputs": X.tolist()}),
    ("/v1/models/mlp:predict", {"instances": [[1, 2, 3, 4]]}),
    ("/v1/models/mlp:predict", {"instances": [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]]}),
    ("/v1/models/mlp:predict", {"instances": X[:, :3].tolist()}),
    ("/v1/models/two:predict", {"inputs": {"a": X[:, :3].tolist(), "b": X[:, 1:].tolist()}}),
    ("/v1/models/two:predict", {"instances": [{"a": r[:3].tolist(), "b": r[1:].tolist()} for r in X]}),
    ("/v2/models/mlp/infer", v2([6, 4], X.tolist())),
    ("/v2/models/mlp/infer", v2([6, 4], X.ravel().tolist())),
    ("/v2/models/mlp/infer", v2([5, 4], X.ravel().tolist())),
    ("/v2/models/mlp/infer", v2([1, 4], ["a", 1, 2, 3])),
]


@pytest.mark.parametrize(("url", "doc"), REQUESTS)
def test_http_answers_are_the_same_on_both_paths(client: Client, url: str, doc: Any) -> None:
    body = json.dumps(doc).encode()
    slow = client.post(url, content=body)
    old = jsonutil._FAST_PATH_BYTES
    jsonutil._FAST_PATH_BYTES = 0
    try:
        quick = client.post(url, content=body)
    finally:
        jsonutil._FAST_PATH_BYTES = old
    assert quick.status_code == slow.status_code, (quick.text, slow.text)
    assert quick.json() == slow.json()


# -- writing replies: NaN and Infinity are written as TF Serving writes them, never as null ---------


def test_non_finite_outputs_are_written_as_nan_and_infinity() -> None:
    arr = np.array([[np.nan, np.inf], [-np.inf, 1.5]], dtype=np.float32)
    assert jsonutil.dumps({"y": jsonutil.jsonable(arr)}) == b'{"y": [[NaN, Infinity], [-Infinity, 1.5]]}'
    # the same array without them takes orjson, still exactly
    assert jsonutil.dumps({"y": jsonutil.jsonable(np.array([1.5, 2.0], np.float32))}) == b'{"y":[1.5,2.0]}'


def test_jsonable_writes_what_orjson_cannot() -> None:
    swapped = np.array([1, 2, 3], dtype=">i4")
    assert jsonutil.dumps(jsonutil.jsonable(swapped)) == b"[1,2,3]"
    strided = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]
    assert jsonutil.dumps(jsonutil.jsonable(strided)) == b"[[0.0,2.0],[3.0,5.0]]"
    text = np.array([b"a", "b", b"\xff\x00"], dtype=object)
    assert orjson.loads(jsonutil.dumps(jsonutil.jsonable(text))) == ["a", "b", {"b64": "/wA="}]
    nested = np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)
    assert orjson.loads(jsonutil.dumps(jsonutil.jsonable(nested))) == [["a", "b"], ["c", "d"]]
    # numpy scalars beside a non-finite array go through the stdlib fallback too
    doc = {"n": np.int64(3), "x": np.float32(0.5), "y": jsonutil.jsonable(np.array([np.nan]))}
    assert jsonutil.dumps(doc) == b'{"n": 3, "x": 0.5, "y": [NaN]}'
    with pytest.raises(TypeError, match="cannot write object as JSON"):
        jsonutil.dumps({"y": jsonutil.jsonable(np.array([np.nan])), "o": object()})


def test_nan_and_infinity_in_requests_are_read_and_bad_json_is_a_400() -> None:
    doc = jsonutil.loads(b'{"instances": [[NaN, Infinity, -Infinity, 1]]}')
    row = doc["instances"][0]
    assert math.isnan(row[0])
    assert row[1:] == [math.inf, -math.inf, 1]
    assert jsonutil.loads(memoryview(b'{"a": 1}')) == {"a": 1}
    for body in (b"{not json", b'{"a": NaN', b"[" * 100_000 + b"NaN" + b"]" * 100_000):
        with pytest.raises(InvalidInputError, match="malformed JSON body"):
            jsonutil.loads(body)


NON_FINITE_A = "[[Infinity, 1, NaN], [0, 2, 3]]"
NON_FINITE_B = "[[1, -Infinity, 2], [Infinity, 1, 1]]"


def assert_non_finite(sum_: Any, prod: Any) -> None:
    s, p = np.asarray(sum_, dtype=np.float64).reshape(2, 3), np.asarray(prod, dtype=np.float64).reshape(2, 3)
    np.testing.assert_array_equal(s, [[np.inf, -np.inf, np.nan], [np.inf, 3, 4]])
    np.testing.assert_array_equal(p, [[np.inf, -np.inf, np.nan], [np.nan, 2, 3]])  # 0 x inf is NaN


def test_v1_replies_write_nan_and_infinity_not_null(client: Client) -> None:
    body = f'{{"inputs": {{"a": {NON_FINITE_A}, "b": {NON_FINITE_B}}}}}'.encode()
    r = client.post("/v1/models/two:predict", content=body)
    assert r.status_code == 200, r.text
    assert "null" not in r.text
    assert "NaN" in r.text
    assert "-Infinity" in r.text
    out = json.loads(r.text)["outputs"]  # the stdlib reads NaN / Infinity back
    assert_non_finite(out["sum"], out["prod"])
    rows = [{"a": a, "b": b} for a, b in zip(json.loads(NON_FINITE_A), json.loads(NON_FINITE_B), strict=True)]
    r = client.post("/v1/models/two:predict", content=json.dumps({"instances": rows}).encode())
    assert r.status_code == 200, r.text
    assert "null" not in r.text
    preds = json.loads(r.text)["predictions"]
    assert_non_finite([p["sum"] for p in preds], [p["prod"] for p in preds])


def test_v2_replies_write_nan_and_infinity_not_null(client: Client) -> None:
    inputs = [
        f'{{"name": "{k}", "shape": [2, 3], "datatype": "FP32", "data": {v}}}'
        for k, v in (("a", NON_FINITE_A), ("b", NON_FINITE_B))
    ]
    r = client.post("/v2/models/two/infer", content=f'{{"inputs": [{", ".join(inputs)}]}}'.encode())
    assert r.status_code == 200, r.text
    assert "null" not in r.text
    outs = {o["name"]: o for o in json.loads(r.text)["outputs"]}
    assert outs["sum"]["shape"] == [2, 3]
    assert_non_finite(outs["sum"]["data"], outs["prod"]["data"])
