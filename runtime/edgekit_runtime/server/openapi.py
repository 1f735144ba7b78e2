"""The OpenAPI 3.1 document of the server's routes (``GET /openapi.json``), built per request from
the models loaded at that moment.

The routes are hand-written in ``ROUTES``; tests call every route listed here and check the router
answers it, so the document and the router cannot drift apart silently. The models fill in what a
client (or a fuzzer, or a client generator) needs to reach the handlers: the served model names and
versions (and the version labels) as path values, and each model's input names, datatypes and shapes in the v2 infer and
TF Serving predict request schemas.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit_runtime import __version__
from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.errors import EdgekitError
from edgekit_runtime.model import LoadedModel
from edgekit_runtime.runtime import LABELS
from edgekit_runtime.tensors import TensorSpec, v2_datatype

__all__ = ["ROUTES", "openapi"]

_ERROR = {"$ref": "#/components/responses/Error"}
_JSON_ANY = {"application/json": {"schema": {"type": "object"}}}

# (method, path, summary, request body description or None)
ROUTES: list[tuple[str, str, str, str | None]] = [
    ("get", "/v1/models/{model}", "TF Serving: status of every version of a model", None),
    ("get", "/v1/models/{model}/versions/{version}", "TF Serving: status of one version", None),
    ("get", "/v1/models/{model}/metadata", "TF Serving: signature of the serving version", None),
    ("get", "/v1/models/{model}/versions/{version}/metadata", "TF Serving: signature of one version", None),
    ("post", "/v1/models/{model}:predict", "TF Serving: predict ('instances' rows or 'inputs' columns)", "predict"),
    ("post", "/v1/models/{model}/versions/{version}:predict", "TF Serving: predict with one version", "predict"),
    ("get", "/v1/models/{model}/labels/{label}", "TF Serving: status of the version holding a label", None),
    ("get", "/v1/models/{model}/labels/{label}/metadata", "TF Serving: signature of the version holding a label", None),
    (
        "post",
        "/v1/models/{model}/labels/{label}:predict",
        "TF Serving: predict with the version holding a label",
        "predict",
    ),
    ("post", "/v1/models/{model}:reload", "edgekit admin: rescan the sources now and retry failed versions", None),
    ("get", "/v2", "Open Inference Protocol: server metadata", None),
    ("get", "/v2/health/live", "Open Inference Protocol: liveness", None),
    ("get", "/v2/health/ready", "Open Inference Protocol: readiness (all initially given models loaded)", None),
    ("get", "/v2/models/{model}", "Open Inference Protocol: model metadata", None),
    ("get", "/v2/models/{model}/versions/{version}", "Open Inference Protocol: model version metadata", None),
    ("get", "/v2/models/{model}/ready", "Open Inference Protocol: model readiness (200 ready, 400 not)", None),
    ("get", "/v2/models/{model}/versions/{version}/ready", "Open Inference Protocol: version readiness", None),
    (
        "post",
        "/v2/models/{model}/infer",
        "Open Inference Protocol: inference (JSON or binary tensor extension)",
        "infer",
    ),
    (
        "post",
        "/v2/models/{model}/versions/{version}/infer",
        "Open Inference Protocol: inference with one version",
        "infer",
    ),
    (
        "post",
        "/v2/models/{model}/feedback",
        "edgekit: ground truth (true label or value) for earlier v2 requests by their id; live accuracy in telemetry",
        "feedback",
    ),
    ("post", "/v2/repository/index", "Model repository extension: every model version and its state", None),
    ("post", "/v2/repository/models/{model}/load", "Model repository extension: rescan and (re)load a model", None),
    ("get", "/metrics", "Prometheus metrics (text exposition format)", None),
    ("get", "/openapi.json", "This document", None),
]


def _leaf(spec: TensorSpec, *, v1: bool) -> dict[str, Any]:
    """The JSON schema of one element of ``spec``: what the decoders accept (server/v1.py, server/v2.py)."""
    dt = np.dtype(spec.dtype)
    if dt.kind == "b":
        return {"type": "boolean"}
    if dt.kind == "O":
        text: dict[str, Any] = {"type": "string"}
        b64 = {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string"}}}
        return {"anyOf": [text, b64]} if v1 else text
    if dt.kind in "iu" and not (v1 and spec.quantization is not None):  # v1 quantizes floats
        info = np.iinfo(dt)
        return {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}
    if dt.kind == "f" and dt.itemsize < 8:  # beyond float64's range JSON numbers do not parse at all
        top = float(np.finfo(dt).max)
        return {"type": "number", "minimum": -top, "maximum": top}
    return {"type": "number"}


def _nested(dims: list[int], leaf: dict[str, Any]) -> dict[str, Any]:
    """Nested arrays of ``dims`` (-1 = any size, at least one)."""
    schema = leaf
    for d in reversed(dims):
        schema = {"type": "array", "items": schema, "minItems": d if d > 0 else 1}
        if d > 0:
            schema["maxItems"] = d
    return schema


def _v2_tensor(spec: TensorSpec) -> dict[str, Any]:
    """One input of a v2 request: its name, datatype and shape. ``data`` may be flat or nested (the
    protocol allows both); it is described nested, one array per row, because JSON Schema cannot tie
    the length of flat data to ``shape`` but can spell out a row, so only the row count is free."""
    dims: list[dict[str, Any]] = [{"const": d} if d >= 0 else {"type": "integer", "minimum": 1} for d in spec.shape]
    return {
        "type": "object",
        "description": f"input {spec.name!r}: {v2_datatype(spec.dtype)}, shape {spec.shape} (-1 = any size)",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": spec.name},
            "shape": {"type": "array", "prefixItems": dims, "items": False, "minItems": len(dims)},
            "datatype": {"const": v2_datatype(spec.dtype)},
            "parameters": {"type": "object"},
            "data": _nested(spec.shape or [-1], _leaf(spec, v1=False)),
        },
    }


def _v2_request(lm: LoadedModel) -> dict[str, Any]:
    n = len(lm.inputs)
    binary = {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}
    return {
        "title": f"{lm.name} v{lm.version}",
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {
                "description": "every input of the model once, in any order (listed here in the model's order)",
                "type": "array",
                "prefixItems": list(map(_v2_tensor, lm.inputs)),
                "items": False,
                "minItems": n,
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"enum": [s.name for s in lm.outputs]}, "parameters": binary},
                },
            },
        },
    }


def _v1_request(lm: LoadedModel) -> dict[str, Any]:
    def row(spec: TensorSpec) -> dict[str, Any]:
        return _nested(spec.shape[1:], _leaf(spec, v1=True))

    def column(spec: TensorSpec) -> dict[str, Any]:
        return _nested(spec.shape[:1] or [-1], row(spec))

    def by_name(schema: Any) -> dict[str, Any]:
        names = [s.name for s in lm.inputs]
        return {"type": "object", "required": names, "properties": {s.name: schema(s) for s in lm.inputs}}

    single = len(lm.inputs) == 1
    rows = row(lm.inputs[0]) if single else by_name(row)
    columns = column(lm.inputs[0]) if single else by_name(column)
    signature = {"enum": ["serving_default", ""]}
    instances = {"type": "array", "items": rows, "minItems": 1}
    return {
        "title": f"{lm.name} v{lm.version}",
        "anyOf": [
            {
                "type": "object",
                "required": ["instances"],
                "not": {"required": ["inputs"]},
                "properties": {"signature_name": signature, "instances": instances},
            },
            {
                "type": "object",
                "required": ["inputs"],
                "not": {"required": ["instances"]},
                "properties": {"signature_name": signature, "inputs": columns},
            },
        ],
    }


def _served(dp: DataPlane | None) -> tuple[list[str], list[str], list[LoadedModel]]:
    """Every model name, every loaded version and the serving version of each model that has one."""
    if dp is None:
        return [], [], []
    names = dp.runtime.models()
    served: list[LoadedModel] = []
    versions: set[int] = set()
    for name in names:
        versions.update(dp.versions(name))
        try:
            served.append(dp.model(name))
        except EdgekitError:
            continue  # not serving right now: its name is still a path value (status, readiness)
    return names, [str(v) for v in sorted(versions)], served


def _held_labels(dp: DataPlane | None, names: list[str]) -> list[str]:
    """The labels some model holds now (``canary`` only during a shadow check or health window), so
    the document offers path values that answer; every label when none is held."""
    held: set[str] = set()
    for name in names if dp is not None else ():
        try:
            held.update(dp.runtime.labels(name))  # type: ignore[union-attr]
        except EdgekitError:
            continue
    return sorted(held) or list(LABELS)


def _params(path: str, models: list[str], versions: list[str], labels: list[str]) -> list[dict[str, Any]]:
    out = []
    for name, values in (("model", models), ("version", versions), ("label", labels)):
        if "{" + name + "}" in path:
            schema: dict[str, Any] = {"type": "string", "enum": values} if values else {"type": "string"}
            out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def _bodies() -> dict[str, dict[str, Any]]:
    predict: dict[str, Any] = {"$ref": "#/components/schemas/PredictRequest"}
    infer: dict[str, Any] = {"$ref": "#/components/schemas/InferRequest"}
    item: dict[str, Any] = {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "description": "the id the v2 inference request carried"},
            "label": {"type": "integer"},
            "labels": {"type": "array", "items": {"type": "integer"}, "description": "one per row"},
            "value": {"type": "number"},
            "values": {"type": "array", "items": {"type": "number"}},
        },
        "minProperties": 2,
        "maxProperties": 2,
    }
    feedback = {"anyOf": [item, {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": item, "minItems": 1, "maxItems": 1000}}}]}  # fmt: skip
    return {
        "predict": {"required": True, "content": {"application/json": {"schema": predict}}},
        "feedback": {"required": True, "content": {"application/json": {"schema": feedback}}},
        "infer": {
            "required": True,
            "description": (
                "JSON, or with the binary tensor data extension: the JSON header (its length in the "
                "Inference-Header-Content-Length header) followed by raw little-endian tensors"
            ),
            "content": {
                "application/json": {"schema": infer},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    }


def _request_schemas(served: list[LoadedModel]) -> dict[str, Any]:
    """One alternative per serving model (anyOf); with no model loaded, the protocols' general shapes."""
    if not served:
        tensor = {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "datatype": {"type": "string"},
                "parameters": {"type": "object"},
                "data": {"type": "array"},
            },
        }
        infer: dict[str, Any] = {
            "type": "object",
            "required": ["inputs"],
            "properties": {"id": {"type": "string"}, "inputs": {"type": "array", "items": tensor}},
        }
        predict: dict[str, Any] = {
            "type": "object",
            "properties": {"signature_name": {"type": "string"}, "instances": {"type": "array"}, "inputs": {}},
        }
    else:
        infer = {"anyOf": [_v2_request(lm) for lm in served]}
        predict = {"anyOf": [_v1_request(lm) for lm in served]}
    infer["description"] = "Open Inference Protocol v2 request: one alternative per served model"
    predict["description"] = "TF Serving predict request: 'instances' (rows) or 'inputs' (columns), per served model"
    return {"InferRequest": infer, "PredictRequest": predict}


def openapi(dp: DataPlane | None = None) -> dict[str, Any]:
    """The document for the models ``dp`` serves now (without one: the routes and general shapes)."""
    names, versions, served = _served(dp)
    labels = _held_labels(dp, names)
    bodies = _bodies()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body in ROUTES:
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": _params(path, names, versions, labels),
            "responses": {
                "200": {"description": "OK", "content": _JSON_ANY},
                "400": _ERROR,
                "404": _ERROR,
                "413": _ERROR,
                "503": _ERROR,
            },
        }
        if body is not None:
            op["requestBody"] = bodies[body]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgekit-runtime",
            "version": __version__,
            "description": "TF Serving REST API and Open Inference Protocol v2 for edgekit model bundles",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                **_request_schemas(served),
            },
            "responses": {
                "Error": {
                    "description": "Error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }
