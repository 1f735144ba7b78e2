"""The hub's HTTP JSON API (Starlette): a thin adapter over the registry and the devices.

Every route but ``/healthz`` and ``/openapi.json`` needs ``Authorization: Bearer TOKEN``. Errors
are ``{"error": "...", "kind": "..."}`` with the error's HTTP status, mapped in one place
(``error_response``). The routes and their shapes are in docs/hub.md and ``openapi.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgekit.hub.artifacts import Artifacts
from edgekit.hub.devices import Devices
from edgekit.hub.errors import UnauthorizedError, kind_of
from edgekit.hub.fleet import DeployRequest, Fleet
from edgekit.hub.openapi import BUNDLE_NAME_HEADER, document
from edgekit.hub.registry import Registry, iso_time
from edgekit.hub.store import BundleRecord, DeviceRecord
from edgekit.hub.telemetry import MAX_PAGE, Ingestor, device_history, export_rows, fleet_rows
from edgekit_runtime.errors import (
    EdgekitError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)

__all__ = ["PUBLIC_PATHS", "bundle_json", "create_app", "device_json", "error_response"]

log = logging.getLogger("edgekit.hub")

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/"})
#: The dashboard's own files (no data in them: the page asks for the token and calls the API).
PUBLIC_PREFIX = "/dashboard/"
_WEB = Path(__file__).parent / "web"
_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
#: Seconds between two looks at the fleet for the live stream, and between keep-alive comments.
EVENTS_POLL_S = 1.0
EVENTS_KEEPALIVE_S = 15.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MAX_JSON_BODY = 64 << 10


def error_response(error: EdgekitError) -> JSONResponse:
    """The one mapping of edgekit's errors to HTTP."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, UnauthorizedError) else None
    body = {"error": error.message, "kind": kind_of(error)}
    return JSONResponse(body, status_code=error.http_status, headers=headers)


def bundle_json(b: BundleRecord, *, signature: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": b.name,
        "version": b.version,
        "profile": b.profile,
        "sha256": b.sha256,
        "size_bytes": b.size_bytes,
        "format": b.format,
        "quantization": b.quantization,
        "model_size_bytes": b.model_size_bytes,
        "signer": b.signer,
        "uploaded": iso_time(b.uploaded_at),
    }
    if signature:
        out["inputs"] = b.manifest.get("inputs", [])
        out["outputs"] = b.manifest.get("outputs", [])
    return out


def models_json(records: list[BundleRecord], *, signature: bool = False) -> list[dict[str, Any]]:
    """Bundles grouped by model, then version (records come sorted by name, version, profile)."""
    grouped: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for b in records:
        grouped[b.name][b.version].append(bundle_json(b, signature=signature))
    return [
        {"name": name, "versions": [{"version": v, "bundles": bs} for v, bs in versions.items()]}
        for name, versions in grouped.items()
    ]


def device_json(d: DeviceRecord) -> dict[str, Any]:
    return {
        "id": d.id,
        "profile": d.profile,
        "labels": d.labels,
        "online": d.online,
        "last_seen": None if d.last_seen is None else iso_time(d.last_seen),
        "registered": iso_time(d.registered_at),
        "models": {
            name: {**m.detail, "active": m.active, "state": m.state, "reason": m.reason} for name, m in d.models.items()
        },
    }


