"""Over-the-air updates end to end, with real processes only: a Mosquitto of the test's own on a
free port, `edgekit hub serve` as a process, and device processes (`python -m edgekit_runtime serve
STORE --broker ... --device-id ...`, each with its own store and HTTP port), driven through the CLI
as a user drives them (`edgekit push`, `deploy`, `rollout status`, `rollback`, `devices`, with
EDGEKIT_HUB and EDGEKIT_HUB_TOKEN set). What a device serves is read over its own HTTP API.

Covered: a first deploy and waves; a rollout aborted by a golden-sample failure, which puts the
devices it had switched back; a health-window rollback on live traffic; a broker restart, a device
kill -9 (mid-download, mid-install) and a hub kill -9 mid-rollout, each survived; tampered,
truncated, unsigned and wrongly signed artifacts refused (by `edgekit push` or by the device); a
rollback to the previous version. The broker's per-device ACL is tested on its own in
tests/toolkit/test_broker_config.py; the faster in-process fleet tests are tests/hub/test_fleet.py.

Every wait is bounded and says what it waited for; no test asserts a duration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgekit_runtime.bundle import ProfileRef, RuntimeSettings, read_bundle
from edgekit_runtime.signing import SigningKey, sign_bundle
from tests.hub.conftest import EDGEKIT, HubProcess, Keys, edgekit, make_bundle, make_keys, onnx_model
from tests.mqtt import WAIT, Mosquitto, Observer, free_port, wait_until
from tests.runtime import models

FEATURES = 64  # the digits model: float32[-1, 64] -> probs float32[-1, 10]
X = np.random.default_rng(7).normal(size=(3, FEATURES)).astype(np.float32)
LONG = 180.0  # seconds: the bound on waits that span a download of tens of MB on a busy machine


def expected_probs(seed: int, x: np.ndarray) -> np.ndarray:
    """What tests/hub/conftest.onnx_model(seed) answers: softmax(x W)."""
    w = np.random.default_rng(seed).normal(size=(FEATURES, 10)).astype(np.float32) / 16
    logits = x.astype(np.float64) @ w.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


# -- bundles ------------------------------------------------------------------------------------


def finish(path: Path, *, key: SigningKey | None, profile: str = "raspberrypi", golden_shift: float = 0.0) -> Path:
    """Give a bundle file its device profile, optionally wrong golden outputs (``golden_shift`` added
    to each, before signing, so the hub accepts it), and a signature by ``key``."""
    b = read_bundle(path)
    manifest = b.manifest.model_copy(update={"profile": ProfileRef(name=profile, runtime=RuntimeSettings())})
    b = dataclasses.replace(b, manifest=manifest, manifest_bytes=b"")
    if golden_shift:
        wrong = {k: v + np.float32(golden_shift) for k, v in b.golden_outputs.items()}
        b = dataclasses.replace(b, golden_outputs=wrong, golden_bytes=None)
    if key is not None:
        b = dataclasses.replace(b, signature=sign_bundle(b, key))
    b.write(path)
    return path


def padded_model(seed: int, megabytes: int) -> bytes:
    """onnx_model(seed) with ``megabytes`` of random weights no node uses: a big file (random floats
    barely compress) that answers like the small one, with the same signature."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_model(seed, FEATURES))
    pad = np.random.default_rng(seed).normal(size=megabytes << 18).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, "pad"))
    return bytes(model.SerializeToString())


