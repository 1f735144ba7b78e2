"""Start and stop the servers under test: ``edgekit-runtime serve`` and MLServer (from its own venv).

Each server runs in its own session (process group) on free ports; we wait for
``GET /v2/health/ready`` to answer 200 and stop it with SIGTERM (SIGKILL after a grace period).
Logs go to ``LOG_DIR/<name>.log`` and their tail is shown when a server fails to start.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BatchConfig:
    """The batching flags given to ``edgekit-runtime serve`` (TF Serving's knobs); ``None`` sizes = defaults."""

    enabled: bool = True
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    max_enqueued_batches: int = 16
    num_batch_threads: int = 1
    allowed_batch_sizes: tuple[int, ...] = ()
    http: str = "native"  # edgekit's HTTP server: "native" (default) or "uvicorn" (for comparison)

    def flags(self) -> list[str]:
        if not self.enabled:
            # Off, the queue bound counts requests: make it the concurrency so none is refused (503).
            return ["--no-batching", f"--max-enqueued-batches={self.max_enqueued_batches}", f"--http={self.http}"]
        out = [
            f"--http={self.http}",
            f"--max-batch-size={self.max_batch_size}",
            f"--batch-timeout-micros={self.batch_timeout_micros}",
            f"--max-enqueued-batches={self.max_enqueued_batches}",
            f"--num-batch-threads={self.num_batch_threads}",
        ]
        if self.allowed_batch_sizes:
            out.append("--allowed-batch-sizes=" + ",".join(str(n) for n in self.allowed_batch_sizes))
        return out

    def describe(self) -> str:
        http = "" if self.http == "native" else f"; HTTP: {self.http}"
        if not self.enabled:
            return f"off (queue {self.max_enqueued_batches} requests){http}"
        allowed = ",".join(str(n) for n in self.allowed_batch_sizes) or "any"
        return (
            f"max {self.max_batch_size}, timeout {self.batch_timeout_micros} µs, sizes {allowed}, "
            f"queue {self.max_enqueued_batches}, {self.num_batch_threads} batch thr{http}"
        )


def powers_of_two(limit: int) -> tuple[int, ...]:
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != limit:
        sizes.append(limit)
    return tuple(sizes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    info: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, timeout: float = 60.0
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float, path: str = "/v2/health/ready") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                raise RuntimeError(msg)
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _, _ = self.request("GET", path, timeout=2.0)
                if status == 200:
                    return
            time.sleep(0.1)
        msg = f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


def _spawn(
    name: str, cmd: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        f.write((" ".join(cmd) + "\n").encode())
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


# Set by bench/serve.py's --edgekit-cmd: benchmark another build or install of the runtime.
EDGEKIT_CMD: list[str] = []


def edgekit_command() -> list[str]:
    if EDGEKIT_CMD:
        return EDGEKIT_CMD
    exe = Path(sys.executable).with_name("edgekit-runtime")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("edgekit-runtime")
    if found:
        return [found]
    return [sys.executable, "-m", "edgekit_runtime.cli"]


def edgekit_serve_available() -> tuple[bool, str]:
    """Whether ``edgekit-runtime serve`` exists yet, and if not, what the CLI said."""
    proc = subprocess.run([*edgekit_command(), "serve", "--help"], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True, ""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return False, lines[-1] if lines else f"exit {proc.returncode}"


@contextlib.contextmanager
def edgekit_server(
    sources: list[Path],
    *,
    batching: BatchConfig,
    threads: int,
    log_dir: Path,
    label: str,
    ready_timeout_s: float = 180.0,
) -> Iterator[Server]:
    port = free_port()
    cmd = [
        *edgekit_command(),
        "serve",
        *[str(s) for s in sources],
        "--host=127.0.0.1",
        f"--port={port}",
        f"--threads={threads}",
        "--log-level=warning",
        *batching.flags(),
    ]
    log = log_dir / f"edgekit-{label}.log"
    server = Server(f"edgekit-runtime serve ({label})", _spawn(label, cmd, log), "127.0.0.1", port, log)
    server.info["command"] = " ".join(cmd[1:]) if len(cmd) > 1 else cmd[0]
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()


def mlserver_version(venv: Path) -> str | None:
    exe = venv / "bin" / "mlserver"
    if not exe.exists():
        return None
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().rsplit(" ", 1)[-1] or None


@contextlib.contextmanager
def mlserver(
    venv: Path,
    onnx_model: Path,
    model_name: str,
    *,
    max_batch_size: int,
    max_batch_time_s: float,
    threads: int,
    work_dir: Path,
    log_dir: Path,
    label: str,
    ready_timeout_s: float = 180.0,
) -> Iterator[Server]:
    """MLServer serving ``onnx_model`` with bench/mlserver/onnx_runtime.py, adaptive batching as given.

    settings.json and model-settings.json are generated into ``work_dir`` (fresh ports each run);
    metrics are off, access logs are off (``debug: false``): MLServer at its fastest, otherwise defaults
    (one parallel inference worker process).
    """
    root = work_dir / label
    shutil.rmtree(root, ignore_errors=True)
    model_dir = root / model_name
    model_dir.mkdir(parents=True)
    shutil.copyfile(onnx_model, model_dir / "model.onnx")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "metrics_endpoint": None,
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": model_name,
        "implementation": "onnx_runtime.OnnxRuntimeModel",
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s,
        "parameters": {"uri": "./model.onnx", "extra": {"intra_op_threads": threads}},
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE / "mlserver")
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(venv / "bin" / "mlserver"), "start", str(root)]
    log = log_dir / f"mlserver-{label}.log"
    server = Server(f"MLServer ({label})", _spawn(label, cmd, log, env=env, cwd=root), "127.0.0.1", http_port, log)
    server.info["settings"] = json.dumps(settings)
    server.info["model_settings"] = json.dumps(model_settings)
    try:
        server.wait_ready(ready_timeout_s, path=f"/v2/models/{model_name}/ready")
        yield server
    finally:
        server.stop()
