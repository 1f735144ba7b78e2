"""bench/ota.py --smoke: a rollout to 5 simulated devices (real agents) through a real hub process and
Mosquitto ends with every device succeeded and every store holding a whole, signed install.
Correctness only: the bench's timings are never asserted (docs/benchmarks.md has the figures)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ota.py"


def test_ota_smoke_rollout_succeeds_on_every_device_without_a_corrupt_install(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    out = tmp_path / "ota.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(out), "--device-root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads(out.read_text())
    assert row["state"] == "completed", row
    assert row["counts"] == {"succeeded": row["devices"]}
    assert row["corrupt"] == 0, row["problems"]
    assert row["leftover_downloads"] == 0
    # every chunk reached every device: the devices' own counts, not the hub's word
    assert row["frames"] - row["duplicates"] == row["devices"] * row["chunks_per_device"]
    assert "| smoke | 5 |" in run.stdout  # the table is printed with its settings
    assert "- Chunks 64 KiB" in run.stdout