def failing_on_large_values(features: int = FEATURES) -> bytes:
    """The digits signature (x float32[-1, features] -> probs [-1, 10]) as a lookup of x in a
    10-row table: golden samples and warm-up (small values) pass, live requests with x >= 10 fail
    inside the engine (an index out of range), which the runtime counts as server errors."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(5).normal(size=(10, 10)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "i"], ["g"], axis=0),
        helper.make_node("ReduceSum", ["g", "axes"], ["s"], keepdims=0),
        helper.make_node("Softmax", ["s"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 10])],
        [table, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@dataclasses.dataclass(frozen=True)
class Kit:
    """Keys and bundle files, built once for the module."""

    keys: Keys
    other: Keys  # a second key pair: trusted by the hub only, or by nobody
    folder: Path

    def bundle(self, version: int, seed: int, *, profile: str = "raspberrypi", megabytes: int = 0) -> Path:
        """digits vVERSION for ``profile``, signed by the trusted key (cached by its arguments); with
        ``megabytes``, that much more model file (the same inputs, outputs and answers)."""
        path = self.folder / f"digits-{version}-{seed}-{profile}-{megabytes}.ekb"
        if path.exists():
            return path
        if not megabytes:
            return make_bundle(path, version=version, profile=profile, key=self.keys.private, seed=seed)
        golden = {"x": np.random.default_rng(seed).normal(size=(2, FEATURES)).astype(np.float32)}
        models.make_bundle(path, name="digits", version=version, fmt="onnx", model=padded_model(seed, megabytes),
                           golden_in=golden)  # fmt: skip
        return finish(path, key=self.keys.private, profile=profile)

    def bad_golden(self, version: int, seed: int, *, profile: str) -> Path:
        """digits vVERSION for ``profile`` whose golden outputs are wrong, signed by the trusted key."""
        path = self.folder / f"digits-{version}-{seed}-{profile}-bad-golden.ekb"
        make_bundle(path, version=version, profile=profile, seed=seed)
        return finish(path, key=self.keys.private, profile=profile, golden_shift=1.0)

    def failing_live(self, version: int) -> Path:
        """digits vVERSION that passes its golden samples and fails on live requests with x >= 10."""
        path = self.folder / f"digits-{version}-failing-live.ekb"
        golden = {"x": np.random.default_rng(2).random((2, FEATURES)).astype(np.float32)}
        models.make_bundle(path, name="digits", version=version, fmt="onnx", model=failing_on_large_values(),
                           golden_in=golden)  # fmt: skip
        return finish(path, key=self.keys.private)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    folder = tmp_path_factory.mktemp("kit")
    return Kit(make_keys(folder / "keys"), make_keys(folder / "other-keys"), folder)


# -- the processes ------------------------------------------------------------------------------


class Device:
    """One device: `python -m edgekit_runtime serve STORE ...` with the agent, its own store and port."""

    def __init__(self, folder: Path, device_id: str, broker: Mosquitto, trust: Path, profile: str) -> None:
        self.id = device_id
        self.store = folder / "store"
        self.store.mkdir(parents=True)
        self.port = free_port()
        self.log = folder / "serve.log"
        self.args = [sys.executable, "-m", "edgekit_runtime", "serve", str(self.store), "--port", str(self.port),
                     "--broker", broker.url, "--device-id", device_id, "--trust-key", str(trust),
                     "--profile", profile, "--label", "site=lab"]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def start(self) -> Device:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log)
        return self

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(WAIT) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.http.close()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def serving(self) -> int | None:
        """The version the device's HTTP API serves digits with (TF Serving metadata), None if none."""
        try:
            r = self.http.get("/v1/models/digits/metadata")
        except httpx.TransportError:
            return None
        return int(r.json()["model_spec"]["version"]) if r.status_code == 200 else None

    def available(self) -> list[int]:
        """Versions in state AVAILABLE in GET /v1/models/digits."""
        r = self.http.get("/v1/models/digits")
        assert r.status_code == 200, r.text
        return sorted(int(s["version"]) for s in r.json()["model_version_status"] if s["state"] == "AVAILABLE")

    def predict(self, x: np.ndarray) -> httpx.Response:
        return self.http.post("/v1/models/digits:predict", json={"instances": x.tolist()})

    def wait_serving(self, version: int, timeout: float = WAIT) -> None:
        wait_until(lambda: self.serving() == version, f"{self.id} serving digits v{version} over HTTP", timeout)

    def assert_serves(self, version: int, seed: int) -> None:
        """Serves ``version`` alone, and a real :predict answer is that version's (its weights' seed)."""
        assert self.serving() == version, (self.id, self.serving(), self.tail())
        assert self.available() == [version], self.id
        r = self.predict(X)
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["predictions"], dtype=np.float64)
        np.testing.assert_allclose(got, expected_probs(seed, X), atol=1e-5)

    def marks(self, sha: str) -> bytes:
        """The download's chunk marks on the device's disk (b"" when there are none)."""
        try:
            return (self.store / ".edgekit-agent" / "downloads" / f"{sha}.have").read_bytes()
        except FileNotFoundError:
            return b""


