"""Closed-loop HTTP load with wrk, and CPU accounting of who used the machine during a run.

wrk is a separate C process (one thread, epoll): ``connections`` keep-alive connections each send
the same POST body again as soon as the previous answer arrives, so concurrency is fixed and
equals ``connections``. A generated Lua script loads the body from a file (binary-safe) and prints
the summary as one JSON line. While wrk runs we sample CPU time of the server's process tree, of
wrk itself (rusage of the reaped child) and of the whole machine (/proc/stat): what is left over
is what other processes on the machine used.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")

_LUA = """\
local f = assert(io.open({body_path}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,' ..
    '"max_us":%.0f,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for these values


@dataclass(frozen=True)
class LoadResult:
    connections: int
    duration_s: float
    requests: int
    ok: int
    rps: float  # successful (non-error status) responses per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int  # connect + read + write + timeout
    non2xx: int  # wrk counts status >= 400
    server_cores: float  # CPU cores used by the server's process tree, on average
    server_cpu_us_per_req: float  # server CPU time per successful request: robust to other load
    wrk_cores: float
    other_cores: float  # everything else on the machine (other users' jobs, this script)
    machine_cores: int


def wrk_version() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        return "absent"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).split("Copyright")[0].strip()


def _proc_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the full line)


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (MLServer runs its inference workers as child processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _machine_busy_ticks() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores)."""
    return _machine_busy_ticks() / _TICK


class CpuMeter:
    """CPU seconds used by a process tree between ``start`` and ``stop`` (pids seen at either end)."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._before: dict[int, int] = {}

    def start(self) -> None:
        self._before = {p: _proc_ticks(p) for p in _tree(self._root)}

    def stop(self) -> float:
        total = 0
        for pid in set(_tree(self._root)) | set(self._before):
            now = _proc_ticks(pid)
            total += max(0, now - self._before.get(pid, 0)) if now else 0
        return total / _TICK


def wait_idle(root: int, *, below_cores: float = 0.15, window_s: float = 0.25, timeout_s: float = 60.0) -> float:
    """Wait until the process tree ``root`` uses less than ``below_cores`` over ``window_s``; seconds waited.

    Between runs: a server may still be computing requests whose clients already left (wrk's previous
    run), and those would fill its queue at the start of the next run.
    """
    t0 = time.perf_counter()
    meter = CpuMeter(root)
    while time.perf_counter() - t0 < timeout_s:
        meter.start()
        time.sleep(window_s)
        if meter.stop() / window_s < below_cores:
            break
    return time.perf_counter() - t0


def run_wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connections: int,
    duration_s: float,
    server_pid: int,
    work_dir: Path,
    timeout_s: float = 30.0,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """POST ``body`` to ``url`` from ``connections`` keep-alive connections for ``duration_s`` seconds."""
    work_dir.mkdir(parents=True, exist_ok=True)
    body_path = work_dir / "body.bin"
    body_path.write_bytes(body)
    header_lines = "\n".join(f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items())
    script = work_dir / "post.lua"
    script.write_text(_LUA.format(body_path=_lua_str(str(body_path)), headers=header_lines))
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(script),
        url,
    ]
    wait_idle(server_pid)
    if on_start is not None:
        on_start()
    meter = CpuMeter(server_pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = _machine_busy_ticks()
    meter.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    server_cpu = meter.stop()
    busy = (_machine_busy_ticks() - busy_before) / _TICK
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        msg = f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        raise RuntimeError(msg)
    s = json.loads(line.removeprefix("BENCHJSON "))
    dur = s["duration_us"] / 1e6
    ok = int(s["requests"] - s["status"])
    return LoadResult(
        connections=connections,
        duration_s=dur,
        requests=int(s["requests"]),
        ok=ok,
        rps=ok / dur if dur else 0.0,
        p50_ms=s["p50_us"] / 1000,
        p90_ms=s["p90_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        max_ms=s["max_us"] / 1000,
        socket_errors=int(s["connect"] + s["read"] + s["write"] + s["timeout"]),
        non2xx=int(s["status"]),
        server_cores=server_cpu / wall,
        server_cpu_us_per_req=server_cpu / ok * 1e6 if ok else 0.0,
        wrk_cores=wrk_cpu / wall,
        other_cores=max(0.0, (busy - server_cpu - wrk_cpu) / wall),
        machine_cores=os.cpu_count() or 1,
    )
