"""openapi.py: the document names what is loaded now (models, versions, inputs), so clients and fuzzers
reach the handlers; its request schemas accept what the server accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.server import create_app
from edgekit_runtime.server.openapi import openapi
from tests.runtime.conftest import Client
from tests.runtime.fuzzing import identity_bundles

jsonschema_rs = pytest.importorskip("jsonschema_rs")


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return identity_bundles(tmp_path_factory.mktemp("typed"), ["BOOL", "INT8"])


@pytest.fixture
def runtime(bundles: dict[str, Path], typed: list[Path]) -> Iterator[Runtime]:
    rt = Runtime([bundles["mlp"], bundles["two"], typed[0]])
    rt.start(poll_seconds=0)
    yield rt
    rt.close()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[Client]:
    c = Client(create_app(runtime))
    yield c
    c.close()


def schema(doc: dict[str, Any], name: str) -> Any:
    return jsonschema_rs.Draft202012Validator(doc["components"]["schemas"][name])


def path_values(doc: dict[str, Any], path: str, method: str, param: str) -> list[str]:
    (p,) = [p for p in doc["paths"][path][method]["parameters"] if p["name"] == param]
    return list(p["schema"]["enum"])


def test_models_and_versions_are_path_values(client: Client) -> None:
    doc = client.get("/openapi.json").json()
    assert path_values(doc, "/v2/models/{model}/infer", "post", "model") == ["id_bool", "mlp", "two"]
    assert path_values(doc, "/v1/models/{model}/versions/{version}:predict", "post", "version") == ["1"]


def test_the_document_follows_what_is_loaded(client: Client, runtime: Runtime, typed: list[Path]) -> None:
    runtime.load(typed[1])
    doc = client.get("/openapi.json").json()
    assert "id_int8" in path_values(doc, "/v2/models/{model}", "get", "model")
    infer = schema(doc, "InferRequest")
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT8", "data": [[1, -1]]}]}
    assert infer.is_valid(body)
    assert client.post("/v2/models/id_int8/infer", json=body).status_code == 200


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [[0, 1, 2, 3], [4, 5, 6, 7]]}]}, True),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "BOOL", "data": [[True, False]]}]}, True),
        (
            {
                "id": "r1",
                "inputs": [
                    {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]},
                    {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]},
                ],
                "outputs": [{"name": "sum", "parameters": {"binary_data": True}}],
            },
            True,
        ),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT8", "data": [[1, 2, 3, 4]]}]}, False),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]}]}, False),
        ({"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]}, False),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "BOOL", "data": [[1, 0]]}]}, False),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}], "id": 7}, False),
    ],
)
def test_infer_schema_matches_the_server(client: Client, body: dict[str, Any], valid: bool) -> None:
    assert schema(client.get("/openapi.json").json(), "InferRequest").is_valid(body) is valid
    # what the document accepts, the server answers (for the model it was written for)
    if valid:
        model = {"x": "mlp" if body["inputs"][0]["datatype"] == "FP32" else "id_bool", "a": "two"}
        r = client.post(f"/v2/models/{model[body['inputs'][0]['name']]}/infer", json=body)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"instances": [[0, 1, 2, 3]]}, True),
        ({"inputs": [[0, 1, 2, 3], [4, 5, 6, 7.5]], "signature_name": "serving_default"}, True),
        ({"instances": [{"a": [1, 2, 3], "b": [1, 2, 3]}]}, True),
        ({"inputs": {"a": [[1, 2, 3]], "b": [[1, 2, 3]]}}, True),
        ({"instances": [[True, False]]}, True),
        ({"instances": [[0, 1, 2]]}, False),
        ({"instances": [[0, 1, 2, 3]], "inputs": [[0, 1, 2, 3]]}, False),
        ({"instances": []}, False),
        ({"instances": [["a", "b", "c", "d"]]}, False),
    ],
)
def test_predict_schema_matches_the_server(client: Client, body: dict[str, Any], valid: bool) -> None:
    assert schema(client.get("/openapi.json").json(), "PredictRequest").is_valid(body) is valid


def test_without_models_the_document_keeps_the_general_shapes() -> None:
    doc = openapi()
    params = doc["paths"]["/v2/models/{model}/infer"]["post"]["parameters"]
    assert params == [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    infer = schema(doc, "InferRequest")
    assert infer.is_valid({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]})
    assert schema(doc, "PredictRequest").is_valid({"instances": [[1, 2]]})
