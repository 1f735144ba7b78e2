"""bench/telemetry.py --smoke: 50 simulated devices through a real Mosquitto and hub process into
SQLite: every message acknowledged and stored exactly once. Correctness only: the bench's rates are
never asserted (docs/benchmarks.md has the figures)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "telemetry.py"


def test_telemetry_smoke_stores_every_message_once(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    out = tmp_path / "telemetry.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=BENCH.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads(out.read_text())["ingest"]
    (step,) = row["steps"]
    assert step["missing"] == 0 and step["sent"] > 0
    assert row["stored"] == row["acked_total"] == step["sent"]
    assert row["duplicates_in_store"] == 0
    assert "| sqlite |" in run.stdout and "- Messages: real model telemetry" in run.stdout