class _RequireToken:
    """Refuses (401) every request without the hub's token, before routing, so unauthenticated
    clients learn nothing of the routes."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIX):
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                why = "no API token" if not given.strip() else "wrong API token"
                msg = f"{why}: send Authorization: Bearer TOKEN (the hub's token is in DATA/token)"
                await error_response(UnauthorizedError(msg))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Api:
    def __init__(
        self,
        registry: Registry,
        devices: Devices,
        artifacts: Artifacts,
        max_upload_bytes: int,
        fleet: Fleet | None,
        *,
        ingestor: Ingestor | None = None,
    ) -> None:
        self.ingestor = ingestor
        self._snapshot: tuple[float, str, str] = (0.0, "", "")  # when, fleet JSON, rollouts JSON
        self._snapshot_lock = asyncio.Lock()
        self.registry = registry
        self.devices = devices
        self.artifacts = artifacts
        self.max_upload_bytes = max_upload_bytes
        self._fleet = fleet

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            msg = "this hub has no MQTT broker to reach devices: start it with --broker mqtt://HOST:PORT"
            raise UnavailableError(msg)
        return self._fleet

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(document())

    async def push(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream":
            msg = f"send the bundle file as the raw body with Content-Type: application/octet-stream, not {ctype!r}"
            raise InvalidInputError(msg)
        cap = self.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise PayloadTooLargeError(self._too_big(int(declared)))
        fd, path = self.artifacts.new_upload()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise PayloadTooLargeError(self._too_big(size))
                    f.write(chunk)
            if size == 0:
                msg = "the body is empty: send the bundle file's bytes"
                raise InvalidInputError(msg)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        name = request.headers.get(BUNDLE_NAME_HEADER, "")
        where = name if _SAFE_NAME.match(name) else "upload"
        result = await run_in_threadpool(self.registry.push, path, where=where)
        body = {"bundle": bundle_json(result.bundle), "created": result.created}
        return JSONResponse(body, status_code=201 if result.created else 200)

    def _too_big(self, size: int) -> str:
        return (
            f"the upload is {size} bytes, over the hub's {self.max_upload_bytes}-byte cap; "
            "start the hub with a bigger --max-upload-mb if the bundle really is that big"
        )

    async def models(self, request: Request) -> Response:
        records = await run_in_threadpool(self.registry.bundles)
        return JSONResponse({"models": models_json(records)})

    async def model(self, request: Request) -> Response:
        records = await run_in_threadpool(self.registry.bundles, request.path_params["name"])
        return JSONResponse(models_json(records, signature=True)[0])

    async def delete_version(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        gone = await run_in_threadpool(self.registry.delete, name, version)
        return JSONResponse({"deleted": [bundle_json(b) for b in gone]})

    async def list_devices(self, request: Request) -> Response:
        found = await run_in_threadpool(self.devices.list)
        return JSONResponse({"devices": [device_json(d) for d in found]})

    async def device(self, request: Request) -> Response:
        found = await run_in_threadpool(self.devices.get, request.path_params["id"])
        return JSONResponse(device_json(found))

    async def label(self, request: Request) -> Response:
        body = await _json_body(request)
        labels = body.get("labels") if isinstance(body, dict) else None
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in labels.items()
        ):
            msg = 'give {"labels": {"KEY": "VALUE", "OTHER": null}}: string values set labels, null removes them'
            raise InvalidInputError(msg)
        found = await run_in_threadpool(self.devices.label, request.path_params["id"], labels)
        return JSONResponse(device_json(found))

    async def deploy(self, request: Request) -> Response:
        req = DeployRequest.from_json(await _json_body(request))
        return JSONResponse(await run_in_threadpool(self.fleet.deploy, req), status_code=201)

    async def rollback(self, request: Request) -> Response:
        req = DeployRequest.from_json(await _json_body(request), rollback=True)
        return JSONResponse(await run_in_threadpool(self.fleet.deploy, req), status_code=201)

    async def rollouts(self, request: Request) -> Response:
        return JSONResponse({"rollouts": await run_in_threadpool(self.fleet.summaries)})

    async def rollout(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.fleet.status, request.path_params["id"]))

    async def control(self, request: Request) -> Response:
        rid, action = request.path_params["id"], request.path_params["action"]
        if action not in ("pause", "resume", "cancel"):
            msg = f"no rollout action {action!r}: pause, resume or cancel"
            raise InvalidInputError(msg)
        await run_in_threadpool(self.fleet.control, rid, action)
        return JSONResponse(await run_in_threadpool(self.fleet.status, rid))

    # -- telemetry ------------------------------------------------------------------------------

    def _read(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.registry.store.read() as tx:
            return fn(tx.conn, *args, **kwargs)

    async def fleet_view(self, request: Request) -> Response:
        rows = await run_in_threadpool(self._read, fleet_rows)
        return JSONResponse({"devices": rows})

    async def fleet_device(self, request: Request) -> Response:
        device_id = request.path_params["id"]
        found = await run_in_threadpool(self.devices.get, device_id)  # 404 for an unknown device
        limit = _int_param(request, "limit", 120, 1, 10_000)
        history = await run_in_threadpool(self._read, device_history, device_id, limit=limit)
        newest = {name: items[-1]["version"] for name, items in history["models"].items() if items}
        history["validation"] = await run_in_threadpool(self._validation, newest, found.profile)
        return JSONResponse({**device_json(found), "telemetry": history})

    def _validation(self, versions: dict[str, int], profile: str) -> dict[str, Any]:
        """Per model, the validation output summary of the version a device runs (its profile's bundle
        when there is one), what the dashboard draws the live outputs against."""
        out: dict[str, Any] = {}
        for name, version in versions.items():
            try:
                bundles = [b for b in self.registry.bundles(name) if b.version == version]
            except NotFoundError:  # the model was never pushed here (a device's own store)
                continue
            chosen = next((b for b in bundles if b.profile == profile), bundles[0] if bundles else None)
            summary = (chosen.manifest.get("validation") or {}).get("outputs") if chosen is not None else None
            if summary:
                out[name] = summary
        return out

    # -- the dashboard ----------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return FileResponse(_WEB / "index.html", media_type="text/html")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "plotly.min.js":
            return FileResponse(_plotly_js(), media_type="text/javascript")
        if name not in _ASSETS:
            msg = f"no dashboard file {name!r}"
            raise NotFoundError(msg)
        return FileResponse(_WEB / name, media_type=_ASSETS[name])

    async def _snapshot_now(self) -> tuple[str, str]:
        """The fleet rows and rollout summaries as JSON, computed at most once per EVENTS_POLL_S for
        every client of the live stream together."""
        async with self._snapshot_lock:
            when, fleet, rollouts = self._snapshot
            if time.monotonic() - when >= EVENTS_POLL_S:
                rows = await run_in_threadpool(self._read, fleet_rows)
                fleet = json.dumps({"devices": rows}, separators=(",", ":"))
                summaries = await run_in_threadpool(self._fleet.summaries) if self._fleet is not None else None
                rollouts = json.dumps({"rollouts": summaries}, separators=(",", ":"))
                self._snapshot = (time.monotonic(), fleet, rollouts)
            return fleet, rollouts

    async def events(self, request: Request) -> Response:
        """Server-Sent Events: ``fleet`` (as GET /v1/fleet) and ``rollouts`` (as GET /v1/rollouts,
        ``null`` without a broker) whenever they change, a keep-alive comment every 15 s."""

        async def stream() -> AsyncIterator[str]:
            sent_fleet = sent_rollouts = ""
            quiet_since = time.monotonic()
            while True:
                fleet, rollouts = await self._snapshot_now()
                if fleet != sent_fleet:
                    yield f"event: fleet\ndata: {fleet}\n\n"
                    sent_fleet, quiet_since = fleet, time.monotonic()
                if rollouts != sent_rollouts:
                    yield f"event: rollouts\ndata: {rollouts}\n\n"
                    sent_rollouts, quiet_since = rollouts, time.monotonic()
                if time.monotonic() - quiet_since >= EVENTS_KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(EVENTS_POLL_S)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def telemetry(self, request: Request) -> Response:
        q = request.query_params
        device = q.get("device") or None
        since = _float_param(request, "since")
        limit = _int_param(request, "limit", MAX_PAGE, 1, MAX_PAGE)
        after: tuple[str, int] | None = None
        if q.get("after"):
            dev, _, seq = q["after"].rpartition(":")
            if not dev or not seq.isdigit():
                msg = f"after={q['after']!r}: give DEVICE:SEQ, the `next` of the previous page"
                raise InvalidInputError(msg)
            after = (dev, int(seq))
        rows = await run_in_threadpool(self._read, export_rows, device=device, since=since, after=after, limit=limit)
        nxt = f"{rows[-1]['device']}:{rows[-1]['seq']}" if len(rows) == limit else None
        return JSONResponse({"rows": rows, "next": nxt})

    async def telemetry_stats(self, request: Request) -> Response:
        if self.ingestor is None:
            return JSONResponse({"ingesting": False})
        return JSONResponse({"ingesting": True, "subscription": self.ingestor.subscription,
                             **self.ingestor.stats.as_dict()})  # fmt: skip


def _plotly_js() -> Path:
    """plotly.js as the plotly package ships it: served from the hub, no CDN (closed networks)."""
    try:
        import plotly
    except ImportError:
        msg = "the dashboard's charts need the plotly package: pip install plotly"
        raise NotFoundError(msg) from None
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        msg = f"the plotly package has no {path.name} (plotly {plotly.__version__}); reinstall plotly"
        raise NotFoundError(msg)
    return path


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        msg = f"{name}={raw!r}: give a whole number from {lo} to {hi}"
        raise InvalidInputError(msg)
    return int(raw)


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        msg = f"{name}={raw!r}: give unix seconds, e.g. {name}=1764624000"
        raise InvalidInputError(msg)
    return value


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > _MAX_JSON_BODY:
        msg = f"the JSON body is {len(raw)} bytes, over the {_MAX_JSON_BODY}-byte cap"
        raise PayloadTooLargeError(msg)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"the body is not JSON: {e}"
        raise InvalidInputError(msg) from None


async def _edgekit_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgekitError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; /openapi.json lists them"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; /openapi.json lists the methods"
    else:
        message = str(exc.detail)
    kind = "not_found" if exc.status_code == 404 else "http"
    return JSONResponse({"error": message, "kind": kind}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    message = f"internal error: {type(exc).__name__}: {exc} (a bug: the hub's log has the traceback)"
    return JSONResponse({"error": message, "kind": "internal"}, status_code=500)


def create_app(
    registry: Registry,
    devices: Devices,
    *,
    token: str,
    max_upload_bytes: int = 2 << 30,
    fleet: Fleet | None = None,
    ingestor: Ingestor | None = None,
) -> Starlette:
    api = _Api(registry, devices, registry.artifacts, max_upload_bytes, fleet, ingestor=ingestor)
    routes = [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/v1/bundles", api.push, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name}", api.model, methods=["GET"]),
        Route("/v1/models/{name}/versions/{version:int}", api.delete_version, methods=["DELETE"]),
        Route("/v1/devices", api.list_devices, methods=["GET"]),
        Route("/v1/devices/{id}", api.device, methods=["GET"]),
        Route("/v1/devices/{id}/labels", api.label, methods=["PATCH"]),
        Route("/v1/rollouts", api.deploy, methods=["POST"]),
        Route("/v1/rollouts", api.rollouts, methods=["GET"]),
        Route("/v1/rollouts/{id}", api.rollout, methods=["GET"]),
        Route("/v1/rollouts/{id}/{action}", api.control, methods=["POST"]),
        Route("/v1/rollbacks", api.rollback, methods=["POST"]),
        Route("/v1/fleet", api.fleet_view, methods=["GET"]),
        Route("/v1/fleet/{id}", api.fleet_device, methods=["GET"]),
        Route("/v1/telemetry", api.telemetry, methods=["GET"]),
        Route("/v1/telemetry/stats", api.telemetry_stats, methods=["GET"]),
        Route("/v1/events", api.events, methods=["GET"]),
        Route("/", api.index, methods=["GET"]),
        Route("/dashboard/{name}", api.asset, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_RequireToken, token=token)],
        exception_handlers={EdgekitError: _edgekit_error, HTTPException: _http_error, Exception: _internal_error},
    )