class Lab:
    """One test's world: its own Mosquitto, one hub process, device processes."""

    def __init__(self, folder: Path, kit: Kit) -> None:
        self.folder = folder
        self.kit = kit
        self.broker = Mosquitto(folder).start()
        self.hub: HubProcess | None = None
        self.hub_args: tuple[str, ...] = ()
        self.devices: list[Device] = []

    # the hub

    def start_hub(self, *trusted: Path, port: int = 0) -> HubProcess:
        keys = trusted or (self.kit.keys.public_path,)
        self.hub_args = ("--broker", self.broker.url, *(a for k in keys for a in ("--trust-key", str(k))))
        self.hub = HubProcess(self.folder / "hub", *self.hub_args, port=port).start()
        return self.hub

    def restart_hub(self) -> None:
        """kill -9 the hub, then start it again on the same --data and --http port."""
        assert self.hub is not None
        port = int(self.hub.url.rsplit(":", 1)[1])
        assert self.hub.stop(signal.SIGKILL) == -signal.SIGKILL
        self.hub = HubProcess(self.folder / "hub", *self.hub_args, port=port).start()

    @property
    def env(self) -> dict[str, str]:
        assert self.hub is not None
        return self.hub.env()

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = edgekit(*args, env=self.env)
        if ok:
            assert done.returncode == 0, (args, done.returncode, done.stderr)
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def push(self, *bundles: Path) -> list[dict[str, Any]]:
        return list(self.json("push", *map(str, bundles)))

    def deploy(self, target: str, *options: str, to: str = "all") -> dict[str, Any]:
        return dict(self.json("deploy", target, "--to", to, *options))

    def status(self, rollout_id: str) -> dict[str, Any]:
        return dict(self.json("rollout", "status", rollout_id))

    def runs(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        return {d["device"]: d for d in self.status(rollout_id)["devices"]}

    def watch(
        self, rollout_id: str, until: Callable[[dict[str, Any]], bool], what: str, timeout: float = LONG
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Follow `edgekit rollout status ID --watch --json` (one document per change) until a
        document satisfies ``until``; that document and every one seen."""
        cmd = [EDGEKIT, "rollout", "status", rollout_id, "--watch", "--json", "--interval", "0.25"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        seen: list[dict[str, Any]] = []
        end = time.monotonic() + timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    line = None
                if line is None:
                    last = seen[-1] if seen else None
                    raise AssertionError(f"waiting for {what}: the rollout ended or {timeout:g} s passed: {last}")
                seen.append(json.loads(line))
                if until(seen[-1]):
                    return seen[-1], seen
        finally:
            proc.kill()
            proc.wait(WAIT)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

    def ended(self, rollout_id: str, timeout: float = LONG) -> dict[str, Any]:
        """The rollout's status document once it completed, aborted or was cancelled."""
        done = ("completed", "aborted", "cancelled")
        return self.watch(rollout_id, lambda s: s["state"] in done, f"rollout {rollout_id} to end", timeout)[0]

    # the devices

    def start_devices(self, n: int, *, profile: str = "raspberrypi", trust: Path | None = None) -> list[Device]:
        trust = trust or self.kit.keys.public_path
        new = []
        for _ in range(n):
            device_id = f"dev-{len(self.devices) + 1}"
            device = Device(self.folder / device_id, device_id, self.broker, trust, profile)
            self.devices.append(device.start())
            new.append(device)
        ids = {d.id for d in self.devices}

        def registered() -> bool:
            found = {d["id"]: d for d in self.json("devices")}
            return all(i in found and found[i]["online"] and found[i]["profile"] for i in ids)

        wait_until(registered, f"devices {sorted(ids)} registered and online on the hub", every=0.3)
        return new

    def fleet(self, version: int = 1, seed: int = 1, n: int = 3, trusted: tuple[Path, ...] = ()) -> list[Device]:
        """The usual start: a hub, ``n`` raspberrypi devices, digits vVERSION deployed to all."""
        self.start_hub(*trusted)
        devices = self.start_devices(n)
        self.push(self.kit.bundle(version, seed))
        self.rollout_done(self.deploy(f"digits:{version}"))
        return devices

    def rollout_done(self, started: dict[str, Any]) -> dict[str, Any]:
        done = self.ended(started["id"])
        why = [(d["device"], d["state"], d["reason"]) for d in done["devices"]]
        assert done["state"] == "completed", (done["state"], done["reason"], why, self.diagnose())
        return done

    def artifact(self, bundle: Path) -> Path:
        return self.folder / "hub" / "artifacts" / f"{hashlib.sha256(bundle.read_bytes()).hexdigest()}.ekb"

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        if self.hub is not None and self.hub.proc is not None and self.hub.proc.poll() is None:
            self.hub.stop()
        self.broker.stop()

    def diagnose(self) -> str:
        hub = "\n".join(self.hub.lines[-30:]) if self.hub is not None else ""
        devices = "\n".join(f"--- {d.id}\n{d.tail()}" for d in self.devices)
        return f"--- hub\n{hub}\n{devices}"


@pytest.fixture
def lab(tmp_path: Path, kit: Kit) -> Iterator[Lab]:
    world = Lab(tmp_path, kit)
    try:
        yield world
    finally:
        world.close()


# -- the tests ----------------------------------------------------------------------------------


def test_a_first_deploy_reaches_every_device(lab: Lab) -> None:
    lab.start_hub()
    devices = lab.start_devices(3)
    pushed = lab.push(lab.kit.bundle(1, seed=1))
    assert pushed[0]["created"] and pushed[0]["bundle"]["signer"]
    started = lab.deploy("digits:1")
    assert started["state"] == "running" and started["version"] == 1
    done = lab.rollout_done(started)
    assert sorted((d["device"], d["state"]) for d in done["devices"]) == [
        ("dev-1", "succeeded"), ("dev-2", "succeeded"), ("dev-3", "succeeded")]  # fmt: skip
    for d in devices:
        d.assert_serves(1, seed=1)


def test_a_new_version_in_waves(lab: Lab) -> None:
    devices = lab.fleet(version=1, seed=1)
    lab.push(lab.kit.bundle(2, seed=2))
    started = lab.deploy("digits:2", "--waves", "1,100%")
    assert started["wave"] == 1
    assert sorted(d["wave"] for d in started["devices"]) == [1, 2, 2]
    first = next(d["device"] for d in started["devices"] if d["wave"] == 1)
    done, seen = lab.watch(started["id"], lambda s: s["state"] != "running", "the rollout of v2 to end")
    assert done["state"] == "completed", done
    assert [d["state"] for d in done["devices"]] == ["succeeded"] * 3
    # the second wave started only once the first had succeeded
    for s in [started, *seen]:
        runs = {d["device"]: d for d in s["devices"]}
        if runs[first]["state"] != "succeeded":
            assert s["wave"] == 1, s
            assert all(d["state"] == "pending" for d in s["devices"] if d["wave"] == 2), s
    listed = {d["id"]: d["models"]["digits"] for d in lab.json("devices")}
    assert {i: (m["active"], m["state"]) for i, m in listed.items()} == dict.fromkeys(
        ("dev-1", "dev-2", "dev-3"), (2, "serving")
    )
    for d in devices:
        d.assert_serves(2, seed=2)


def test_a_golden_sample_failure_aborts_the_rollout_and_puts_switched_devices_back(lab: Lab) -> None:
    lab.start_hub()
    pis = lab.start_devices(2)
    jetson = lab.start_devices(1, profile="jetson")[0]  # dev-3: last by id, so in the last wave
    lab.push(lab.kit.bundle(1, seed=1), lab.kit.bundle(1, seed=1, profile="jetson"))
    lab.rollout_done(lab.deploy("digits:1"))
    lab.push(lab.kit.bundle(2, seed=2), lab.kit.bad_golden(2, seed=2, profile="jetson"))
    started = lab.deploy("digits:2", "--waves", "2,100%", "--abort-failure-rate", "20%", "--abort-min-devices", "3")
    assert {d["device"]: d["wave"] for d in started["devices"]} == {"dev-1": 1, "dev-2": 1, "dev-3": 2}
    done = lab.ended(started["id"])
    assert done["state"] == "aborted", done
    assert done["reason"] == "failure rate 33% of 3 finished devices is over --abort-failure-rate 20%", done
    runs = {d["device"]: d for d in done["devices"]}
    assert runs["dev-3"]["state"] == "failed", runs
    assert "output 'probs' differs from the golden samples" in runs["dev-3"]["reason"], runs["dev-3"]
    for d in pis:
        assert runs[d.id]["state"] == "rolled_back", runs
        assert runs[d.id]["reason"].startswith("put back on v1: the rollout aborted"), runs[d.id]
        d.wait_serving(1)
        d.assert_serves(1, seed=1)
    jetson.assert_serves(1, seed=1)  # it never switched: the new version failed beside the old one


def test_a_version_failing_on_live_traffic_is_rolled_back_in_its_health_window(lab: Lab) -> None:
    devices = lab.fleet(version=1, seed=1)
    lab.push(lab.kit.failing_live(2))
    started = lab.deploy("digits:2", "--waves", "1,100%", "--health-window", "30s")
    first = next(d for d in devices if d.id == next(r["device"] for r in started["devices"] if r["wave"] == 1))
    lab.watch(
        started["id"],
        lambda s: any(r["device"] == first.id and r["state"] == "watching" for r in s["devices"]),
        f"{first.id} watching v2 in its health window",
    )
    assert first.serving() == 2
    large = np.full((1, FEATURES), 20.0, np.float32)  # v1 answers these; v2 fails on them in the engine
    codes = [first.predict(large).status_code for _ in range(25)]
    assert sum(c >= 500 for c in codes) >= 20, codes
    done = lab.ended(started["id"])
    run = next(r for r in done["devices"] if r["device"] == first.id)
    assert run["state"] == "rolled_back", done
    assert run["reason"].startswith("health window: server error rate 100.0% over"), run
    assert run["reason"].endswith("against 0.0% for v1"), run
    assert done["state"] == "aborted" and done["failure_rate"] == 1.0, done  # one failure of one finished
    first.wait_serving(1)
    first.assert_serves(1, seed=1)
    assert first.predict(large).status_code == 200
    for d in devices:
        if d is not first:
            assert next(r for r in done["devices"] if r["device"] == d.id)["state"] == "skipped", done
            d.assert_serves(1, seed=1)  # the next wave never started


def test_a_rollback_brings_every_device_back_to_the_version_before(lab: Lab) -> None:
    devices = lab.fleet(version=1, seed=1)
    lab.push(lab.kit.bundle(2, seed=2))
    lab.rollout_done(lab.deploy("digits:2"))
    for d in devices:
        d.assert_serves(2, seed=2)
    started = lab.json("rollback", "digits", "--to", "all")
    assert started["kind"] == "rollback" and started["version"] is None
    assert sorted((d["device"], d["previous"], d["target"]) for d in started["devices"]) == [
        ("dev-1", 2, 1), ("dev-2", 2, 1), ("dev-3", 2, 1)]  # fmt: skip
    done = lab.rollout_done(started)
    assert [d["state"] for d in done["devices"]] == ["succeeded"] * 3, done
    for d in devices:
        d.assert_serves(1, seed=1)
    assert {d["id"]: d["models"]["digits"]["active"] for d in lab.json("devices")} == dict.fromkeys(
        ("dev-1", "dev-2", "dev-3"), 1
    )


BIG = 8  # MB of model: 128 chunks of 64 KiB
HUGE = 24  # MB: writing and fsyncing it into the store takes a while (~0.3 s here)


def partly(marks: bytes) -> bool:
    return 0 < sum(marks) < len(marks)


def test_a_broker_restart_mid_download_is_survived(lab: Lab) -> None:
    devices = lab.fleet(version=1, seed=1)
    big = lab.kit.bundle(2, seed=2, megabytes=BIG)
    sha = lab.push(big)[0]["bundle"]["sha256"]
    obs = Observer(lab.broker, "edgekit/devices/+/reported")
    try:
        started = lab.deploy("digits:2")

        def downloading() -> bool:
            """A device reported progress (at most once a second), or holds part of the download on
            disk (on a machine fast enough to fetch 8 MB within a second)."""
            for raw in list(obs.last.values()):
                p = json.loads(raw)["models"].get("digits", {}).get("progress") if raw else None
                if p and 0 < p["chunks"] < p["of"]:
                    return True
            return any(partly(d.marks(sha)) for d in devices)

        obs.wait_for(downloading, "a device part way through the download")
        lab.broker.restart()  # kill -9: connections and retained messages gone
        done = lab.rollout_done(started)
    finally:
        obs.close()
    assert [d["state"] for d in done["devices"]] == ["succeeded"] * 3, done
    for d in devices:
        d.assert_serves(2, seed=2)


def test_a_device_killed_mid_download_resumes_and_finishes(lab: Lab) -> None:
    devices = lab.fleet(version=1, seed=1)
    big = lab.kit.bundle(2, seed=2, megabytes=BIG)
    sha = lab.push(big)[0]["bundle"]["sha256"]
    victim = devices[0]
    started = lab.deploy("digits:2")
    wait_until(lambda: partly(victim.marks(sha)), f"{victim.id} holding part of the download", LONG, every=0.005)
    victim.kill()
    assert partly(victim.marks(sha))  # killed mid-download: some chunks on disk, not all
    victim.start()
    done = lab.rollout_done(started)
    assert [d["state"] for d in done["devices"]] == ["succeeded"] * 3, done
    for d in devices:
        d.assert_serves(2, seed=2)
    assert (victim.store / "digits" / "2" / "model.onnx").read_bytes() == read_bundle(big).model
    assert not list((victim.store / ".edgekit-agent" / "downloads").iterdir())


def test_a_device_killed_mid_install_serves_a_whole_version_and_finishes(lab: Lab) -> None:
    (device,) = lab.fleet(version=1, seed=1, n=1)
    huge = lab.kit.bundle(2, seed=4, megabytes=HUGE)
    lab.push(huge)
    started = lab.deploy("digits:2")
    folder = device.store / "digits"

    def installing() -> list[Path]:
        return [d for d in folder.iterdir() if d.name.startswith(".2.") and d.name.endswith(".part")]

    wait_until(installing, f"{device.id}'s install of v2 (its temporary folder in the store)", LONG, every=0.002)
    device.kill()
    left = installing()
    assert left and not (folder / "2").exists()  # killed mid-install: v2 half written, not in place
    device.start()
    done = lab.rollout_done(started)
    assert done["devices"][0]["state"] == "succeeded", done
    device.assert_serves(2, seed=4)
    assert (folder / "2" / "model.onnx").read_bytes() == read_bundle(huge).model
    assert sorted(d.name for d in folder.iterdir() if not d.name.startswith(".")) == ["1", "2"]
    assert not installing()  # the agent's start-up sweep removed the half-written install


def test_a_hub_killed_mid_rollout_comes_back_and_the_rollout_completes(lab: Lab) -> None:
    devices = lab.fleet(version=1, seed=1)
    big = lab.kit.bundle(2, seed=2, megabytes=BIG)
    sha = lab.push(big)[0]["bundle"]["sha256"]
    started = lab.deploy("digits:2", "--waves", "1,100%")
    first = next(d for d in devices if d.id == next(r["device"] for r in started["devices"] if r["wave"] == 1))
    wait_until(lambda: partly(first.marks(sha)), f"{first.id} (wave 1) holding part of the download", LONG, 0.005)
    lab.restart_hub()
    again = lab.status(started["id"])
    assert again["state"] == "running", again
    assert {d["device"]: d["wave"] for d in again["devices"]} == {d["device"]: d["wave"] for d in started["devices"]}
    done = lab.rollout_done(started)
    assert [d["state"] for d in done["devices"]] == ["succeeded"] * 3, done
    for d in devices:
        d.assert_serves(2, seed=2)


def test_push_refuses_unsigned_wrongly_signed_and_tampered_bundles(lab: Lab) -> None:
    lab.start_hub()  # trusts lab.kit.keys only
    folder = lab.folder / "refused"
    signed = make_bundle(folder / "signed.ekb", version=1, seed=1, key=lab.kit.keys.private)
    b = read_bundle(signed)  # changed after signing: other golden outputs, the signature kept
    wrong = {k: v + np.float32(1) for k, v in b.golden_outputs.items()}
    tampered = dataclasses.replace(b, golden_outputs=wrong, golden_bytes=None).write(folder / "tampered.ekb")
    cases = [
        (make_bundle(folder / "unsigned.ekb", version=1, seed=1), "the bundle is not signed"),
        (make_bundle(folder / "other.ekb", version=1, seed=1, key=lab.kit.other.private), "not trusted here"),
        (tampered, "the bundle was changed after signing"),
    ]
    for path, why in cases:
        done = lab.cli("push", str(path), ok=False)
        assert done.returncode == 9, (path.name, done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0] and path.name in lines[0], (path.name, done.stderr)
    assert lab.json("models") == []  # nothing of them kept


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_an_artifact_changed_on_the_hubs_disk_is_refused_by_the_device(lab: Lab, damage: str) -> None:
    (device,) = lab.fleet(version=1, seed=1, n=1)
    v2 = lab.kit.bundle(2, seed=2)
    lab.push(v2)
    stored = lab.artifact(v2)
    data = bytearray(stored.read_bytes())
    if damage == "tampered":
        data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    else:
        del data[len(data) // 2 :]
    stored.write_bytes(bytes(data))
    started = lab.deploy("digits:2", "--device-timeout", "60s", "--retries", "0")
    done = lab.ended(started["id"])  # a tampered file is fetched once more, then the update fails
    run = done["devices"][0]
    assert (done["state"], run["state"]) == ("aborted", "failed"), done
    if damage == "tampered":
        assert "sha256" in run["reason"], run
    else:
        assert run["reason"].startswith("the hub cannot serve the artifact: artifact "), run
        assert run["reason"].endswith("it changed after the push; push the bundle again"), run
    device.assert_serves(1, seed=1)
    assert not (device.store / "digits" / "2").exists()


def test_a_bundle_signed_by_a_key_the_device_does_not_trust_is_refused_by_it(lab: Lab) -> None:
    (device,) = lab.fleet(version=1, seed=1, n=1, trusted=(lab.kit.keys.public_path, lab.kit.other.public_path))
    other = make_bundle(lab.folder / "other.ekb", version=2, seed=2, key=lab.kit.other.private)
    assert lab.push(other)[0]["created"]  # the hub trusts both keys
    done = lab.ended(lab.deploy("digits:2")["id"])
    run = done["devices"][0]
    assert (done["state"], run["state"]) == ("aborted", "failed"), done
    assert "not trusted here" in run["reason"], run
    device.assert_serves(1, seed=1)
