"""Multi-process serving (``serve --workers N``): N serving processes on one port, one supervisor.

Each worker is a fresh interpreter (``python -m edgekit_runtime.server.workers FD``) that serves
exactly like ``serve`` without ``--workers``: its own Runtime, engines and batchers, its own
socket on the shared port (SO_REUSEPORT: the kernel spreads the connections). The supervisor (the
process the user started) holds the port without listening, so a busy port fails at once; starts
the workers; restarts one that dies, with backoff; and talks to each over a socket pair, in JSON
lines, for three things:

- **The golden gate, for all.** A worker that has loaded a version (engines built, golden samples
  passed, warmed up) asks before switching it in; it switches only when every live worker loaded
  it too. One refusal (a failed load or golden check anywhere) refuses it for all: no worker
  serves a version another one refused. Verdicts are kept by the version's content key, so a
  restarted worker gets the same answer at once; a worker that cannot load a version the others
  serve is stopped (and restarted with backoff) rather than left serving an older one.
- **/metrics for all.** The worker a scrape reaches asks the supervisor, which collects each live
  worker's exposition and sums them (metrics.merge_expositions).
- **Start-up failures.** A worker with nothing to serve reports its error and exits; the supervisor
  then stops every worker and exits with that one line and exit code, as ``serve`` does.

The supervisor stops with SIGINT/SIGTERM: each worker gets SIGTERM (finishing its requests in
flight); a worker whose supervisor is gone stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit_runtime import errors
from edgekit_runtime.errors import EdgekitError, UnavailableError
from edgekit_runtime.metrics import merge_expositions

__all__ = ["WorkerSpec", "supervise"]

log = logging.getLogger("edgekit_runtime.server")

#: seconds a worker waits for the verdict on a version it loaded before giving up on it
GATE_TIMEOUT_S = 300.0
_METRICS_TIMEOUT_S = 5.0
_BACKOFF_S = (0.5, 30.0)  # first restart delay, the most; doubled per quick death
_STABLE_S = 60.0  # a worker up this long has its backoff reset
_STOP_GRACE_S = 15.0


@dataclass
class WorkerSpec:
    """What each worker needs to serve like ``serve`` would (plain JSON types: it crosses a pipe)."""

    sources: list[str]
    host: str
    port: int
    config: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    trust_keys: list[str] | None = None
    max_body_bytes: int = 64 << 20
    poll_seconds: float = 2.0
    log_level: str = "info"
    http: str = "native"
    index: int = 0


def _error(kind: object, message: str) -> EdgekitError:
    """An error of the runtime's hierarchy rebuilt from its class name (it crossed the pipe)."""
    cls = getattr(errors, str(kind), None)
    if isinstance(cls, type) and issubclass(cls, EdgekitError):
        return cls(message)
    return EdgekitError(message)


class _Channel:
    """JSON lines over one end of a socket pair; ``send`` from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._lock, contextlib.suppress(OSError):  # the other side is gone: its reader sees EOF
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None at EOF."""
        try:
            line = self._reader.readline()
        except OSError:
            return None
        return json.loads(line) if line else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
            self.sock.close()


class _Replies:
    """Requests waiting for their reply by id (one thread asks, the channel's reader answers)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}

    def open(self) -> tuple[int, threading.Event, list[dict[str, Any]]]:
        event, box = threading.Event(), list[dict[str, Any]]()
        with self._lock:
            rid = next(self._ids)
            self._waiting[rid] = (event, box)
        return rid, event, box

    def close(self, rid: int) -> None:
        with self._lock:
            self._waiting.pop(rid, None)

    def answer(self, rid: int, message: dict[str, Any]) -> None:
        with self._lock:
            hit = self._waiting.get(rid)
        if hit is not None:
            hit[1].append(message)
            hit[0].set()


# -- the supervisor ---------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: _Channel
    started: float
    reader: threading.Thread | None = None
    loaded: bool = False
    failure: dict[str, Any] | None = None


class _Supervisor:
    def __init__(self, spec: WorkerSpec, count: int) -> None:
        self.spec = spec
        self.count = count
        self.workers: dict[int, _Worker] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.votes: dict[str, dict[int, str | None]] = {}  # version key -> worker -> why it failed there
        self.verdicts: dict[str, dict[str, Any] | None] = {}  # version key -> refusal (None: accepted)
        self.replies = _Replies()
        self.backoff = dict.fromkeys(range(count), _BACKOFF_S[0])
        self.restart_at: dict[int, float] = {}

    # workers

    def start(self, index: int) -> None:
        mine, theirs = socket.socketpair()
        spec = {**asdict(self.spec), "index": index}
        proc = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", "edgekit_runtime.server.workers", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        worker = _Worker(index, proc, _Channel(mine), time.monotonic())
        with self.lock:
            self.workers[index] = worker
        worker.channel.send({"op": "spec", "spec": spec})
        worker.reader = threading.Thread(target=self._read, args=(worker,), name=f"edgekit-worker-{index}", daemon=True)
        worker.reader.start()
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _read(self, worker: _Worker) -> None:
        while (message := worker.channel.recv()) is not None:
            op = message.get("op")
            if op == "staged":
                self._vote(worker, message)
            elif op == "metrics":
                threading.Thread(target=self._metrics_for, args=(worker, message["id"]), daemon=True).start()
            elif op == "local_metrics":
                self.replies.answer(message["id"], message)
            elif op == "loaded":
                worker.loaded = True
            elif op == "failed":
                worker.failure = message

    def live(self) -> list[_Worker]:
        with self.lock:
            return [w for w in self.workers.values() if w.proc.poll() is None]

    # the golden gate, for every worker

    def _vote(self, worker: _Worker, message: dict[str, Any]) -> None:
        key = f"{message['model']}\0{message['version']}\0{message['key']}"
        with self.lock:
            if key in self.verdicts:
                verdict = self.verdicts[key]
                if verdict is None and message.get("error") is not None:
                    # the others serve it and this one cannot: it must not serve an older version instead
                    log.error(
                        "worker %d cannot load %s v%s, which the other workers serve (%s): restarting it",
                        worker.index,
                        message["model"],
                        message["version"],
                        message["error"],
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.terminate()
                    return
                self._tell([worker], message, verdict)
                return
            votes = self.votes.setdefault(key, {})
            votes[worker.index] = message.get("error")
            self._settle(key, message)

    def _settle(self, key: str, message: dict[str, Any]) -> None:
        votes = self.votes.get(key)
        if votes is None:
            return
        voters = [self.workers[i] for i in votes if i in self.workers]
        refusals = [(i, e) for i, e in votes.items() if e is not None]
        if refusals:
            i, why = refusals[0]
            verdict: dict[str, Any] | None = {"error": f"worker {i} refused it: {why}", "kind": message.get("kind")}
        elif {w.index for w in self.live()} <= set(votes):
            verdict = None
        else:
            return  # waiting for the other workers
        self.verdicts[key] = verdict
        del self.votes[key]
        log.info(
            "%s v%s %s by the %d workers",
            message["model"],
            message["version"],
            "accepted" if verdict is None else "refused",
            len(voters),
        )
        self._tell(voters, message, verdict)

    @staticmethod
    def _tell(workers: list[_Worker], message: dict[str, Any], verdict: dict[str, Any] | None) -> None:
        reply = {"op": "verdict", "model": message["model"], "version": message["version"], "key": message["key"]}
        for w in workers:
            w.channel.send({**reply, "refused": verdict})

    def _resettle(self) -> None:
        """A worker died: the versions it had not voted on wait for one fewer."""
        with self.lock:
            for key in list(self.votes):
                model, version, vkey = key.split("\0")
                self._settle(key, {"model": model, "version": version, "key": vkey})

    # /metrics, for every worker

    def _metrics_for(self, asker: _Worker, rid: int) -> None:
        texts = []
        for w in self.live():
            mid, event, box = self.replies.open()
            try:
                w.channel.send({"op": "local_metrics", "id": mid})
                if event.wait(_METRICS_TIMEOUT_S):
                    texts.append(box[0]["text"])
            finally:
                self.replies.close(mid)
        texts.append(
            "# HELP edgekit_workers Serving processes whose metrics these are (serve --workers)\n"
            f"# TYPE edgekit_workers gauge\nedgekit_workers {len(texts)}\n"
        )
        text = merge_expositions(texts).decode()
        asker.channel.send({"op": "metrics_result", "id": rid, "text": text, "workers": len(texts)})

    # running

    def run(self) -> EdgekitError | None:
        for i in range(self.count):
            self.start(i)
        while not self.stopping.wait(0.1):
            failure = self._check()
            if failure is not None:
                return failure
        return None

    def _check(self) -> EdgekitError | None:
        now = time.monotonic()
        died = False
        with self.lock:
            for i, w in list(self.workers.items()):
                code = w.proc.poll()
                if code is None:
                    if now - w.started > _STABLE_S:
                        self.backoff[i] = _BACKOFF_S[0]
                    continue
                if w.reader is not None:
                    w.reader.join(2.0)  # its last words (a start-up failure) come before the EOF
                w.channel.close()
                del self.workers[i]
                died = True
                if w.failure is not None and not w.loaded:
                    return _error(w.failure.get("kind"), w.failure["message"])
                delay = self.backoff[i]
                self.backoff[i] = min(delay * 2, _BACKOFF_S[1])
                self.restart_at[i] = now + delay
                log.warning("worker %d (pid %d) exited with %s; restarting it in %.1f s", i, w.proc.pid, code, delay)
            due = [i for i, t in self.restart_at.items() if t <= now]
        if died:
            self._resettle()
        for i in due:
            del self.restart_at[i]
            if not self.stopping.is_set():
                self.start(i)
        return None

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for w in workers:
            try:
                w.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.channel.close()


def supervise(spec: WorkerSpec, count: int) -> None:
    """Serve with ``count`` worker processes on ``spec``'s port until SIGINT/SIGTERM; raises the
    workers' error when none of them can serve anything."""
    from edgekit_runtime.server.run import bind

    reserved = bind(spec.host, spec.port, reuse_port=True, listen=False)
    spec.port = reserved.getsockname()[1]
    sup = _Supervisor(spec, count)
    previous = {sig: signal.signal(sig, lambda *_: sup.stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("edgekit-runtime serving on http://%s:%d with %d worker processes", spec.host, spec.port, count)
    try:
        failure = sup.run()
    finally:
        sup.stop()
        reserved.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure is not None:
        raise failure


# -- a worker ---------------------------------------------------------------------------------


class _Link:
    """The worker's side: asks for verdicts and the merged metrics, answers local-metrics requests."""

    def __init__(self, channel: _Channel, index: int) -> None:
        self.channel = channel
        self.index = index
        self.replies = _Replies()
        self.verdicts: dict[str, tuple[threading.Event, list[dict[str, Any] | None]]] = {}
        self.lock = threading.Lock()
        self.render: Any = None  # the runtime's own metrics renderer, once it exists

    def read(self) -> None:
        while (message := self.channel.recv()) is not None:
            op = message.get("op")
            if op == "verdict":
                key = f"{message['model']}\0{message['version']}\0{message['key']}"
                with self.lock:
                    hit = self.verdicts.get(key)
                if hit is not None:
                    hit[1].append(message.get("refused"))
                    hit[0].set()
            elif op == "local_metrics":
                text = self.render().decode() if self.render is not None else ""
                self.channel.send({"op": "local_metrics", "id": message["id"], "text": text})
            elif op == "metrics_result":
                self.replies.answer(message["id"], message)
        # the supervisor is gone: stop serving (SIGTERM runs the graceful stop)
        os.kill(os.getpid(), signal.SIGTERM)

    def gate(self, model: str, version: int, key: str, error: EdgekitError | None) -> EdgekitError | None:
        message: dict[str, Any] = {"op": "staged", "model": model, "version": version, "key": key}
        if error is not None:
            self.channel.send({**message, "error": error.message, "kind": type(error).__name__})
            return error
        vkey = f"{model}\0{version}\0{key}"
        event: threading.Event = threading.Event()
        box: list[dict[str, Any] | None] = []
        with self.lock:
            self.verdicts[vkey] = (event, box)
        try:
            self.channel.send(message)
            if not event.wait(GATE_TIMEOUT_S):
                return UnavailableError(
                    f"the other workers did not load {model} v{version} within {GATE_TIMEOUT_S:g} s"
                )
        finally:
            with self.lock:
                self.verdicts.pop(vkey, None)
        refused = box[0]
        return None if refused is None else _error(refused.get("kind"), refused["error"])

    def merged_metrics(self) -> bytes:
        rid, event, box = self.replies.open()
        try:
            self.channel.send({"op": "metrics", "id": rid})
            if event.wait(_METRICS_TIMEOUT_S * 2):
                return str(box[0]["text"]).encode()
        finally:
            self.replies.close(rid)
        own = self.render() if self.render is not None else b""
        return b"# edgekit: the supervisor did not answer; this worker's metrics only\n" + bytes(own)


def _worker(fd: int) -> int:
    from edgekit_runtime.config import BatchingOverrides, Config
    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.server.run import serve
    from edgekit_runtime.signing import load_public_key

    channel = _Channel(socket.socket(fileno=fd))
    first = channel.recv()
    if first is None or first.get("op") != "spec":
        return 70
    spec = WorkerSpec(**first["spec"])
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{spec.index} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    link = _Link(channel, spec.index)
    threading.Thread(target=link.read, name="edgekit-supervisor-link", daemon=True).start()
    try:
        keys = [load_public_key(Path(p)) for p in spec.trust_keys] if spec.trust_keys is not None else None
        runtime = Runtime(
            spec.sources,
            config=Config.model_validate(spec.config),
            batching=BatchingOverrides.model_validate(spec.flags),
            threads=spec.threads,
            trusted_keys=keys,
            gate=link.gate,
        )
        link.render = runtime.metrics.render
        # Load before taking connections: the port is already served by the other workers, and a
        # restarted worker must not answer 503 while it loads (serve() then only starts watching).
        runtime.start(poll_seconds=0)
        failure = runtime.startup_failure()
        if failure is not None:
            raise failure

        async def metrics_text() -> bytes:
            return await asyncio.to_thread(link.merged_metrics)

        serve(
            runtime,
            host=spec.host,
            port=spec.port,
            max_body_bytes=spec.max_body_bytes,
            poll_seconds=spec.poll_seconds,
            log_level=spec.log_level,
            http=spec.http,
            on_loaded=lambda: channel.send({"op": "loaded"}),
            reuse_port=True,
            metrics_text=metrics_text,
        )
    except EdgekitError as e:
        channel.send({"op": "failed", "message": e.message, "kind": type(e).__name__, "exit_code": e.exit_code})
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1])))
