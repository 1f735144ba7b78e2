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
