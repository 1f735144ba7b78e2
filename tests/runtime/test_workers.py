"""``serve --workers N``: real processes on one real port, a worker killed and replaced, a hot swap
every worker takes, /metrics summed over the workers, and the supervisor's golden-gate votes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from edgekit_runtime.server.workers import WorkerSpec, _Supervisor
from edgekit_runtime.store import install_bundle
from tests.runtime import models
from tests.runtime.test_metrics import value
from tests.runtime.test_socket import free_port, run_serve

A = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.ones((2, 3), np.float32)
BODY = {
    "inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": A.ravel().tolist()},
        {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": B.ravel().tolist()},
    ]
}
WAIT = 90.0  # seconds; only a bound against hangs
WORKERS = ("--workers", "2", "--poll-seconds", "0.2")
LISTENING = r"worker-\d edgekit_runtime.server: edgekit-runtime serving on"


def two_bundle(path: Path, version: int, *, golden_off: float = 0.0) -> Path:
    """The ONNX a+b / a*b model (no TensorFlow needed) as version ``version``; ``golden_off`` spoils
    its recorded golden outputs so that it fails its smoke test."""
    model = models.onnx_two_in_two_out()
    golden_in = {"a": A, "b": B}
    golden_out = {"sum": A + B + golden_off, "prod": A * B}
    return models.make_bundle(
        path,
        name="two",
        version=version,
        fmt="onnx",
        model=model,
        golden_in=golden_in,
        golden_out=golden_out,
        batching={"max_batch_size": 8, "batch_timeout_micros": 1000},
    )


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path, store: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.store = store

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            found = re.findall(pattern, self.text())
            if len(found) >= count:
                return found
            assert self.proc.poll() is None, f"the server exited: {self.text()}"
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not {count} times in the log:\n{self.text()}")

    def infer(self) -> dict[str, Any]:
        """One request on a fresh connection (so the kernel may pick either worker)."""
        r = requests.post(f"{self.url}/v2/models/two/infer", json=BODY, headers={"Connection": "close"}, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        sums = next(o for o in out["outputs"] if o["name"] == "sum")
        np.testing.assert_array_equal(np.asarray(sums["data"]).reshape(2, 3), A + B)
        return out

    def worker_pids(self) -> dict[int, int]:
        """The newest pid of each worker, from the supervisor's log."""
        return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.text())}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    store = tmp_path / "store"
    store.mkdir()
    install_bundle(two_bundle(tmp_path / "two-1.ekb", 1), store)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgekit_runtime", "serve", str(store), "--port", str(port), *WORKERS],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    s = Served(proc, port, log, store)
    try:
        s.wait_for(r"worker-\d edgekit_runtime: serving two v1", 2)
        s.wait_for(LISTENING, 2)
        yield s
    finally:
        pids = s.worker_pids().values()
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, s.text()
        finally:
            if proc.poll() is None:
                proc.kill()
            for pid in pids:  # no worker outlives its supervisor
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_two_workers_serve_one_port_and_metrics_are_summed(served: Served) -> None:
    assert len(served.worker_pids()) == 2
    for _ in range(40):
        assert served.infer()["model_version"] == "1"
    text = requests.get(f"{served.url}/metrics", timeout=30).text
    assert value(text, "edgekit_workers") == 2
    assert value(text, "edgekit_requests_total", model="two", version="1") == 40  # both workers' counts
    assert value(text, "edgekit_request_latency_seconds_count", model="two", version="1") == 40
    assert value(text, "edgekit_batch_size_sum", model="two", version="1") == 80  # rows


def test_a_killed_worker_is_replaced_while_the_other_serves(served: Served) -> None:
    victim = served.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # Once the supervisor has reaped it, its socket is closed. (Connections the kernel had already
    # queued on a worker's socket when it died are reset: SO_REUSEPORT does not move them.)
    served.wait_for(f"worker 0 \\(pid {victim}\\) exited with -9; restarting it")
    end = time.monotonic() + WAIT
    answered = 0
    while served.text().count("worker-0 edgekit_runtime.server: edgekit-runtime serving on") < 2:  # the new one
        served.infer()  # the other worker answers meanwhile: every request succeeds
        answered += 1
        assert time.monotonic() < end, served.text()
        assert served.proc.poll() is None, served.text()
    assert answered > 0
    replacement = served.worker_pids()[0]
    assert replacement != victim
    for _ in range(20):
        served.infer()


