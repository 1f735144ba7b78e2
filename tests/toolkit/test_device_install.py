"""scripts/device-install: the slim device install works (imports, the agent, the engine, the CLI)
and stays within the issue's 150 MB for runtime[tflite]. A size, not a timing: it is asserted."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_slim_device_install_serves_and_fits_150_mb(tmp_path: Path) -> None:
    target = tmp_path / "device"
    r = subprocess.run(
        [str(ROOT / "scripts" / "device-install"), str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"device install in \S+: (\d+) MB \(before the slimming: (\d+) MB\)", r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) <= 150, r.stdout
    assert int(m.group(1)) < int(m.group(2))
    site = next(target.glob("lib/python3*/site-packages"))
    assert (site / "numpy").is_dir()
    assert not [d for d in (site / "numpy").rglob("tests") if d.is_dir()]
    assert not (target / "bin" / "pip").exists()
    # refuses to write into an existing folder, and leaves it as it was
    again = subprocess.run(
        [str(ROOT / "scripts" / "device-install"), str(target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 2
    assert "exists; give a new folder" in again.stderr
