"""OTA rollout through the hub: one Mosquitto, one `edgekit hub serve` process, and simulated devices
that run the real agent (download in chunks, sha256, signature check, install, golden-sample load).

Each device is a real ``edgekit_runtime.agent.Agent`` with a real ``Runtime`` (ONNX Runtime, one
engine thread) over a store directory of its own; only the HTTP server is left out. Devices run in
worker processes (``--per-worker`` each, started as ``python bench/ota.py --worker ...``). The
bench pushes a signed ONNX bundle of the row's size through the hub's API, deploys it with
``POST /v1/rollouts`` in one wave and polls ``GET /v1/rollouts/ID`` until every device has
succeeded; then it stops the devices and checks every store (the installed version read back,
its model hash and signature verified, no partial install left).

    python bench/ota.py --smoke                 # 5 devices, 256 kB: correctness, ~20 s
    python bench/ota.py                         # rows 1-3 (docs/benchmarks.md, "OTA rollout")
    python bench/ota.py --row 2 --json out.json # one row; results as JSON too

Rows: 1. 100 devices, 4 MiB; 2. the same with the broker killed (kill -9) and restarted once when
about half the chunks are on the devices (persistence off, Mosquitto's default); 3. 1,000
devices, 1 MiB.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _load import CpuMeter, machine_busy_s

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.mqtt (the Mosquitto runner), tests.hub.conftest (HubProcess, bundles)

RESULTS = ROOT / "bench" / "results"  # the hub's output per row: ota-rowN-hub.log
MODEL = "digits"
PROFILE = "raspberrypi"
POLL_S = 0.5
MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    number: int
    devices: int
    size: int  # bundle bytes wanted (the built file lands within a few per cent)
    restart: bool = False

    @property
    def label(self) -> str:
        return f"{self.devices} devices, {_size(self.size)}" + (
            ", broker restarted mid-rollout" if self.restart else ""
        )


ROWS = {
    1: Row(1, 100, 4 * MIB),
    2: Row(2, 100, 4 * MIB, restart=True),
    3: Row(3, 1000, 1 * MIB),
}
SMOKE = Row(0, 5, 256 << 10)
TARGETS = {1: 20.0, 2: 30.0, 3: 120.0}


@dataclass
class Result:
    row: int
    devices: int
    bundle_bytes: int
    chunks_per_device: int
    restart: bool
    wall_s: float = 0.0
    state: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    hub_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    device_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # the rest of the machine (other jobs, this bench's own polling) meanwhile
    sys_bytes_in: int = 0  # $SYS/broker/bytes/received during the rollout
    sys_bytes_out: int = 0  # $SYS/broker/bytes/sent
    sys_messages_out: int = 0
    sys_dropped: int = 0
    io_read: int = 0  # /proc/PID/io rchar of the broker(s): the cross-check
    io_write: int = 0
    frames: int = 0  # chunk frames the devices received
    duplicates: int = 0  # frames of a chunk the device had been sent already
    requests: int = 0  # chunk requests the devices sent
    workers: int = 0
    rss_peak_mb_max: float = 0.0  # the largest worker's peak RSS
    rss_peak_mb_sum: float = 0.0
    rss_base_mb: float = 0.0  # one worker's RSS before its devices were made
    corrupt: int = 0
    problems: list[str] = field(default_factory=list)
    leftover_downloads: int = 0
    restart_at_chunks: float = 0.0  # share of all chunks on the devices when the broker was killed
    broker_down_s: float = 0.0
    polls: int = 0
    poll_errors: int = 0
    poll_error: str = ""
    first_succeeded_s: float = 0.0
    all_chunks_s: float = 0.0  # when every device had reported all its chunks (or finished)
    timeline: list[tuple[float, float, dict[str, int]]] = field(default_factory=list)  # (s, chunk share, counts)


def _size(n: int) -> str:
    return f"{n / MIB:.2f} MiB" if n >= MIB else f"{n >> 10} KiB"


# -- the device side (worker processes) -----------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """``args.count`` devices from ``args.first`` on, until a line on stdin; then their figures."""
    import logging

    from edgekit_runtime.agent import Agent
    from edgekit_runtime.agent.link import parse_broker_url
    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.signing import load_public_key

    logging.getLogger("edgekit_runtime").setLevel(logging.ERROR)
    base_kb = _rss_kb()
    key = load_public_key(args.trust_key)
    broker = parse_broker_url(args.broker)
    made: list[tuple[Agent, Runtime, _Counts]] = []
    for i in range(args.first, args.first + args.count):
        device = f"dev-{i:04d}"
        store = Path(args.root) / device / "store"
        store.mkdir(parents=True)
        rt = Runtime([store], threads=1, trusted_keys=[key])
        rt.refresh()
        agent = Agent(
            rt,
            broker,
            device_id=device,
            state_dir=store / ".edgekit-agent",
            store=store,
            profile=PROFILE,
            labels={"bench": "ota"},
            trusted_keys=[key],
        )
        counts = _Counts(agent)
        agent.start()
        agent.loaded()
        made.append((agent, rt, counts))
    print(json.dumps({"ready": len(made), "rss_base_kb": base_kb}), flush=True)
    sys.stdin.readline()

    def stop(item: tuple[Agent, Runtime, _Counts]) -> None:
        item[0].stop()
        item[1].close()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:  # a link takes up to 0.2 s to stop
        list(pool.map(stop, made))
    out = {
        "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "frames": sum(c.frames for _, _, c in made),
        "duplicates": sum(c.duplicates for _, _, c in made),
        "requests": sum(c.requests for _, _, c in made),
    }
    print(json.dumps(out), flush=True)


class _Counts:
    """Counts what one agent receives and asks for, around its own handlers (which do the work)."""

    def __init__(self, agent: Any) -> None:
        self.frames = self.duplicates = self.requests = 0
        self._seen: set[tuple[str, int]] = set()
        on_chunk = agent._on_chunk
        publish = agent.link.publish
        chunks_get = agent.topics.chunks_get

        def counted_chunk(topic: str, payload: bytes) -> None:
            self.frames += 1
            with contextlib.suppress(ValueError, KeyError):
                n = int.from_bytes(payload[:4], "big")
                head = json.loads(payload[4 : 4 + n])
                key = (head["artifact"], head["index"])
                self.duplicates += key in self._seen
                self._seen.add(key)
            on_chunk(topic, payload)

        def counted_publish(topic: str, payload: bytes, **kw: Any) -> None:
            self.requests += topic == chunks_get
            publish(topic, payload, **kw)

        agent.link.subscribe(agent.topics.chunks_data, counted_chunk)
        agent.link.publish = counted_publish  # type: ignore[method-assign]


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Workers:
    """The device worker processes of one row."""

    def __init__(self, row: Row, per_worker: int, broker_url: str, trust_key: Path, root: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.ready: list[dict[str, Any]] = []
        for first in range(0, row.devices, per_worker):
            count = min(per_worker, row.devices - first)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                f"--first={first}",
                f"--count={count}",
                f"--broker={broker_url}",
                f"--trust-key={trust_key}",
                f"--root={root}",
            ]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

    def wait_ready(self) -> None:
        for p in self.procs:
            line = p.stdout.readline() if p.stdout else ""
            if not line:
                msg = f"a device worker exited with {p.wait()} before its devices were ready"
                raise RuntimeError(msg)
            self.ready.append(json.loads(line))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            if p.poll() is None and p.stdin is not None:
                p.stdin.write("stop\n")
                p.stdin.flush()
        for p in self.procs:
            line = p.stdout.readline() if p.stdout else ""
            out.append(json.loads(line) if line else {})
            p.wait(120)
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


# -- the broker's own counters --------------------------------------------------------------------


class SysCounters:
    """The broker's $SYS counters (``sys_interval 1``), the latest of each, across broker restarts."""

    TOPICS = ("bytes/received", "bytes/sent", "messages/sent", "publish/messages/dropped")

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.values: dict[str, int] = {}
        self.updates = 0
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"ota-bench-sys-{os.getpid()}",
        )
        self._client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/#", qos=0)
        self._client.on_message = self._message
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _message(self, client: object, userdata: object, msg: Any) -> None:
        name = msg.topic.removeprefix("$SYS/broker/")
        if name not in self.TOPICS:
            return
        with self._cond:
            self.values[name] = int(msg.payload)
            if name == "bytes/sent":  # changes every interval: this client receives $SYS messages
                self.updates += 1
            self._cond.notify_all()

    def fresh(self, timeout: float = 10.0) -> dict[str, int]:
        """The counters after the next update (at most ``sys_interval`` old)."""
        with self._cond:
            seen = self.updates
            self._cond.wait_for(lambda: self.updates >= seen + 2, timeout)  # a whole interval after now
            return dict(self.values)

    def latest(self) -> dict[str, int]:
        with self._cond:
            return dict(self.values)

    def forget(self) -> None:
        """The broker is gone: its counters start from zero when it is back."""
        with self._cond:
            self.values = {}

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _proc_io(pid: int) -> tuple[int, int]:
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["rchar"]), int(fields["wchar"])


