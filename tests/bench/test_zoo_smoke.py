"""bench/zoo.py --smoke: two zoo models (the digits MLP, the Embedding + LSTM text classifier) built,
converted for generic-cpu and raspberrypi and with --quantization auto, the matrix printed. Correctness
only: which cells convert, never how fast (docs/compatibility.md has the full run's figures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "zoo.py"


@pytest.mark.slow
def test_zoo_smoke_converts_both_models_for_both_profiles(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--models-dir", str(tmp_path), "--latency-seconds", "0.05"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    out = run.stdout
    assert "4 of 4 cells converted." in out, out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| **")}
    assert set(lines) == {
        "**digits**<br>MLP (examples/digits)",
        "**lstm_tokens**<br>recurrent: Embedding + LSTM on int32 token ids",
    }
    assert "| lstm_tokens | raspberrypi | int8 |" in out  # auto: int8 within budget, LSTM unrolled to calibrate
    assert "unrolled over their time steps for int8 calibration" in out
