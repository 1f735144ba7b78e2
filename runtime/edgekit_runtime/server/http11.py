"""The native HTTP/1.1 server: an asyncio protocol on httptools (llhttp) that calls ``App.dispatch``.

Why not uvicorn: measured on the 2-core bench machine (docs/benchmarks.md, "HTTP floor"), a
hello-world ASGI app under uvicorn costs about 34 µs of CPU per request and sends every reply in
two writes (head, then body); this protocol costs about 7 µs and sends one. For a weight-bound
model under load those microseconds come straight out of the engine's share of the cores. The
ASGI app (``server/app.py``) stays usable under any ASGI server; both share ``App.dispatch``.

What the protocol does: keep-alive and HTTP/1.0 close, pipelined requests answered in order,
``Expect: 100-continue``, chunked request bodies (decoded by httptools), a body limit enforced
while reading (413, connection closed), malformed requests answered 400 and closed, backpressure
(reading pauses while a connection has many requests in flight or the socket's send buffer is
full), idle and slow-request timeouts, requests of clients that hang up cancelled (their queued
rows are dropped by the batcher), and a graceful stop that finishes in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, NamedTuple, cast
from urllib.parse import unquote

import httptools
import orjson

from edgekit_runtime.server.app import App, ClientGoneError, too_large
from edgekit_runtime.server.errors import JSON, Reply

__all__ = ["HttpServer"]

log = logging.getLogger("edgekit_runtime.server")

_MAX_IN_FLIGHT = 32  # pipelined requests per connection before reading pauses
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BIG_BODY = 64 << 10  # replies at least this big go out with writelines (no copy into one buffer)
_PHRASES = {int(s): s.phrase.encode() for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Unknown"))


_STATUS_LINES = {s: _status_line(s) for s in _PHRASES}


class _Mode(NamedTuple):
    """How one reply is framed: keep the connection, a HEAD request (no body), an HTTP/1.0 client."""

    keep_alive: bool
    head: bool
    http10: bool


class _Clock:
    """The ``date`` header, formatted once a second rather than once a request."""

    def __init__(self) -> None:
        self._second = 0
        self._header = b""

    def header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._header


class HttpServer:
    """Serves ``app`` on listening sockets; ``stop()`` finishes in-flight requests first."""

    def __init__(
        self,
        app: App,
        *,
        keep_alive_s: float = 30.0,
        request_timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.keep_alive_s = keep_alive_s
        self.request_timeout_s = request_timeout_s
        self.clock = _Clock()
        self.connections: set[_Connection] = set()
        self.busy = 0  # connections with a request in flight that cannot send another before its answer
        app.runtime.set_idle_source(self.idle_clients)
        app.runtime.metrics.set_connection_source(lambda: (self.idle_clients(), self.busy))
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.stopping = False

    def idle_clients(self) -> int:
        """Connections that could send a request now: none in flight, or one that pipelines. The
        adaptive batching delay waits for no more requests than these (delay.py)."""
        return len(self.connections) - self.busy

    async def start(self, sock: Any) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=2048)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep(), name="edgekit-http-sweeper")

    async def _sweep(self) -> None:
        """Close idle keep-alive connections and requests that never finish arriving (slowloris)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_timeouts(now)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), then close everything."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            await server.wait_closed()


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, dispatch each as a task, answer them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Requests in arrival order: each reply's future and how the reply is framed.
        self.pending: deque[tuple[asyncio.Future[Reply], _Mode]] = deque()
        self.counted_busy = False  # counted in server.busy: one request in flight, not pipelining
        self.pipelined = False  # sent a request before the last one was answered: never counted busy
        self.continue_owed = False  # a 100 Continue to send once the replies before it are out
        self.closing = False  # no more requests are read; close once the pending ones are answered
        self.reading_paused = False
        self.writing_paused = False
        self.last_active = time.monotonic()
        self.request_started: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.refused = False

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but quacks alike
        self.server.connections.add(self)
        if self.server.stopping:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._not_busy()
        self.closing = True
        for fut, _ in self.pending:
            fut.cancel()  # nobody is left to answer; the batcher drops the cancelled request's rows
        self.pending.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (h2c, websocket) we do not speak: the request was answered as plain
            # HTTP/1.1; what follows on the wire is another protocol, so stop reading.
            self.closing = True
            if self.pending:
                fut, mode = self.pending[-1]
                self.pending[-1] = (fut, mode._replace(keep_alive=False))
            self._flush()
        except httptools.HttpParserError as e:
            if not self.refused and not self.closing:  # data after `Connection: close` is ignored
                self._refuse(400, f"malformed HTTP request: {e}")

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self.request_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        old = self.headers.get(key)
        self.headers[key] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        raw = self.headers.get(b"content-length")
        limit = self.app.max_body_bytes
        if raw is not None and raw.isdigit() and int(raw) > limit:
            self._refuse(413, too_large(int(raw), limit))
            return
        if self.headers.get(b"expect", b"").lower() == b"100-continue" and self.parser.get_http_version() != "1.0":
            # Not to HTTP/1.0 clients (RFC 9110 §10.1.1), and never ahead of earlier pipelined replies.
            if self.pending:
                self.continue_owed = True
            elif self.transport is not None:
                self.transport.write(_CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        if self.refused:
            return
        self.body_size += len(chunk)
        if self.body_size > self.app.max_body_bytes:
            self._refuse(413, too_large(self.body_size, self.app.max_body_bytes))
            return
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.request_started = None
        if self.refused or self.closing:
            return  # refused, or pipelined after a request that closes the connection
        method = self.parser.get_method().decode("ascii", "replace")
        keep_alive = bool(self.parser.should_keep_alive()) and not self.server.stopping
        try:
            path = httptools.parse_url(self.url).path.decode("utf-8", "replace")
        except httptools.HttpParserInvalidURLError:
            path = ""
        if "%" in path:
            path = unquote(path)
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        headers = self.headers
        task = asyncio.get_running_loop().create_task(
            self.app.dispatch(method, path or "/", headers.get, _constant(body))
        )
        self.continue_owed = False  # the body came without it
        if not keep_alive:
            self.closing = True
        self._queue(task, _Mode(keep_alive, method == "HEAD", self.parser.get_http_version() == "1.0"))

    # -- replies ----------------------------------------------------------------------------------

    def _queue(self, fut: asyncio.Future[Reply], mode: _Mode) -> None:
        self.pending.append((fut, mode))
        if len(self.pending) == 1:
            if not self.pipelined and not self.counted_busy:
                self.counted_busy = True
                self.server.busy += 1
        elif not self.pipelined:
            self.pipelined = True
            self._not_busy()
        fut.add_done_callback(self._flush)
        self._update_reading()

    def _flush(self, _done: object = None) -> None:
        """Write the finished replies at the head of the queue: pipelined answers keep their order."""
        pending = self.pending
        while pending and pending[0][0].done():
            fut, mode = pending.popleft()
            if fut.cancelled():
                continue
            exc = fut.exception()
            if isinstance(exc, ClientGoneError):
                continue
            if exc is not None:  # dispatch maps every error; this is a last resort, never a crash
                log.error("request handler failed", exc_info=exc)
                self.app.runtime.metrics.http_error(500, type(exc).__name__)
                reply = Reply(500, orjson.dumps({"error": f"internal error: {exc}"}))
                self._write(reply, mode._replace(keep_alive=False))
                continue
            self._write(fut.result(), mode)
        if not pending:
            self._not_busy()
        if not pending and self.continue_owed and self.transport is not None:
            self.continue_owed = False
            self.transport.write(_CONTINUE)
        if self.closing and not pending and self.transport is not None:
            self.transport.close()
        self._update_reading()

    def _write(self, reply: Reply, mode: _Mode) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.last_active = time.monotonic()
        body = reply.body
        head = [
            _STATUS_LINES.get(reply.status) or _status_line(reply.status),
            b"server: edgekit-runtime\r\n",
            self.server.clock.header(),
            b"content-type: ",
            reply.content_type,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        if reply.headers:
            for k, v in reply.headers:
                head += [k, b": ", v, b"\r\n"]
        if not mode.keep_alive:
            head.append(b"connection: close\r\n")
        elif mode.http10:
            head.append(b"connection: keep-alive\r\n")
        head.append(b"\r\n")
        if mode.head:
            transport.write(b"".join(head))  # a reply to HEAD has no body, only its length
        elif len(body) >= _BIG_BODY:
            transport.writelines([b"".join(head), body])
        else:
            head.append(body)
            transport.write(b"".join(head))

    def _not_busy(self) -> None:
        if self.counted_busy:
            self.counted_busy = False
            self.server.busy -= 1

    def _refuse(self, status: int, message: str) -> None:
        """Answer (after any pending replies) and close: the rest of this connection is unreadable.
        Counted like every other error reply (edgekit_http_errors_total, kind "http")."""
        self.app.runtime.metrics.http_error(status, "http")
        self.refused = True
        self.closing = True
        self.request_started = None
        ready: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        ready.set_result(Reply(status, orjson.dumps({"error": message}), JSON))
        self._queue(ready, _Mode(keep_alive=False, head=False, http10=False))

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_pause = self.closing or self.writing_paused or len(self.pending) >= _MAX_IN_FLIGHT
        if want_pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif not want_pause and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    # -- lifecycle --------------------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.request_started is not None and now - self.request_started > self.server.request_timeout_s:
            self._refuse(408, f"the request did not arrive within {self.server.request_timeout_s:g} s")
        elif not self.pending and self.request_started is None and now - self.last_active > self.server.keep_alive_s:
            transport.close()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.pending and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _constant(body: bytes) -> Callable[[], Awaitable[bytes]]:
    async def read() -> bytes:
        return body

    return read
