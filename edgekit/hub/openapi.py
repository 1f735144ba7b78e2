"""The hub API's OpenAPI 3.1 document, written out by hand (a test checks it lists exactly the
app's routes and methods)."""

from __future__ import annotations

from typing import Any

from edgekit import __version__
from edgekit.hub.rollout import DEVICE_STATES

__all__ = ["BUNDLE_NAME_HEADER", "OPERATIONS", "document"]

#: The pushed file's name, which the hub uses in its messages instead of its temporary path.
BUNDLE_NAME_HEADER = "X-Edgekit-Bundle-Name"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


_UNAUTHORIZED = {"401": _error("no token, or not the hub's (Authorization: Bearer TOKEN; DATA/token)")}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
_DEVICE = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_ROLLOUT = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_DURATION = {"type": ["string", "number"], "description": "30s, 5m, 1h or seconds"}
_DEVICE_STATES = list(DEVICE_STATES)

#: (METHOD, path) -> operation. Keep in step with api.create_app's routes.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/healthz"): {
        "summary": "Liveness (no token needed)",
        "security": [],
        "responses": {"200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "the hub runs")},
    },
    ("GET", "/openapi.json"): {
        "summary": "This document (no token needed)",
        "security": [],
        "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
    },
    ("POST", "/v1/bundles"): {
        "summary": "Push a signed bundle (.ekb) as the raw body",
        "parameters": [
            {
                "name": BUNDLE_NAME_HEADER,
                "in": "header",
                "required": False,
                "description": "the file's name, used in error messages",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        "responses": {
            "201": _json(_ref("PushResult"), "stored"),
            "200": _json(_ref("PushResult"), "these exact bytes were already stored (created: false)"),
            "400": _error("not a valid bundle, unsigned, signed by an untrusted key, or changed after signing"),
            **_UNAUTHORIZED,
            "409": _error("another bundle with this name, version and profile is stored"),
            "413": _error("over the hub's upload cap"),
        },
    },
    ("GET", "/v1/models"): {
        "summary": "Every model, its versions and their bundles (one per profile)",
        "responses": {
            "200": _json(
                {"type": "object", "properties": {"models": {"type": "array", "items": _ref("Model")}}}, "the models"
            ),
            **_UNAUTHORIZED,
        },
    },
    ("GET", "/v1/models/{name}"): {
        "summary": "One model, with each bundle's input and output signature",
        "parameters": [_NAME],
        "responses": {"200": _json(_ref("Model"), "the model"), **_UNAUTHORIZED, "404": _error("no such model")},
    },
    ("DELETE", "/v1/models/{name}/versions/{version}"): {
        "summary": "Delete every profile's bundle of NAME vVERSION",
        "parameters": [_NAME, _VERSION],
        "responses": {
            "200": _json(
                {"type": "object", "properties": {"deleted": {"type": "array", "items": _ref("Bundle")}}},
                "what was deleted",
            ),
            **_UNAUTHORIZED,
            "404": _error("no such version"),
            "409": _error("a device runs this version or a rollout targets it"),
        },
    },
    ("GET", "/v1/devices"): {
        "summary": "Every device that registered",
        "responses": {
            "200": _json(
                {"type": "object", "properties": {"devices": {"type": "array", "items": _ref("Device")}}},
                "the devices",
            ),
            **_UNAUTHORIZED,
        },
    },
    ("GET", "/v1/devices/{id}"): {
        "summary": "One device",
        "parameters": [_DEVICE],
        "responses": {"200": _json(_ref("Device"), "the device"), **_UNAUTHORIZED, "404": _error("no such device")},
    },
    ("PATCH", "/v1/devices/{id}/labels"): {
        "summary": "Set (string) or remove (null) a device's labels",
        "parameters": [_DEVICE],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["labels"],
                        "properties": {
                            "labels": {"type": "object", "additionalProperties": {"type": ["string", "null"]}}
                        },
                    }
                }
            },
        },
        "responses": {
            "200": _json(_ref("Device"), "the device with its new labels"),
            "400": _error("a bad label key or value"),
            **_UNAUTHORIZED,
            "404": _error("no such device"),
        },
    },
    ("POST", "/v1/rollouts"): {
        "summary": "Start a rollout of NAME vVERSION to the devices --to selects (`edgekit deploy`)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("DeployRequest")}}},
        "responses": {
            "201": _json(_ref("Rollout"), "the rollout, started"),
            "400": _error("a bad option, or a selector that matches no device"),
            **_UNAUTHORIZED,
            "404": _error("no bundle of that version, or an unknown device id"),
            "409": _error("another rollout of the model is running or paused"),
            "503": _error("the hub has no MQTT broker (--broker)"),
        },
    },
    ("GET", "/v1/rollouts"): {
        "summary": "Every rollout, newest first (without the per-device list)",
        "responses": {
            "200": _json(
                {"type": "object", "properties": {"rollouts": {"type": "array", "items": _ref("Rollout")}}},
                "the rollouts",
            ),
            **_UNAUTHORIZED,
        },
    },
    ("GET", "/v1/rollouts/{id}"): {
        "summary": "One rollout's status, per device",
        "parameters": [_ROLLOUT],
        "responses": {"200": _json(_ref("Rollout"), "the rollout"), **_UNAUTHORIZED, "404": _error("no such rollout")},
    },
    ("POST", "/v1/rollouts/{id}/{action}"): {
        "summary": "pause, resume or cancel a rollout",
        "parameters": [
            _ROLLOUT,
            {"name": "action", "in": "path", "required": True, "schema": {"enum": ["pause", "resume", "cancel"]}},
        ],
        "responses": {
            "200": _json(_ref("Rollout"), "the rollout after the change"),
            **_UNAUTHORIZED,
            "404": _error("no such rollout"),
            "409": _error("the rollout is not in a state that allows this"),
        },
    },
    ("POST", "/v1/rollbacks"): {
        "summary": "A rollout of each selected device back to its previous version (`edgekit rollback`)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("DeployRequest")}}},
        "responses": {
            "201": _json(_ref("Rollout"), "the rollback rollout, started"),
            "400": _error("a bad option, or a selector that matches no device"),
            **_UNAUTHORIZED,
            "409": _error("another rollout of the model is running or paused"),
        },
    },
    ("GET", "/v1/fleet"): {
        "summary": "One row per device and model: version, online, p95, req/s, error % (`edgekit fleet`)",
        "responses": {
            "200": _json(
                {"type": "object", "properties": {"devices": {"type": "array", "items": _ref("FleetRow")}}},
                "the fleet, devices in id order",
            ),
            **_UNAUTHORIZED,
        },
    },
    ("GET", "/v1/fleet/{id}"): {
        "summary": "A device with its recent telemetry per model and its newest device message",
        "parameters": [
            _DEVICE,
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 120}, "intervals per model"),
        ],
        "responses": {
            "200": _json({"type": "object"}, "the device (as GET /v1/devices/{id}) and `telemetry`"),
            "400": _error("a bad limit"),
            **_UNAUTHORIZED,
            "404": _error("no such device"),
        },
    },
    ("GET", "/v1/telemetry"): {
        "summary": "Model telemetry rows, one per device, model, version and interval, in (device, seq) order",
        "parameters": [
            _query("device", {"type": "string"}, "one device's rows only"),
            _query("since", {"type": "number"}, "unix seconds: rows whose interval ended then or later"),
            _query("after", {"type": "string"}, "DEVICE:SEQ, the previous page's `next`"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10000}, "rows per page"),
        ],
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "properties": {
                        "rows": {"type": "array", "items": _ref("TelemetryRow")},
                        "next": {"type": ["string", "null"], "description": "pass as `after` for the next page"},
                    },
                },
                "a page of rows",
            ),
            "400": _error("a bad parameter"),
            **_UNAUTHORIZED,
        },
    },
    ("GET", "/v1/events"): {
        "summary": "Live updates (Server-Sent Events): `fleet` (as GET /v1/fleet) and `rollouts` (as GET "
        "/v1/rollouts, null without a broker) whenever they change; a keep-alive comment every 15 s",
        "responses": {
            "200": {
                "description": "the event stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_UNAUTHORIZED,
        },
    },
    ("GET", "/"): {
        "summary": "The dashboard (no token needed to load it: the page asks for it and calls this API)",
        "security": [],
        "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}},
    },
    ("GET", "/dashboard/{name}"): {
        "summary": "The dashboard's files: app.js, app.css, and plotly.min.js from the plotly package",
        "security": [],
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the file"}, "404": _error("no such file")},
    },
    ("GET", "/v1/telemetry/stats"): {
        "summary": "This hub process's telemetry ingestion counters (received, stored, duplicates, bad by reason)",
        "responses": {"200": _json({"type": "object"}, "the counters"), **_UNAUTHORIZED},
    },
}