# -- one row --------------------------------------------------------------------------------------


INPUTS, CLASSES = 16, 10


def mlp_model(hidden: int, seed: int = 7) -> bytes:
    """float32[-1, 16] -> relu(x W1) W2 -> softmax over 10: an ONNX model whose size (104 B per
    hidden unit) is in its weights, so that loading it (warm-up at every batch size up to 32, the
    golden samples) costs what a small model's load costs, whatever the bundle's size."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(INPUTS, hidden)) / 4).astype(np.float32)
    w2 = (rng.normal(size=(hidden, CLASSES)) / np.sqrt(hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", INPUTS])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def build_bundle(path: Path, size: int, key: Any) -> Path:
    """A signed ONNX bundle for PROFILE of about ``size`` bytes (random weights barely compress),
    with golden samples."""
    import dataclasses

    import numpy as np

    from edgekit_runtime.bundle import ProfileRef, RuntimeSettings, read_bundle
    from edgekit_runtime.signing import sign_bundle
    from tests.runtime.models import make_bundle

    golden = {"x": np.random.default_rng(1).normal(size=(4, INPUTS)).astype(np.float32)}
    hidden = max(8, size // 104)
    for _ in range(3):
        make_bundle(path, name=MODEL, version=1, fmt="onnx", model=mlp_model(hidden), golden_in=golden)
        got = path.stat().st_size
        if abs(got - size) <= size * 0.01:
            break
        hidden = max(8, int(hidden * size / got))
    b = read_bundle(path)
    manifest = b.manifest.model_copy(update={"profile": ProfileRef(name=PROFILE, runtime=RuntimeSettings())})
    b = dataclasses.replace(b, manifest=manifest, manifest_bytes=b"")
    dataclasses.replace(b, signature=sign_bundle(b, key)).write(path)
    return path


def run_row(row: Row, args: argparse.Namespace, work: Path, keys: tuple[Path, Any]) -> Result:
    import httpx

    from tests.hub.conftest import HubProcess
    from tests.mqtt import Mosquitto

    public, private = keys
    folder = work / f"row-{row.number}"
    folder.mkdir(parents=True)
    bundle = build_bundle(folder / "digits-1.ekb", row.size, private)
    from edgekit_runtime.agent.protocol import DEFAULT_CHUNK

    size = bundle.stat().st_size
    res = Result(row.number, row.devices, size, -(-size // DEFAULT_CHUNK), row.restart)
    (folder / "broker").mkdir()
    conf = "".join(f"{line}\n" for line in ["sys_interval 1", *args.mosquitto_conf])
    broker = Mosquitto(folder / "broker", extra_conf=conf).start()
    hub = HubProcess(folder / "hub", "--broker", broker.url, "--trust-key", str(public)).start()
    assert hub.proc is not None
    device_root = Path(tempfile.mkdtemp(prefix=f"ota-row{row.number}-", dir=args.device_root))
    workers = Workers(row, args.per_worker, broker.url, public, device_root)
    counters = SysCounters(broker.port)
    http = httpx.Client(base_url=hub.url, headers={"Authorization": f"Bearer {hub.token}"}, timeout=60)
    try:
        r = http.post("/v1/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        workers.wait_ready()
        res.workers = len(workers.procs)
        res.rss_base_mb = max(w["rss_base_kb"] for w in workers.ready) / 1024
        _wait_registered(http, row.devices, args.timeout)

        hub_cpu, broker_cpu, dev_cpu = CpuMeter(hub.proc.pid), CpuMeter(_pid(broker)), _Meters(workers.pids())
        before = counters.fresh()
        io_before = _proc_io(_pid(broker))
        for m in (hub_cpu, broker_cpu):
            m.start()
        dev_cpu.start()
        busy0 = machine_busy_s()
        t0 = time.monotonic()
        body = {"model": MODEL, "version": 1, "to": "all", "waves": "100%"}
        r = http.post("/v1/rollouts", json=body)
        r.raise_for_status()
        rollout = r.json()["id"]
        pre_kill: dict[str, int] = {}  # what the killed broker counted during the rollout
        status: dict[str, Any] = {}
        while time.monotonic() - t0 < args.timeout:
            time.sleep(POLL_S)
            got = http.get(f"/v1/rollouts/{rollout}")
            res.polls += 1
            if got.status_code != 200:  # counted and reported; the rollout goes on without us
                res.poll_errors += 1
                res.poll_error = res.poll_error or f"HTTP {got.status_code}: {got.text[:300]}"
                continue
            status = got.json()
            counts = status["counts"]
            share = _chunk_share(status, res.chunks_per_device)
            res.timeline.append((round(time.monotonic() - t0, 2), round(share, 3), counts))
            if share >= 1 and not res.all_chunks_s:
                res.all_chunks_s = time.monotonic() - t0
            if counts.get("succeeded") and not res.first_succeeded_s:
                res.first_succeeded_s = time.monotonic() - t0
            if counts.get("succeeded", 0) == row.devices or status["state"] in ("completed", "aborted", "cancelled"):
                break
            if row.restart and not res.broker_down_s and share >= 0.5:
                res.restart_at_chunks = share
                last = counters.latest()
                pre_kill = {k: last.get(k, 0) - before.get(k, 0) for k in SysCounters.TOPICS}
                io_now = _proc_io(_pid(broker))
                res.io_read += io_now[0] - io_before[0]
                res.io_write += io_now[1] - io_before[1]
                res.broker_cpu_s += broker_cpu.stop()
                down = time.monotonic()
                broker.kill()
                counters.forget()
                broker.start()
                res.broker_down_s = time.monotonic() - down
                broker_cpu = CpuMeter(_pid(broker))
                broker_cpu.start()
                io_before = (0, 0)
                before = {}  # the new broker counts from zero
        res.wall_s = time.monotonic() - t0
        res.hub_cpu_s = hub_cpu.stop()
        res.broker_cpu_s += broker_cpu.stop()
        res.device_cpu_s = dev_cpu.stop()
        res.other_cpu_s = machine_busy_s() - busy0 - res.hub_cpu_s - res.broker_cpu_s - res.device_cpu_s
        io_now = _proc_io(_pid(broker))
        res.io_read += io_now[0] - io_before[0]
        res.io_write += io_now[1] - io_before[1]
        after = counters.fresh()
        for name, attr in (
            ("bytes/received", "sys_bytes_in"),
            ("bytes/sent", "sys_bytes_out"),
            ("messages/sent", "sys_messages_out"),
            ("publish/messages/dropped", "sys_dropped"),
        ):
            setattr(res, attr, pre_kill.get(name, 0) + after.get(name, 0) - before.get(name, 0))
        res.state = status.get("state", "")
        res.counts = status.get("counts", {})
        figures = workers.stop()
        res.frames = sum(f.get("frames", 0) for f in figures)
        res.duplicates = sum(f.get("duplicates", 0) for f in figures)
        res.requests = sum(f.get("requests", 0) for f in figures)
        peaks = [f.get("rss_peak_kb", 0) / 1024 for f in figures]
        res.rss_peak_mb_max, res.rss_peak_mb_sum = max(peaks), sum(peaks)
        res.corrupt, res.problems, res.leftover_downloads = check_stores(device_root, row.devices, public)
    finally:
        log = RESULTS / f"ota-row{row.number}-hub.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(hub.lines) + "\n")
        http.close()
        workers.kill()
        counters.close()
        hub.stop()
        broker.stop()
        if not args.keep:
            shutil.rmtree(device_root, ignore_errors=True)
    return res


class _Meters:
    def __init__(self, pids: list[int]) -> None:
        self.meters = [CpuMeter(p) for p in pids]

    def start(self) -> None:
        for m in self.meters:
            m.start()

    def stop(self) -> float:
        return sum(m.stop() for m in self.meters)


def _pid(broker: Any) -> int:
    return int(broker.proc.pid)


def _wait_registered(http: Any, n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        devices = http.get("/v1/devices").json()["devices"]
        if sum(1 for d in devices if d["online"] and d["profile"] == PROFILE) >= n:
            return
        time.sleep(0.5)
    msg = f"{n} devices did not register with the hub within {timeout:g} s"
    raise RuntimeError(msg)


def _chunk_share(status: dict[str, Any], per_device: int) -> float:
    """The share of all chunks the devices hold, from what they last reported (about once a second)."""
    held = 0
    for d in status["devices"]:
        if d["state"] in ("succeeded", "failed", "rolled_back", "skipped"):
            held += per_device
        elif d.get("progress"):
            held += d["progress"]["chunks"]
    return held / (per_device * len(status["devices"]))


def check_stores(root: Path, n: int, public: Path) -> tuple[int, list[str], int]:
    """Per device: the installed v1 read back (model hash checked by the reader) and its signature
    verified against the key; nothing half-installed beside it. (corrupt, first problems, leftover
    downloads)."""
    from edgekit_runtime.errors import EdgekitError
    from edgekit_runtime.signing import load_public_key, verify_bundle
    from edgekit_runtime.store import read_installed

    key = load_public_key(public)
    corrupt, leftovers = 0, 0
    problems: list[str] = []
    for i in range(n):
        store = root / f"dev-{i:04d}" / "store"
        model = store / MODEL
        why = ""
        entries = sorted(p.name for p in model.iterdir()) if model.is_dir() else []
        if entries != ["1"]:
            why = f"store holds {entries} for {MODEL}, not just the installed version 1"
        else:
            try:
                b = read_installed(model / "1")
                verify_bundle(b, [key], where=str(model / "1"))
                if (b.manifest.name, b.manifest.version) != (MODEL, 1):
                    why = f"installed {b.manifest.name} v{b.manifest.version}"
            except EdgekitError as e:
                why = e.message
        downloads = store / ".edgekit-agent" / "downloads"
        leftovers += len(list(downloads.iterdir())) if downloads.is_dir() else 0
        if why:
            corrupt += 1
            if len(problems) < 5:
                problems.append(f"dev-{i:04d}: {why}")
    return corrupt, problems, leftovers


# -- report ---------------------------------------------------------------------------------------


def settings_lines(args: argparse.Namespace) -> list[str]:
    import onnxruntime

    from edgekit_runtime.agent.protocol import DEFAULT_CHUNK
    from edgekit_runtime.agent.update import RETRY_SECONDS, WINDOW

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout.splitlines()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; edgekit commit {commit} (plus the working tree)",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GB RAM; load average at start {load}",
        f"- Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"{mosq[0] if mosq else 'mosquitto'}: persistence false, sys_interval 1, "
        f"{', '.join(args.mosquitto_conf) or 'nothing else'}; other settings default",
        f"- Chunks {DEFAULT_CHUNK >> 10} KiB, a window of {WINDOW} chunks outstanding per device, "
        f"asked again after {RETRY_SECONDS:g} s without data; one wave (100%), no health window or shadow check",
        f"- Devices: real Agent + Runtime (ONNX Runtime, 1 engine thread) each, {args.per_worker} per worker process, "
        f"agent link defaults (keep-alive 30 s, reconnect backoff 0.5-30 s with full jitter); stores in "
        f"{args.device_root} ({_fs(args.device_root)})",
        "- Hub: `edgekit hub serve` (SQLite, data on disk), polled every "
        f"{POLL_S:g} s with GET /v1/rollouts/ID; wall s = deploy POST to the poll that saw every device succeeded",
    ]


def _fs(path: str) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if str(Path(path).resolve()).startswith(mount) and len(mount) > len(best[0]):
            best = (mount, kind)
    return best[1]


HEADER = (
    "| row | devices | bundle | wall s | target | hub CPU s | broker CPU s | device CPU s | broker bytes in / out "
    "($SYS) | chunk frames (dup) / requests | worker peak RSS max / sum | corrupt | result |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(r: Result) -> str:
    target = TARGETS.get(r.row)
    done = r.counts.get("succeeded", 0) == r.devices
    verdict = "-" if target is None else ("PASS" if done and r.wall_s <= target and r.corrupt == 0 else "FAIL")
    label = "smoke" if r.row == 0 else str(r.row) + (" (broker restart)" if r.restart else "")
    return (
        f"| {label} | {r.devices:,} | {_size(r.bundle_bytes)} ({r.bundle_bytes:,} B, {r.chunks_per_device} chunks) "
        f"| {r.wall_s:.1f} | {'-' if target is None else f'<= {target:g} s'} "
        f"| {r.hub_cpu_s:.1f} | {r.broker_cpu_s:.1f} "
        f"| {r.device_cpu_s:.1f} | {r.sys_bytes_in / 1e6:,.1f} MB / {r.sys_bytes_out / 1e6:,.1f} MB "
        f"| {r.frames:,} ({r.duplicates:,}) / {r.requests:,} | {r.rss_peak_mb_max:.0f} / {r.rss_peak_mb_sum:,.0f} MB "
        f"| {r.corrupt} | {verdict} |"
    )


def details(r: Result) -> list[str]:
    need = r.devices * r.chunks_per_device
    out = [
        f"row {r.row}: rollout {r.state}, devices {r.counts} after {r.wall_s:.1f} s; every chunk on the devices "
        f"(by their reports) at {_secs(r.all_chunks_s)}, the first device succeeded at {_secs(r.first_succeeded_s)}; "
        f"{r.polls} status polls" + (f", {r.poll_errors} failed ({r.poll_error})" if r.poll_errors else ""),
        f"  chunks: {need:,} needed ({r.chunks_per_device} x {r.devices}), {r.frames:,} frames received "
        f"({r.duplicates:,} duplicates), {r.requests:,} requests; broker messages sent {r.sys_messages_out:,}, "
        f"dropped {r.sys_dropped:,}",
        f"  CPU: hub {r.hub_cpu_s:.1f} s, broker {r.broker_cpu_s:.1f} s, devices {r.device_cpu_s:.1f} s, "
        f"everything else on the machine {r.other_cpu_s:.1f} s, over {r.wall_s:.1f} s x {os.cpu_count()} cores",
        f"  broker /proc io: read {r.io_read / 1e6:,.0f} MB, written {r.io_write / 1e6:,.0f} MB (cross-check of $SYS)",
        f"  workers: {r.workers} x up to {-(-r.devices // r.workers)} devices; base RSS {r.rss_base_mb:.0f} MB, "
        f"peak {r.rss_peak_mb_max:.0f} MB max, {r.rss_peak_mb_sum:,.0f} MB in all "
        f"({r.rss_peak_mb_sum * 1024 / r.devices:,.0f} kB per device with the worker overhead)",
        f"  stores: {r.corrupt} corrupt, {r.leftover_downloads} download files left"
        + (f"; {'; '.join(r.problems)}" if r.problems else ""),
    ]
    if r.restart:
        out.append(
            f"  broker killed (kill -9) with {r.restart_at_chunks:.0%} of the chunks on the devices, "
            f"listening again {r.broker_down_s:.2f} s later; $SYS bytes before the kill are its last report "
            "(up to 1 s old)"
        )
    return out


def _secs(t: float) -> str:
    return f"{t:.1f} s" if t else "never"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="5 devices, a 256 KiB bundle: checks, not figures")
    p.add_argument("--row", type=int, action="append", choices=sorted(ROWS), help="run this row (repeatable)")
    p.add_argument("--per-worker", type=int, default=50, help="devices per worker process (default 50)")
    p.add_argument("--device-root", default="/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a row may take (default 600)")
    p.add_argument(
        "--mosquitto-conf",
        action="append",
        help="a line for the broker's conf (repeatable); default: max_queued_messages 100000. Mosquitto's "
        "own default, 1000 queued messages per client, drops the hub's messages when 1,000 devices connect "
        "at once (give --mosquitto-conf '' to see it)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work folders")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--first", "--count"):
        p.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--broker", "--trust-key", "--root"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mosquitto_conf is None:
        args.mosquitto_conf = ["max_queued_messages 100000"]
    args.mosquitto_conf = [line for line in args.mosquitto_conf if line.strip()]
    if args.worker:
        worker(args)
        return
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the hub, broker and workers on the way out
    rows = [SMOKE] if args.smoke else [ROWS[n] for n in (args.row or sorted(ROWS))]
    from edgekit_runtime.signing import generate_keys, load_signing_key

    print("# OTA rollout: " + "; ".join(r.label for r in rows))
    for line in settings_lines(args):
        print(line)
    results = []
    work = Path(tempfile.mkdtemp(prefix="edgekit-ota-"))
    try:
        private, public = generate_keys(work / "keys")
        for row in rows:
            t = time.monotonic()
            res = run_row(row, args, work, (public, load_signing_key(private)))
            results.append(res)
            for line in details(res):
                print(line)
            print(f"  ({time.monotonic() - t:.0f} s for the row with its setup)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(HEADER)
    for res in results:
        print(table_row(res))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if any(r.corrupt or r.counts.get("succeeded", 0) != r.devices for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
