"""Run the app on a socket bound up front: the native HTTP/1.1 server (``server/http11.py``) on uvloop
by default, or uvicorn (``http="uvicorn"``, kept for comparison and for ASGI tooling; an extra,
``edgekit-ml-runtime[uvicorn]``, that the device install leaves out).

The socket is bound before any model loads, so a busy port fails at once with a clear message,
and ``/v2/health/live`` answers while the models are still loading (``/v2/health/ready`` turns 200
once every initially given model serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import importlib.util
import logging
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from edgekit_runtime.config import HTTP_SERVERS
from edgekit_runtime.errors import EdgekitError, MissingDependencyError, UnavailableError
from edgekit_runtime.runtime import Runtime
from edgekit_runtime.server.app import App, create_app
from edgekit_runtime.server.http11 import HttpServer

__all__ = ["bind", "check_http_server", "serve"]

_GC_THRESHOLD = 50_000

log = logging.getLogger("edgekit_runtime.server")


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A listening TCP socket; UnavailableError naming the port when it is taken.

    ``reuse_port``: SO_REUSEPORT, so several processes (``--workers``) listen on one port and the
    kernel spreads the connections. ``listen=False`` only reserves the port: the supervisor holds
    it so a busy port fails at once, and takes no connections (Linux spreads them over listening
    sockets only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            msg = f"port {port} on {host} is already in use; choose another with --port"
        else:
            msg = f"cannot listen on {host}:{port}: {e.strerror or e}"
        raise UnavailableError(msg) from None
    sock.set_inheritable(True)
    return sock


def serve(
    runtime: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8500,
    max_body_bytes: int = 64 << 20,
    poll_seconds: float = 2.0,
    log_level: str = "info",
    http: str = "native",
    on_loaded: Callable[[], object] | None = None,
    reuse_port: bool = False,
    metrics_text: Callable[[], Awaitable[bytes]] | None = None,
) -> None:
    """Serve until interrupted: bind, start the HTTP server, load models in the background, close on exit.

    ``reuse_port`` and ``metrics_text`` (what ``/metrics`` answers) are for a process of ``--workers``."""
    if http not in HTTP_SERVERS:
        msg = f"unknown HTTP server {http!r}; choose one of {', '.join(HTTP_SERVERS)}"
        raise ValueError(msg)
    check_http_server(http)
    sock = bind(host, port, reuse_port=reuse_port)
    bound_port = sock.getsockname()[1]
    stopper = _Stopper()
    failure: list[EdgekitError] = []

    def load() -> None:
        runtime.start(poll_seconds=poll_seconds)
        err = runtime.startup_failure()
        if err is not None:
            failure.append(err)
            stopper.stop()
            return
        reasons = runtime.readiness()
        if reasons:
            log.warning("not ready: %s", "; ".join(reasons))
        if on_loaded is not None:
            on_loaded()

    loader = threading.Thread(target=load, name="edgekit-load", daemon=True)

    def on_shutdown() -> None:
        if loader.is_alive():
            loader.join()
        runtime.close()

    app = create_app(
        runtime,
        max_body_bytes=max_body_bytes,
        on_startup=loader.start,
        on_shutdown=on_shutdown,
        metrics_text=metrics_text,
    )
    # The batch workers and the event loop share the GIL: hand it over faster than the 5 ms
    # default so a worker whose engine call just returned does not wait for the loop's time slice.
    sys.setswitchinterval(0.001)
    tune_gc()
    log.info("edgekit-runtime serving on http://%s:%d (%s HTTP server)", host, bound_port, http)
    try:
        if http == "uvicorn":
            _run_uvicorn(app, sock, log_level, stopper)
        else:
            _run(_serve_native(app, sock, stopper))
    finally:
        sock.close()
    if failure:
        raise failure[0]


class _Stopper:
    """Stops the running server from another thread (the loader, when nothing can be served)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop: Callable[[], object] | None = None
        self._requested = False

    def attach(self, stop: Callable[[], object]) -> None:
        with self._lock:
            self._stop = stop
            requested = self._requested
        if requested:
            stop()

    def stop(self) -> None:
        with self._lock:
            self._requested = True
            stop = self._stop
        if stop is not None:
            stop()


def tune_gc() -> None:
    """Keep Python's cyclic garbage collector off the request path.

    Requests allocate many short-lived, acyclic objects (dicts, futures, tasks, arrays); with the
    default threshold a young-generation pass runs every 700 allocations, and the full passes it
    escalates to walk every object of the process, the imported libraries included. Measured on
    the bench machine (docs/benchmarks.md): p99 at concurrency 64 fell from about 20 ms to 6 ms.
    ``gc.freeze()`` moves everything alive now (modules, the runtime) out of the collector's sight;
    the higher threshold makes passes rarer. Reference counting still frees almost everything at once.
    """
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 20, 100)


def _run(main: Any) -> None:
    if importlib.util.find_spec("uvloop"):
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def _serve_native(app: App, sock: socket.socket, stopper: _Stopper) -> None:
    """Start the models' loader, serve until SIGINT/SIGTERM (or the stopper), finish in-flight requests, close."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not main thread
            loop.add_signal_handler(sig, stop.set)
    stopper.attach(partial(loop.call_soon_threadsafe, stop.set))
    server = HttpServer(app)
    app.startup()
    try:
        await server.start(sock)
        await stop.wait()
        log.info("edgekit-runtime stopping: finishing requests in flight")
    finally:
        await server.stop()
        await asyncio.to_thread(app.shutdown)


def check_http_server(http: str) -> None:
    """MissingDependencyError (one line naming the pip command) when ``http`` is uvicorn and it is not
    installed: it is an extra, so the device install does not carry it."""
    if http == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        msg = "--http uvicorn needs uvicorn, which is not installed: pip install 'edgekit-ml-runtime[uvicorn]'"
        raise MissingDependencyError(msg)


def _run_uvicorn(app: App, sock: socket.socket, log_level: str, stopper: _Stopper) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level=log_level.lower(),
        backlog=2048,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True  # uvicorn polls it on its loop

    stopper.attach(stop)
    server.run(sockets=[sock])
