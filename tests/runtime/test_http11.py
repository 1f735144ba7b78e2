"""The native HTTP/1.1 server over raw sockets: keep-alive, pipelining, 100-continue, chunked bodies, timeouts,
the body limit, malformed requests, HTTP/1.0, clients that hang up, encoded paths and a graceful stop."""

from __future__ import annotations

import email.utils
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.conftest import Models, reference
from tests.runtime.test_socket import free_port, start_server, wait_ready

X = np.random.default_rng(7).normal(size=(3, 4)).astype(np.float32)
LIMIT = int(0.01 * (1 << 20))  # --max-body-mb 0.01
INFER = orjson.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": X.ravel().tolist()}]})
PREDICT = orjson.dumps({"instances": X.tolist()})
Response = tuple[int, dict[str, str], bytes]


def _serve(bundle: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    args = ("--port", str(port), "--http", "native", "--poll-seconds", "0", "--log-level", "warning")
    return start_server(str(bundle), *args, *extra)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.terminate()
    try:
        out = proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    return out.decode(errors="replace")


@pytest.fixture(scope="module")
def port(bundles: dict[str, Path]) -> Iterator[int]:
    p = free_port()
    proc = _serve(bundles["mlp"], p, "--max-body-mb", "0.01")
    try:
        wait_ready(proc, p)
        yield p
    finally:
        _stop(proc)


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()


def post_head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def post(path: str, body: bytes) -> bytes:
    return post_head(path, f"Content-Length: {len(body)}\r\n") + body


def chunked(body: bytes, size: int) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise AssertionError("the server closed the connection before the responses were complete")
    return data


def http(sock: socket.socket, raw: bytes, count: int = 1) -> list[Response]:
    """Send ``raw`` and read ``count`` responses (1xx included), each framed by its content-length;
    fails on bytes beyond them (a reply sent twice, or a body where none belongs)."""
    if raw:
        sock.sendall(raw)
    buf, out = b"", list[Response]()
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            buf += _recv(sock)
        head, buf = buf.split(b"\r\n\r\n", 1)
        first, *lines = head.decode("latin-1").split("\r\n")
        version, status, _ = first.split(" ", 2)
        assert version == "HTTP/1.1", first
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        n = 0 if status.startswith("1") else int(headers["content-length"])
        while len(buf) < n:
            buf += _recv(sock)
        out.append((int(status), headers, buf[:n]))
        buf = buf[n:]
    assert buf == b"", f"unexpected bytes after {count} response(s): {buf[:200]!r}"
    return out


def assert_closed(sock: socket.socket) -> None:
    sock.settimeout(5)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return
    assert data == b"", f"expected the server to close the connection, got {data[:200]!r}"


def assert_serves(port: int, model_files: Models) -> None:
    with connect(port) as sock:
        [(status, _, body)] = http(sock, post("/v2/models/mlp/infer", INFER))
    assert status == 200, body
    out = np.asarray(orjson.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    np.testing.assert_allclose(out, reference(model_files, X), atol=1e-4)


def test_keep_alive_answers_two_requests_on_one_connection(port: int) -> None:
    with connect(port) as sock:
        for _ in range(2):
            [(status, headers, body)] = http(sock, get("/v2/health/live"))
            assert status == 200
            assert orjson.loads(body) == {"live": True}
            assert headers["content-length"] == str(len(body))
            assert headers["server"] == "edgekit-runtime"
            assert headers["content-type"] == "application/json"
            assert "connection" not in headers
            assert abs(email.utils.parsedate_to_datetime(headers["date"]).timestamp() - time.time()) < 60


@pytest.mark.parametrize("piece", [0, 7], ids=["one-send", "7-byte-pieces"])
def test_pipelined_requests_are_answered_in_order(port: int, model_files: Models, piece: int) -> None:
    # The slow inference comes first: replies written in completion order would put it last.
    raw = post("/v2/models/mlp/infer", INFER) + get("/v2/health/live") + get("/nope")
    with connect(port) as sock:
        if piece:  # all but the last byte dribbled in small sends; http() sends that one
            cut = len(raw) - 1
            for i in range(0, cut, piece):
                sock.sendall(raw[i : min(i + piece, cut)])
            raw = raw[cut:]
        (s1, _, infer), (s2, _, live), (s3, _, missing) = http(sock, raw, 3)
    assert (s1, s2, s3) == (200, 200, 404)
    out = np.asarray(orjson.loads(infer)["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    np.testing.assert_allclose(out, reference(model_files, X), atol=1e-4)
    assert orjson.loads(live) == {"live": True}
    assert "/nope" in orjson.loads(missing)["error"]


def test_expect_100_continue(port: int, model_files: Models) -> None:
    head = post_head("/v1/models/mlp:predict", f"Content-Length: {len(PREDICT)}\r\nExpect: 100-continue\r\n")
    with connect(port) as sock:
        [(status, _, body)] = http(sock, head)  # before any of the body is sent
        assert (status, body) == (100, b"")
        [(status, _, body)] = http(sock, PREDICT)
    assert status == 200, body
    np.testing.assert_allclose(orjson.loads(body)["predictions"], reference(model_files, X), atol=1e-4)


def test_100_continue_comes_after_earlier_pipelined_replies(port: int) -> None:
    head = post_head("/v1/models/mlp:predict", f"Content-Length: {len(PREDICT)}\r\nExpect: 100-continue\r\n")
    with connect(port) as sock:
        replies = http(sock, post("/v2/models/mlp/infer", INFER) + head, 2)
        assert [r[0] for r in replies] == [200, 100]


def test_no_100_continue_for_http10(port: int) -> None:
    raw = f"POST /v1/models/mlp:predict HTTP/1.0\r\nContent-Length: {len(PREDICT)}\r\nExpect: 100-continue\r\n\r\n"
    with connect(port) as sock:
        [(status, _, _)] = http(sock, raw.encode() + PREDICT)
        assert status == 200


def test_chunked_request_bodies_are_decoded(port: int, model_files: Models) -> None:
    head = "Transfer-Encoding: chunked\r\n"
    want = reference(model_files, X)
    with connect(port) as sock:
        raw = post_head("/v1/models/mlp:predict", head) + b"".join(chunked(PREDICT, 10)) + b"0\r\n\r\n"
        [(status, _, body)] = http(sock, raw)
        assert status == 200, body
        np.testing.assert_allclose(orjson.loads(body)["predictions"], want, atol=1e-4)
        sock.sendall(post_head("/v2/models/mlp/infer", head))
        for chunk in chunked(INFER, 100):  # one send a chunk: the body spans many reads
            sock.sendall(chunk)
        [(status, _, body)] = http(sock, b"0\r\n\r\n")
    assert status == 200, body
    out = np.asarray(orjson.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_body_over_the_limit_is_413_and_closes(port: int, model_files: Models) -> None:
    with connect(port) as sock:  # exactly at the limit is fine (JSON allows trailing whitespace)
        [(status, _, body)] = http(sock, post("/v1/models/mlp:predict", PREDICT + b" " * (LIMIT - len(PREDICT))))
        assert status == 200, body
    with connect(port) as sock:  # refused from the headers alone: no 100 Continue, no waiting for the body
        head = post_head("/v1/models/mlp:predict", f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n")
        [(status, headers, body)] = http(sock, head)
        assert (status, headers["connection"]) == (413, "close")
        assert f"request body of {LIMIT + 1} bytes is over the limit of {LIMIT} bytes" in orjson.loads(body)["error"]
        assert_closed(sock)
    with connect(port) as sock:  # chunked, growing over the limit while it is read
        sock.sendall(post_head("/v1/models/mlp:predict", "Transfer-Encoding: chunked\r\n") + b"1770\r\n" + b"1" * 6000)
        [(status, headers, body)] = http(sock, b"\r\n1770\r\n" + b"2" * 6000)  # 2 x 6000 > LIMIT
        assert (status, headers["connection"]) == (413, "close")
        assert f"over the limit of {LIMIT} bytes" in orjson.loads(body)["error"]
        assert_closed(sock)
    assert_serves(port, model_files)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS ClientHello
        b"GARBAGE\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1 extra\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /v1/models/mlp:predict HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/models/mlp:predict HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/models/mlp:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["tls", "garbage", "request-line", "header", "content-length", "cl-and-te", "chunk-size"],
)
def test_malformed_requests_are_400_and_close(port: int, model_files: Models, raw: bytes) -> None:
    with connect(port) as sock:
        [(status, headers, body)] = http(sock, raw)
        assert (status, headers["connection"]) == (400, "close")
        assert orjson.loads(body)["error"].startswith("malformed HTTP request")
        assert_closed(sock)
    with connect(port) as sock:  # a good request pipelined before garbage is still answered, first
        replies = http(sock, get("/v2/health/live") + raw, 2)
        assert [r[0] for r in replies] == [200, 400]
        assert_closed(sock)
    assert_serves(port, model_files)


def test_http10_and_connection_close_end_the_connection(port: int) -> None:
    for raw in (get("/v2/health/live", version="1.0"), get("/v2/health/live", "Connection: close\r\n")):
        with connect(port) as sock:
            [(status, headers, _)] = http(sock, raw)
            assert (status, headers["connection"]) == (200, "close")
            assert_closed(sock)


def test_nothing_follows_the_reply_to_connection_close(port: int) -> None:
    with connect(port) as sock:  # the request after "Connection: close" must be ignored, not answered
        [(status, headers, _)] = http(sock, get("/v2/health/live", "Connection: close\r\n") + get("/v2/health/live"))
        assert (status, headers["connection"]) == (200, "close")
        assert_closed(sock)


def test_clients_that_hang_up_do_not_break_the_server(port: int, model_files: Models) -> None:
    rst = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
    cases = [
        (post("/v2/models/mlp/infer", INFER), None),
        (post("/v2/models/mlp/infer", INFER) * 20, rst),
        (post_head("/v2/models/mlp/infer", "Content-Length: 500\r\n") + INFER[:50], None),
        (post_head("/v2/models/mlp/infer", "Transfer-Encoding: chunked\r\n") + chunked(INFER, 64)[0], rst),
    ]
    for raw, linger in cases:
        sock = connect(port)
        if linger:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.sendall(raw)
        sock.close()
    time.sleep(0.2)
    assert_serves(port, model_files)
    with connect(port) as sock:
        assert http(sock, get("/v2/health/ready"))[0][0] == 200


def test_percent_encoded_paths_route_like_decoded_ones(port: int) -> None:
    with connect(port) as sock:
        [(plain_status, _, plain)] = http(sock, get("/v2/models/mlp/ready"))
        assert plain_status == 200
        for path in ("/v2/models/ml%70/ready", "/v2/models/%6d%6C%70/ready", "/v2/models/mlp/ready?q=%2F"):
            [(status, _, body)] = http(sock, get(path))
            assert (status, body) == (200, plain), path
        [(status, _, body)] = http(sock, get("/v2/models/ml%71/ready"))
        assert status != 200
        assert b"mlq" in body


def test_head_reply_has_no_body(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
        reply = sock.recv(65536)
        assert reply.endswith(b"\r\n\r\n"), reply


def test_sigterm_finishes_and_exits_0(bundles: dict[str, Path]) -> None:
    p = free_port()
    proc = _serve(bundles["mlp"], p, "--log-level", "info")  # the stopping line is INFO
    try:
        wait_ready(proc, p)
        idle = connect(p)
        assert http(idle, get("/v2/health/live"))[0][0] == 200
        proc.send_signal(signal.SIGTERM)
        assert_closed(idle)  # an idle keep-alive connection is closed at once, not after the 10 s grace
        idle.close()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            out = _stop(proc)
    assert proc.returncode == 0, out
    assert "finishing requests in flight" in out


@pytest.fixture
def quick_timeouts() -> Iterator[int]:
    """An in-process native server (no models) with half-second timeouts, on a real socket."""
    import asyncio
    import threading

    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.server.app import create_app
    from edgekit_runtime.server.http11 import HttpServer
    from edgekit_runtime.server.run import bind

    runtime = Runtime()
    server = HttpServer(create_app(runtime), keep_alive_s=0.5, request_timeout_s=0.5)
    sock = bind("127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start(sock))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield sock.getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1.0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        sock.close()
        runtime.close()


def test_idle_keep_alive_connection_is_closed(quick_timeouts: int) -> None:
    with connect(quick_timeouts) as sock:
        [(status, _, _)] = http(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        time.sleep(2.5)  # keep_alive_s 0.5; the sweeper looks once a second
        assert_closed(sock)


def test_request_that_never_finishes_arriving_gets_408(quick_timeouts: int) -> None:
    with connect(quick_timeouts) as sock:
        sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        [(status, headers, body)] = http(sock, b"")
        assert status == 408
        assert headers["connection"] == "close"
        assert "did not arrive within 0.5 s" in orjson.loads(body)["error"]
        assert_closed(sock)
    with connect(quick_timeouts) as sock:  # and the server still serves
        [(status, _, _)] = http(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200


def _metric(port: int, name: str) -> float:
    with connect(port) as sock:
        [(status, _, body)] = http(sock, get("/metrics"))
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == {"model": "mlp", "version": "1"}:
                return float(s.value)
    raise AssertionError(f"no {name} for mlp/1 in the metrics")


@pytest.mark.parametrize("linger", [None, struct.pack("ii", 1, 0)], ids=["close", "reset"])
def test_the_queued_rows_of_a_client_that_hangs_up_are_dropped(
    bundles: dict[str, Path], model_files: Models, linger: bytes | None
) -> None:
    p = free_port()
    # batches of 4 rows that wait ten minutes for company (TF Serving's rule): a 3-row request stays queued
    wait = ("--batch-timeout-micros", "600000000", "--batch-timeout-policy", "fixed")
    proc = _serve(bundles["mlp"], p, "--max-batch-size", "4", *wait)
    try:
        wait_ready(proc, p)
        rows_before = _metric(p, "edgekit_batch_size_sum")
        sock = connect(p)
        if linger:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.sendall(post("/v1/models/mlp:predict", PREDICT))  # 3 rows
        end = time.monotonic() + 30
        while _metric(p, "edgekit_queue_depth") < 3:
            assert time.monotonic() < end, "the request never reached the queue"
            time.sleep(0.02)
        sock.close()  # hang up while the rows wait
        for _ in range(2):  # round trips after the hang-up: the server has seen it by their end
            _metric(p, "edgekit_queue_depth")
        one = orjson.dumps({"instances": X[:1].tolist()})
        with connect(p) as other:  # one row: 3 + 1 fill the batch, unless the 3 were dropped
            [(status, _, body)] = http(other, post("/v1/models/mlp:predict", one))
        assert status == 200, body
        np.testing.assert_allclose(orjson.loads(body)["predictions"], reference(model_files, X[:1]), atol=1e-4)
        assert _metric(p, "edgekit_batch_size_sum") - rows_before == 1  # the hung-up client's rows never ran
        assert _metric(p, "edgekit_queue_depth") == 0
    finally:
        _stop(proc)


def _http_errors(port: int, code: int, kind: str) -> float:
    with connect(port) as sock:
        [(status, _, body)] = http(sock, get("/metrics"))
    assert status == 200
    line = f'edgekit_http_errors_total{{code="{code}",kind="{kind}"}} '
    values = [float(ln[len(line) :]) for ln in body.decode().splitlines() if ln.startswith(line)]
    return values[0] if values else 0.0


def test_the_servers_own_refusals_are_counted_like_every_error_reply(port: int) -> None:
    before = (_http_errors(port, 400, "http"), _http_errors(port, 413, "http"))
    with connect(port) as sock:
        assert http(sock, b"GARBAGE\r\n\r\n")[0][0] == 400
    with connect(port) as sock:
        assert http(sock, post_head("/v1/models/mlp:predict", f"Content-Length: {LIMIT + 1}\r\n"))[0][0] == 413
    assert (_http_errors(port, 400, "http"), _http_errors(port, 413, "http")) == (before[0] + 1, before[1] + 1)


def _connections(port: int) -> dict[str, float]:
    """edgekit_http_connections by state, read over a fresh connection (which counts as waiting)."""
    with connect(port) as sock:
        [(status, _, body)] = http(sock, get("/metrics"))
    assert status == 200
    found = {
        s.labels["state"]: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "edgekit_http_connections"
    }
    assert set(found) == {"ready", "waiting"}, found
    return found


def test_the_server_counts_connections_that_could_send_and_those_waiting_for_an_answer(
    bundles: dict[str, Path],
) -> None:
    """What the adaptive delay bounds its wait by: a client waiting for its answer sends nothing more."""
    p = free_port()
    wait = ("--batch-timeout-micros", "600000000", "--batch-timeout-policy", "fixed")  # a 3-row request stays queued
    proc = _serve(bundles["mlp"], p, "--max-batch-size", "4", *wait)
    socks: list[socket.socket] = []
    try:
        wait_ready(proc, p)
        assert _connections(p) == {"ready": 0, "waiting": 1}
        for _ in range(2):  # two keep-alive clients, answered and now idle
            s = connect(p)
            socks.append(s)
            assert http(s, get("/v2/health/live"))[0][0] == 200
        piped = connect(p)  # one that pipelines: it may send more while waiting, so it stays ready
        socks.append(piped)
        assert [r[0] for r in http(piped, get("/v2/health/live") * 2, count=2)] == [200, 200]
        assert _connections(p) == {"ready": 3, "waiting": 1}
        stuck = connect(p)
        socks.append(stuck)
        stuck.sendall(post("/v1/models/mlp:predict", PREDICT))  # 3 rows: waits for a 4th
        end = time.monotonic() + 30
        while _metric(p, "edgekit_queue_depth") < 3:
            assert time.monotonic() < end, "the request never reached the queue"
            time.sleep(0.02)
        assert _connections(p) == {"ready": 3, "waiting": 2}
        stuck.close()  # hangs up: neither ready nor waiting any more
        end = time.monotonic() + 30
        while _connections(p) != {"ready": 3, "waiting": 1}:
            assert time.monotonic() < end, "the closed connection is still counted"
            time.sleep(0.02)
    finally:
        for s in socks:
            s.close()
        _stop(proc)