_BUNDLE = {
    "type": "object",
    "required": ["name", "version", "profile", "sha256", "size_bytes", "signer", "uploaded"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "integer"},
        "profile": {"type": "string"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "size_bytes": {"type": "integer", "description": "the bundle file"},
        "format": {"enum": ["tflite", "onnx"]},
        "quantization": {"type": "string"},
        "model_size_bytes": {"type": "integer", "description": "the model file inside"},
        "signer": {"type": "string", "description": "key id of the signing key"},
        "uploaded": {"type": "string", "format": "date-time"},
        "inputs": {"type": "array", "description": "GET /v1/models/{name} only"},
        "outputs": {"type": "array", "description": "GET /v1/models/{name} only"},
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "kind"],
        "properties": {
            "error": {"type": "string", "description": "what was wrong and how to fix it"},
            "kind": {
                "type": "string",
                "description": "signature, bundle, payload_too_large, invalid_input, not_found, conflict, "
                "unauthorized, unavailable, http, internal, error",
            },
        },
    },
    "Bundle": _BUNDLE,
    "PushResult": {
        "type": "object",
        "properties": {"bundle": _ref("Bundle"), "created": {"type": "boolean"}},
    },
    "Model": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "version": {"type": "integer"},
                        "bundles": {"type": "array", "items": _ref("Bundle")},
                    },
                },
            },
        },
    },
    "DeployRequest": {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "integer", "minimum": 1, "description": "required for a rollout, ignored by rollbacks"},
            "to": {"type": "string", "description": "all, id1,id2, or KEY=VALUE[,KEY=VALUE]", "default": "all"},
            "waves": {"type": "string", "description": "cumulative wave sizes: 1,10%,50%,100%", "default": "100%"},
            "abort_failure_rate": {"type": "number", "minimum": 0, "maximum": 100, "default": 20},
            "abort_min_devices": {"type": "integer", "minimum": 1, "default": 1},
            "device_timeout": {**_DURATION, "default": 600},
            "retries": {"type": "integer", "minimum": 0, "default": 1},
            "health_window": {**_DURATION, "default": 0},
            "shadow": {**_DURATION, "default": 0},
            "min_agreement": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
            "allow_signature_change": {"type": "boolean", "default": False},
        },
    },
    "Rollout": {
        "type": "object",
        "required": ["id", "model", "version", "state"],
        "properties": {
            "id": {"type": "string"},
            "kind": {"enum": ["deploy", "rollback"]},
            "model": {"type": "string"},
            "version": {"type": ["integer", "null"], "description": "null for a rollback (each device's own)"},
            "state": {"enum": ["running", "paused", "completed", "aborted", "cancelled"]},
            "reason": {"type": "string"},
            "wave": {"type": "integer"},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "failure_rate": {"type": "number"},
            "devices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["device", "wave", "state", "reason"],
                    "properties": {
                        "device": {"type": "string"},
                        "wave": {"type": "integer"},
                        "state": {"enum": _DEVICE_STATES},
                        "reason": {"type": "string"},
                        "previous": {"type": ["integer", "null"]},
                        "target": {"type": "integer"},
                        "progress": {"type": "object", "description": "chunks held and chunks in all"},
                    },
                },
            },
        },
    },
    "FleetRow": {
        "type": "object",
        "properties": {
            "device": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "profile": {"type": "string"},
            "online": {"type": "boolean"},
            "last_seen": {"type": ["number", "null"], "description": "unix seconds: presence or telemetry"},
            "model": {"type": ["string", "null"]},
            "version": {"type": ["integer", "null"]},
            "state": {"type": ["string", "null"]},
            "p95_ms": {"type": ["number", "null"], "description": "of the newest interval"},
            "req_per_s": {"type": ["number", "null"]},
            "error_pct": {"type": ["number", "null"]},
            "interval_end": {"type": ["number", "null"]},
        },
    },
    "TelemetryRow": {
        "type": "object",
        "properties": {
            name: {"type": kind}
            for name, kind in (
                ("device", "string"),
                ("model", "string"),
                ("version", "integer"),
                ("seq", "integer"),
                ("interval_start", "number"),
                ("interval_end", "number"),
                ("requests", "integer"),
                ("errors", "integer"),
                ("rejected", "integer"),
                ("p50_ms", ["number", "null"]),
                ("p95_ms", ["number", "null"]),
                ("p99_ms", ["number", "null"]),
                ("rows", "integer"),
                ("rows_per_s", "number"),
                ("queue_depth", "integer"),
                ("errors_by_kind", "string"),
            )
        },
    },
    "Device": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "profile": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "online": {"type": "boolean"},
            "last_seen": {"type": ["string", "null"], "format": "date-time"},
            "registered": {"type": "string", "format": "date-time"},
            "models": {
                "type": "object",
                "description": "per model: the active version and the agent's reported state",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "active": {"type": ["integer", "null"]},
                        "state": {"type": "string"},
                        "reason": {"type": "string"},
                    },
                },
            },
        },
    },
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgekit hub", "version": __version__, "description": "docs/hub.md"},
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
    }
