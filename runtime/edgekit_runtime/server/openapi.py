"""The OpenAPI 3.1 document of the server's routes (``GET /openapi.json``).

Hand-written from ``ROUTES``; tests call every route listed here and check the router answers it,
so the document and the router cannot drift apart silently.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from edgekit_runtime import __version__

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
    ("post", "/v2/repository/index", "Model repository extension: every model version and its state", None),
    ("post", "/v2/repository/models/{model}/load", "Model repository extension: rescan and (re)load a model", None),
    ("get", "/metrics", "Prometheus metrics (text exposition format)", None),
    ("get", "/openapi.json", "This document", None),
]

_BODIES: dict[str, dict[str, Any]] = {
    "predict": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "signature_name": {"type": "string"},
                        "instances": {"type": "array", "description": "one element per row"},
                        "inputs": {"description": "columnar: an array, or an object of named arrays"},
                    },
                }
            }
        },
    },
    "infer": {
        "required": True,
        "description": (
            "JSON, or with the binary tensor data extension: the JSON header (its length in the "
            "Inference-Header-Content-Length header) followed by raw little-endian tensors"
        ),
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def _params(path: str) -> list[dict[str, Any]]:
    out = []
    for name in ("model", "version"):
        if "{" + name + "}" in path:
            out.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    return out


@cache
def openapi() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body in ROUTES:
        op: dict[str, Any] = {
            "summary": summary,
            "parameters": _params(path),
            "responses": {
                "200": {"description": "OK", "content": _JSON_ANY},
                "400": _ERROR,
                "404": _ERROR,
                "413": _ERROR,
                "503": _ERROR,
            },
        }
        if body is not None:
            op["requestBody"] = _BODIES[body]
        paths.setdefault(path, {})[method] = op
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    }
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
                "InferRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": tensor},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                },
            },
            "responses": {
                "Error": {
                    "description": "Error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }
