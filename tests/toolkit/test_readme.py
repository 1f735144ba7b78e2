"""The README's serve block works when pasted whole: run it in bash, as a user would, against a real
server (a 64-feature `digits` bundle stands in for the demo's output, the port is a free one)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runtime import models

README = Path(__file__).resolve().parents[2] / "README.md"


def serve_block() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    [block] = [b for b in blocks if "edgekit serve" in b]
    return block


def digits_bundle(path: Path) -> Path:
    """digits: float32[-1, 64] -> softmax(x W) over 10 classes (onnx.helper; no TensorFlow)."""
    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32) / 16
    model = models.onnx_softmax(w, x="pixels")
    return models.make_bundle(path, name="digits", version=1, fmt="onnx", model=model)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's block uses curl, which is not installed")
def test_the_readme_serve_block_works_when_pasted(tmp_path: Path) -> None:
    bundle = digits_bundle(tmp_path / "digits.ekb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    block = serve_block()
    assert "out/digits-raspberrypi.ekb" in block
    assert "8501" in block
    script = block.replace("out/digits-raspberrypi.ekb", str(bundle)).replace("8501", port)
    script = script.replace(".venv/bin/edgekit", str(Path(sys.executable).parent / "edgekit"))
    # Pasted into an interactive shell the server lives on; here the script stops it at the end.
    run = subprocess.run(
        ["bash", "-c", f"set -e\n{script}\nkill %1\nwait %1 || true\n"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith('{"ready":true}'), out  # the readiness wait ran first and saw the model serve
    assert '{"predictions":[[' in out, out
    assert '"name":"digits"' in out, out
