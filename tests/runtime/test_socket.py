"""A real `edgekit-runtime serve` process on a real port, driven by the protocols' own clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from edgekit_runtime.store import install_bundle
from tests.runtime.conftest import Models, reference

X = np.random.default_rng(11).normal(size=(3, 4)).astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgekit_runtime", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}: {out}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


@contextlib.contextmanager
def running_server(*args: str) -> Iterator[int]:
    """``edgekit-runtime serve ARGS`` on a free port, ready: yields the port; stopped on exit."""
    port = free_port()
    proc = start_server(*args, "--port", str(port))
    try:
        wait_ready(proc, port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def served(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    store = tmp_path_factory.mktemp("served-store")
    install_bundle(bundles["mlp"], store)
    with running_server(str(store), str(bundles["two"]), "--poll-seconds", "0.2", "--log-level", "warning") as port:
        yield port, store


def test_tritonclient_binary_by_default(served: tuple[int, Path], model_files: Models) -> None:
    import tritonclient.http as httpclient

    port, _ = served
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"][0]["name"] == "x"
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)  # binary_data=True by default
    result = client.infer("mlp", [inp])
    np.testing.assert_allclose(result.as_numpy("output_0"), reference(model_files, X), atol=1e-4)
    # JSON input, requested JSON output, a version, and output selection
    a = httpclient.InferInput("a", [3, 3], "FP32")
    a.set_data_from_numpy(X[:, :3], binary_data=False)
    b = httpclient.InferInput("b", [3, 3], "FP32")
    b.set_data_from_numpy(X[:, 1:])
    out = httpclient.InferRequestedOutput("prod", binary_data=False)
    result = client.infer("two", [a, b], model_version="1", outputs=[out], request_id="r7")
    np.testing.assert_allclose(result.as_numpy("prod"), X[:, :3] * X[:, 1:], rtol=1e-6)
    assert result.as_numpy("sum") is None
    assert result.get_response()["id"] == "r7"
    client.close()


def test_tfserving_rest_with_requests(served: tuple[int, Path], model_files: Models) -> None:
    port, _ = served
    base = f"http://127.0.0.1:{port}/v1/models"
    r = requests.post(f"{base}/mlp:predict", json={"instances": X.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], reference(model_files, X), atol=1e-4)
    r = requests.post(f"{base}/mlp:predict", data=b"{oops", timeout=30)
    assert r.status_code == 400
    assert "error" in r.json()
    assert requests.get(f"{base}/mlp", timeout=30).json()["model_version_status"][0]["state"] == "AVAILABLE"
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    assert "edgekit_requests_total" in text


def test_hot_swap_over_the_wire(served: tuple[int, Path], bundles: dict[str, Path]) -> None:
    port, store = served
    base = f"http://127.0.0.1:{port}/v1/models/mlp"
    before = requests.post(f"{base}:predict", json={"instances": X.tolist()}, timeout=30).json()["predictions"]
    install_bundle(bundles["mlp_v2"], store)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        states = {s["version"]: s["state"] for s in requests.get(base, timeout=30).json()["model_version_status"]}
        if states.get("2") == "AVAILABLE":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("version 2 never became AVAILABLE")
    after = requests.post(f"{base}:predict", json={"instances": X.tolist()}, timeout=30).json()["predictions"]
    assert not np.allclose(before, after)
    install_bundle(bundles["mlp_bad"], store)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        status = requests.get(f"{base}/versions/3", timeout=30)
        if status.status_code == 200 and status.json()["model_version_status"][0]["state"] == "END":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("version 3 never failed")
    assert "golden" in status.json()["model_version_status"][0]["status"]["error_message"]
    ready = requests.get(f"http://127.0.0.1:{port}/v2/models/mlp/ready", timeout=30)
    assert ready.status_code == 200
    again = requests.post(f"{base}:predict", json={"instances": X.tolist()}, timeout=30).json()["predictions"]
    np.testing.assert_allclose(again, after)


def test_busy_port_is_one_clear_line(bundles: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "edgekit_runtime", "serve", str(bundles["two"]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"Error: port {port} on 127.0.0.1 is already in use; choose another with --port"
    assert "Traceback" not in proc.stderr


def test_device_modules_never_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "import edgekit_runtime, edgekit_runtime.server, edgekit_runtime.runtime, edgekit_runtime.cli\n"
        "import edgekit_runtime.scoring, edgekit_runtime.store, edgekit_runtime.backends.litert\n"
        "import edgekit_runtime.backends.onnxrt\n"
        "from edgekit_runtime import Runtime\n"
        "heavy = ('tensorflow', 'keras', 'tf2onnx', 'edgekit_converters')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    run_fresh(code)


def run_fresh(code: str) -> None:
    """Run ``code`` in a new interpreter (a clean sys.modules and gc state); fail with its stderr."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_runtime_distribution_declares_no_tensorflow() -> None:
    from importlib.metadata import requires

    reqs = requires("edgekit-ml-runtime") or []
    names = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "tflite-runtime"}, names


def test_uvicorn_server_serves_both_protocols(bundles: dict[str, Path], model_files: Models) -> None:
    """`--http uvicorn` (the ASGI app under uvicorn) answers the same routes as the native server."""
    import tritonclient.http as httpclient

    port = free_port()
    proc = start_server(str(bundles["mlp"]), "--port", str(port), "--http", "uvicorn", "--log-level", "warning")
    try:
        wait_ready(proc, port)
        r = requests.post(f"http://127.0.0.1:{port}/v1/models/mlp:predict", json={"instances": X.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["server"] == "uvicorn"
        np.testing.assert_allclose(r.json()["predictions"], reference(model_files, X), atol=1e-4)
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        inp = httpclient.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        np.testing.assert_allclose(
            client.infer("mlp", [inp]).as_numpy("output_0"), reference(model_files, X), atol=1e-4
        )
        client.close()
        bad = requests.post(f"http://127.0.0.1:{port}/v1/models/mlp:predict", data=b"{oops", timeout=30)
        assert bad.status_code == 400
        assert "error" in bad.json()
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (its design since 0.29).
        assert proc.wait(30) in (0, -signal.SIGTERM)


def test_native_server_gc_settings() -> None:
    """`serve` freezes the startup heap and raises the young-generation threshold (docs/serving.md)."""
    code = (
        "import gc\n"
        "from edgekit_runtime.server.run import tune_gc\n"
        "tune_gc()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
        "assert gc.get_threshold()[0] == 50_000, gc.get_threshold()\n"
    )
    run_fresh(code)


def run_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit_runtime", "serve", *args, "--poll-seconds", "0"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_settings_that_cannot_work_exit_2_before_serving(bundles: dict[str, Path]) -> None:
    port = free_port()
    proc = run_serve(str(bundles["two"]), "--port", str(port), "--allowed-batch-sizes", "1,2,4")
    assert proc.returncode == 2, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"Error: model 'two' v1 ({bundles['two']}): allowed_batch_sizes [1, 2, 4] must")
    assert "end with max_batch_size (8)" in line
    assert "--max-batch-size" in line


def test_a_server_that_can_serve_nothing_says_why_and_exits(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ekb"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    proc = run_serve(str(corrupt), "--port", str(free_port()))
    assert proc.returncode == 5, proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"Error: nothing to serve: {corrupt}: not a bundle")
    assert last.count(str(corrupt)) == 1
    assert "Traceback" not in proc.stderr


def test_an_empty_store_is_live_but_not_ready(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    proc = start_server(str(store), "--port", str(port), "--poll-seconds", "0.2")
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "an empty store must keep the server up, waiting for models"
            try:
                live = requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < end
                time.sleep(0.1)
        assert live.status_code == 200
        ready = requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
        assert ready.status_code == 503
        assert ready.json() == {"ready": False}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert f"not ready: {store} offers no model" in out
