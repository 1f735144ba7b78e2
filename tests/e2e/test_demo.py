"""`edgekit demo` end to end, as a user runs it: a real process that converts the example, starts a
hub (embedded broker) and four device processes, rolls v1 and v2 out, and runs until Ctrl-C.

Checked: the dashboard line it prints answers (the page at `/`, the token on the API); the fleet
ends with the three Pis on v2 and jetson-1 back on v1 (rolled back in its health window); a SIGINT
ends it with exit 0 and leaves none of its processes behind; a second run in the same folder with
--no-wait reuses the cached conversion and finishes with exit 0. Every wait is bounded; no test
asserts a duration.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.hub.conftest import EDGEKIT

pytest.importorskip("amqtt", reason="pip install 'edgekit-ml[embedded-broker]' (scripts/setup does)")
pytest.importorskip("edgekit_converters", reason="pip install ./converters (scripts/setup does)")

STORY = 600.0  # s: the bound on a whole story (conversion ~15-60 s, the v2 rollout ~30-40 s here)
STOP = 90.0  # s: the bound on stopping after SIGINT (devices 15 s each at most, the hub 40 s)
DASHBOARD = re.compile(r"^dashboard: (http://127\.0\.0\.1:\d+)/#token=(\S+)$")


def read_lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Every stderr line of ``proc`` on a queue, None at the end (a thread drains the pipe)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    return lines


@pytest.mark.slow
def test_the_demo_tells_the_story_stops_cleanly_on_ctrl_c_and_reuses_its_conversion(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [EDGEKIT, "demo", "--workdir", str(work)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    children: list[psutil.Process] = []
    try:
        lines = read_lines(proc)
        seen: list[str] = []
        end = time.monotonic() + STORY
        found = None
        while found is None:
            try:
                line = lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                tail = "\n".join(seen[-30:])
                raise AssertionError(f"no dashboard line within {STORY:g} s or the demo ended:\n{tail}")
            seen.append(line)
            found = DASHBOARD.match(line)
        base, token = found.group(1), found.group(2)
        output = "\n".join(seen)
        assert "1/7 convert: done in" in output, output  # a fresh folder: it converted

        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/").status_code == 200
            auth = {"Authorization": f"Bearer {token}"}
            assert http.get("/v1/fleet").status_code == 401  # the token is what opens the API
            fleet = http.get("/v1/fleet", headers=auth).json()["devices"]
            assert {r["device"]: (r["model"], r["version"]) for r in fleet} == {
                "pi-1": ("digits", 2), "pi-2": ("digits", 2), "pi-3": ("digits", 2), "jetson-1": ("digits", 1)
            }, fleet  # fmt: skip
            assert all(r["online"] for r in fleet), fleet
            rollouts = http.get("/v1/rollouts", headers=auth).json()["rollouts"]
            v2 = next(r for r in rollouts if r["version"] == 2)
            assert v2["state"] == "completed", v2
            detail = http.get(f"/v1/rollouts/{v2['id']}", headers=auth).json()
            states = {d["device"]: d["state"] for d in detail["devices"]}
            assert states == {"pi-1": "succeeded", "pi-2": "succeeded", "pi-3": "succeeded", "jetson-1": "rolled_back"}
            jetson = next(d for d in detail["devices"] if d["device"] == "jetson-1")
            assert jetson["reason"].startswith("health window: server error rate"), jetson

        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert len(children) >= 5 and "hub serve" in names and names.count("edgekit_runtime serve") == 4, names
        proc.send_signal(signal.SIGINT)
        assert proc.wait(STOP) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP)
        for p in children:
            if p.is_running():
                p.kill()
        if proc.stderr is not None:
            proc.stderr.close()

    again = subprocess.run(
        [EDGEKIT, "demo", "--workdir", str(work), "--no-wait"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STORY,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "1/7 convert: reused the conversion cached in" in again.stderr, again.stderr
    assert "dashboard: http://127.0.0.1:" in again.stderr and "stopped; logs in" in again.stderr, again.stderr