def test_a_hot_swap_is_taken_by_every_worker(served: Served, tmp_path: Path) -> None:
    install_bundle(two_bundle(tmp_path / "two-2.ekb", 2), served.store)
    served.wait_for(r"two v2 accepted by the 2 workers")
    served.wait_for(r"worker-0 edgekit_runtime: serving two v2")
    served.wait_for(r"worker-1 edgekit_runtime: serving two v2")
    served.wait_for(r"worker-\d edgekit_runtime: unloaded two v1", 2)
    for _ in range(20):
        assert served.infer()["model_version"] == "2"
    # a version failing its golden samples is refused by all, and v2 keeps serving everywhere
    install_bundle(two_bundle(tmp_path / "two-3.ekb", 3, golden_off=1.0), served.store)
    served.wait_for(r"two v3 refused by the \d workers")
    served.wait_for(r"worker-\d edgekit_runtime: two v3 failed to load and will not serve", 2)
    for _ in range(20):
        assert served.infer()["model_version"] == "2"
    assert "serving two v3" not in served.text()


def test_bad_worker_counts_and_combinations_are_one_line(tmp_path: Path) -> None:
    bundle = two_bundle(tmp_path / "two-1.ekb", 1)
    proc = run_serve(str(bundle), "--workers", "0")
    assert proc.returncode == 2
    assert "Invalid value for '--workers': 0 is not in the range x>=1." in proc.stderr
    proc = run_serve(str(bundle), "--workers", "2", "--broker", "mqtt://127.0.0.1:1883", "--device-id", "d1")
    assert proc.returncode == 2
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error")]
    assert line == "Error: --workers above 1 does not run the device agent yet: drop --broker or --workers"


def test_workers_that_can_serve_nothing_stop_the_server_with_one_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ekb"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    proc = run_serve(str(corrupt), "--port", str(free_port()), "--workers", "2")
    assert proc.returncode == 5, proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"Error: nothing to serve: {corrupt}: not a bundle")
    assert "Traceback" not in proc.stderr


# -- the supervisor's votes, without processes ------------------------------------------------


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


class FakeProc:
    def __init__(self) -> None:
        self.terminated = False

    def poll(self) -> int | None:
        return None

    def terminate(self) -> None:
        self.terminated = True


def supervisor(n: int) -> tuple[_Supervisor, list[Any]]:
    sup = _Supervisor(WorkerSpec(sources=[], host="127.0.0.1", port=0), n)
    from edgekit_runtime.server.workers import _Worker

    workers = [_Worker(i, FakeProc(), FakeChannel(), 0.0) for i in range(n)]  # type: ignore[arg-type]
    sup.workers = dict(enumerate(workers))
    return sup, workers


def staged(version: int, error: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"op": "staged", "model": "m", "version": version, "key": "k"}
    if error is not None:
        m |= {"error": error, "kind": "SmokeTestError"}
    return m


def verdicts(worker: Any) -> list[Any]:
    return [m["refused"] for m in worker.channel.sent if m["op"] == "verdict"]


def test_a_version_serves_only_once_every_worker_loaded_it() -> None:
    sup, (w0, w1, w2) = supervisor(3)
    sup._vote(w0, staged(2))
    sup._vote(w1, staged(2))
    assert verdicts(w0) == verdicts(w1) == []  # still waiting for worker 2
    sup._vote(w2, staged(2))
    assert verdicts(w0) == verdicts(w1) == verdicts(w2) == [None]


def test_one_refusal_refuses_the_version_for_every_worker() -> None:
    sup, (w0, w1, w2) = supervisor(3)
    sup._vote(w0, staged(2))
    sup._vote(w1, staged(2, "output 'sum' differs from the golden samples"))
    [refused] = verdicts(w0)
    assert refused["error"] == "worker 1 refused it: output 'sum' differs from the golden samples"
    assert refused["kind"] == "SmokeTestError"
    sup._vote(w2, staged(2))  # late: told at once, from the stored verdict
    assert verdicts(w2) == [refused]


def test_a_dead_worker_is_not_waited_for_and_its_replacement_cannot_differ() -> None:
    sup, (w0, w1) = supervisor(2)
    sup._vote(w0, staged(2))
    del sup.workers[1]  # worker 1 died before it voted
    sup._resettle()
    assert verdicts(w0) == [None]
    sup.workers[1] = w1  # its replacement fails the version the other one serves: it is stopped
    sup._vote(w1, staged(2, "out of memory"))
    assert w1.proc.terminated
    assert verdicts(w1) == []
