"""The HTTP floor: what answering one POST costs each HTTP server edgekit can run on, with no model.

A hello-world answer to a 2.2 kB POST (the size of scenario 1's binary request), served by
(a) uvicorn with uvloop + httptools and a minimal ASGI app, and (b) a bare asyncio protocol on
uvloop + httptools, the base of ``edgekit_runtime/server/http11.py``; (c) the real edgekit runtime
answering ``/v2/health/live`` with its native server and (d) with ``--http uvicorn``. Load: wrk in a
separate process, keep-alive, fixed concurrency. Prints req/s and server CPU µs per request.

    python bench/http_floor.py                 # 10 s per server, concurrency 64
    python bench/http_floor.py --duration 2    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _load import run_wrk, wrk_version
from _servers import free_port

BODY = bytes(range(256)) * 9  # 2,304 bytes
REPLY = b'{"ok":1}'


async def _asgi_app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": REPLY})


def _serve_uvicorn(port: int) -> None:
    import uvicorn

    uvicorn.run(
        _asgi_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )


def _serve_bare(port: int) -> None:
    import httptools
    import uvloop

    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(REPLY)

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []

        def on_body(self, chunk: bytes) -> None:
            self.body.append(chunk)

        def on_message_complete(self) -> None:
            b"".join(self.body)
            self.body = []
            self.transport.write(head + REPLY)  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port, backlog=2048)
        await server.serve_forever()

    uvloop.run(main())


def _wait(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"server exited with {proc.returncode}"
            raise RuntimeError(msg)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per server (default 10)")
    p.add_argument("--connections", type=int, default=64, help="concurrency (default 64)")
    p.add_argument("--serve", choices=["uvicorn", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        (_serve_uvicorn if args.serve == "uvicorn" else _serve_bare)(args.port)
        return
    exe = Path(sys.executable).with_name("edgekit-runtime")
    print(f"# HTTP floor: {args.connections} keep-alive connections, {args.duration:g} s each, {len(BODY)} B POST")
    print(f"# {wrk_version()}; Python {sys.version.split()[0]}")
    servers = [
        ("uvicorn + httptools + uvloop, hello-world ASGI app", "/", ["--serve", "uvicorn"]),
        ("bare httptools protocol on uvloop", "/", ["--serve", "bare"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, path, extra in servers:
            port = free_port()
            cmd = [sys.executable, __file__, *extra, "--port", str(port)]
            run(label, cmd, port, path, args, work)
        # The runtime itself, no model: its cheapest route, behind both of its HTTP servers.
        for http in ("native", "uvicorn"):
            port = free_port()
            store = work / "empty-store"
            store.mkdir(exist_ok=True)
            cmd = [str(exe), "serve", str(store), "--port", str(port), "--log-level", "warning", f"--http={http}"]
            run(
                f"edgekit-runtime --http {http}, POST /v2/repository/index",
                cmd,
                port,
                "/v2/repository/index",
                args,
                work,
            )


def run(label: str, cmd: list[str], port: int, path: str, args: argparse.Namespace, work: Path) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(port, proc)
        url = f"http://127.0.0.1:{port}{path}"
        headers = {"Content-Type": "application/octet-stream"}
        run_wrk(url, BODY, headers, connections=args.connections, duration_s=1.0, server_pid=proc.pid, work_dir=work)
        r = run_wrk(
            url,
            BODY,
            headers,
            connections=args.connections,
            duration_s=args.duration,
            server_pid=proc.pid,
            work_dir=work,
        )
        rate = r.requests / r.duration_s
        print(
            f"{label}: {rate:,.0f} answers/s, p99 {r.p99_ms:.2f} ms, "
            f"server {r.server_cores:.2f} cores = {r.server_cores * 1e6 / rate:.1f} µs CPU/answer, "
            f"wrk {r.wrk_cores:.2f} cores, other {r.other_cores:.2f}",
            flush=True,
        )
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    main()
