"""The HTTP app: a raw ASGI application with a small hand-written router.

Starlette's routing and request objects cost more per request than the whole inference of a small
model, so the request path here is: match the path with string operations, read the body with a
size limit, call the protocol handler, send one reply. Errors of any kind become a reply in
``server/errors.py``; nothing a client sends escapes as an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.errors import InvalidInputError, PayloadTooLargeError
from edgekit_runtime.metrics import CONTENT_TYPE
from edgekit_runtime.runtime import Runtime
from edgekit_runtime.server import v1, v2
from edgekit_runtime.server.errors import (
    MethodNotAllowedError,
    Reply,
    RouteNotFoundError,
    UnimplementedError,
    error_reply,
    json_reply,
)
from edgekit_runtime.server.openapi import openapi

__all__ = ["App", "BodyReader", "ClientGoneError", "HeaderLookup", "create_app", "too_large"]

log = logging.getLogger("edgekit_runtime.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
HeaderLookup = Callable[[bytes], "bytes | None"]
BodyReader = Callable[[], Awaitable[bytes]]


class ClientGoneError(Exception):
    """The client closed the connection before its request body arrived: nobody to answer."""


def _int_header(header: HeaderLookup, name: bytes) -> int | None:
    raw = header(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"header {name.decode()} must be a non-negative integer, got {raw.decode(errors='replace')!r}"
        raise InvalidInputError(msg)
    return value


def _method(method: str, *allowed: str) -> None:
    if method not in allowed:
        msg = f"method {method} not allowed here; use {' or '.join(allowed)}"
        raise MethodNotAllowedError(msg)


def _not_found(path: str) -> RouteNotFoundError:
    return RouteNotFoundError(f"no route {path!r}; see GET /openapi.json for the routes")


class App:
    """The ASGI app serving both protocols, /metrics and /openapi.json for one Runtime."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_body_bytes: int = 64 << 20,
        on_startup: Callable[[], None] | None = None,
        on_shutdown: Callable[[], None] | None = None,
        metrics_text: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        """``metrics_text``: what ``/metrics`` answers instead of this runtime's own metrics (a
        process of ``--workers`` answers for all of them)."""
        self.runtime = runtime
        self._metrics_text = metrics_text
        self.dp = DataPlane(runtime)
        self.max_body_bytes = max_body_bytes
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def startup(self) -> None:
        if self._on_startup is not None:
            self._on_startup()

    def shutdown(self) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.startup()
                except Exception as e:  # noqa: BLE001 - reported to uvicorn, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]

        def header(name: bytes) -> bytes | None:
            for k, v in headers:
                if k == name:
                    return bytes(v)
            return None

        async def body() -> bytes:
            return await self._body(header, receive)

        try:
            reply = await self.dispatch(scope["method"], scope["path"], header, body)
        except ClientGoneError:
            return
        out = [(b"content-type", reply.content_type), (b"content-length", str(len(reply.body)).encode())]
        if reply.headers:
            out += reply.headers
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})

    async def dispatch(self, method: str, path: str, header: HeaderLookup, body: BodyReader) -> Reply:
        """The transport-free request handler both servers call: any failure becomes an error reply.

        ``header(name)`` looks up a lower-case header; ``body()`` reads the whole body (within the limit)."""
        try:
            return await self._route(method, path, header, body)
        except ClientGoneError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a reply, mapped in one place
            return error_reply(e, self.runtime.metrics)

    async def _body(self, header: HeaderLookup, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        length = _int_header(header, b"content-length")
        if length is not None and length > limit:
            raise PayloadTooLargeError(too_large(length, limit))
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > limit:
                raise PayloadTooLargeError(too_large(len(body), limit))
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(too_large(size, limit))
            chunks.append(chunk)
        return b"".join(chunks)

    async def _route(self, method: str, path: str, header: HeaderLookup, body: BodyReader) -> Reply:
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        if path.startswith("/v1/models/"):
            return await self._v1(method, path, body)
        if path.startswith("/v2/models/"):
            return await self._v2_model(method, path, header, body)
        dp = self.dp
        if path == "/v2/health/live":
            _method(method, "GET")
            return json_reply({"live": dp.live()})
        if path == "/v2/health/ready":
            _method(method, "GET")
            ready = dp.ready()
            return json_reply({"ready": ready}, 200 if ready else 503)
        if path == "/v2":
            _method(method, "GET")
            return json_reply(dp.server_metadata())
        if path == "/metrics":
            _method(method, "GET")
            text = self.runtime.metrics.render() if self._metrics_text is None else await self._metrics_text()
            return Reply(200, text, CONTENT_TYPE.encode())
        if path == "/openapi.json":
            _method(method, "GET")
            return json_reply(openapi(self.dp))
        if path == "/v2/repository/index":
            _method(method, "POST", "GET")
            return json_reply(dp.repository_index())
        if path.startswith("/v2/repository/models/"):
            name, _, action = path[len("/v2/repository/models/") :].partition("/")
            if action == "load" and name:
                _method(method, "POST")
                return await v2.load(dp, name)
        raise _not_found(path)

    async def _v1(self, method: str, path: str, body: BodyReader) -> Reply:
        rest = path[len("/v1/models/") :]
        verb = None
        last_slash = rest.rfind("/")
        colon = rest.find(":", last_slash + 1)
        if colon >= 0:
            rest, verb = rest[:colon], rest[colon + 1 :]
        dp = self.dp
        parts = rest.split("/")
        if len(parts) >= 3 and parts[0] and parts[1] == "labels":  # NAME/labels/L[/TAIL]: as its version
            rest = "/".join([parts[0], "versions", v1.label_version(dp, parts[0], parts[2]), *parts[3:]])
        name, version, tail = _split_model_path(rest, path)
        if verb is not None:
            if tail:
                raise _not_found(path)
            _method(method, "POST")
            if verb == "predict":
                return await v1.predict(dp, name, version, await body())
            if verb == "reload" and version is None:
                return await v1.reload(dp, name)
            if verb in ("classify", "regress"):
                msg = f":{verb} is not implemented; use :predict"
                raise UnimplementedError(msg)
            raise _not_found(path)
        if not tail:
            _method(method, "GET")
            return v1.status(dp, name, version)
        if tail == "metadata":
            _method(method, "GET")
            return v1.metadata(dp, name, version)
        raise _not_found(path)

    async def _v2_model(self, method: str, path: str, header: HeaderLookup, body: BodyReader) -> Reply:
        name, version, tail = _split_model_path(path[len("/v2/models/") :], path)
        dp = self.dp
        if tail == "infer":
            _method(method, "POST")
            header_length = _int_header(header, v2.HEADER_LENGTH)
            return await v2.infer(dp, name, version, await body(), header_length)
        if not tail:
            _method(method, "GET")
            return v2.model_metadata(dp, name, version)
        if tail == "ready":
            _method(method, "GET")
            return v2.model_ready(dp, name, version)
        if tail == "feedback" and version is None:
            _method(method, "POST")
            return v2.feedback(dp, name, await body())
        raise _not_found(path)


def _split_model_path(rest: str, path: str) -> tuple[str, str | None, str]:
    """``NAME[/versions/V][/TAIL]`` -> (name, version, tail)."""
    parts = rest.split("/")
    name = parts[0]
    if not name:
        raise _not_found(path)
    version = None
    i = 1
    if len(parts) >= 3 and parts[1] == "versions":
        version = parts[2]
        i = 3
    tail = "/".join(parts[i:])
    return name, version, tail


def too_large(size: int, limit: int) -> str:
    return f"request body of {size} bytes is over the limit of {limit} bytes; raise it with --max-body-mb"


def create_app(runtime: Runtime, *, max_body_bytes: int = 64 << 20, **kwargs: Any) -> App:
    return App(runtime, max_body_bytes=max_body_bytes, **kwargs)
