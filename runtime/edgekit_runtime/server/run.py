"""Run the app with uvicorn (uvloop + httptools when installed) on a socket bound up front.

The socket is bound before any model loads, so a busy port fails at once with a clear message,
and ``/v2/health/live`` answers while the models are still loading (``/v2/health/ready`` turns 200
once every initially given model serves).
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
import sys
import threading

import uvicorn

from edgekit_runtime.errors import UnavailableError
from edgekit_runtime.runtime import Runtime
from edgekit_runtime.server.app import create_app

__all__ = ["bind", "serve"]

log = logging.getLogger("edgekit_runtime.server")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; UnavailableError naming the port when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
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
) -> None:
    """Serve until interrupted: bind, start uvicorn, load models in the background, close on exit."""
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    loader = threading.Thread(
        target=runtime.start, kwargs={"poll_seconds": poll_seconds}, name="edgekit-load", daemon=True
    )

    def on_shutdown() -> None:
        loader.join()
        runtime.close()

    app = create_app(runtime, max_body_bytes=max_body_bytes, on_startup=loader.start, on_shutdown=on_shutdown)
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
    # The batch workers and the event loop share the GIL: hand it over faster than the 5 ms
    # default so a worker whose engine call just returned does not wait for the loop's time slice.
    sys.setswitchinterval(0.001)
    log.warning("edgekit-runtime serving on http://%s:%d", host, bound_port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
