"""Over-the-air updates on the device, end to end through a real Mosquitto: a scripted hub (this
test) publishes desired state and serves chunks from a real bundle file; the agent downloads,
verifies, installs, smoke-tests and switches, or refuses and keeps serving; and goes back to an
older version on request, from disk or downloaded. Kill -9 mid-download, a broker restart
mid-download and kill -9 while going back are survived."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.agent import Agent, Topics, parse_broker_url
from edgekit_runtime.agent.protocol import ChunkRequest, decode, encode_chunk
from edgekit_runtime.agent.update import health_verdict
from edgekit_runtime.bundle import read_bundle
from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.errors import EdgekitError
from edgekit_runtime.metrics import Figures
from edgekit_runtime.signing import generate_keys, load_public_key, load_signing_key, sign_bundle
from edgekit_runtime.store import install_bundle
from tests.mqtt import WAIT, Mosquitto, Observer, free_port

T = Topics("edgekit", "dev-1")
CHUNK = 1024  # small chunks: a test bundle of ~10 KB spans several windows


class ScriptedHub:
    """What the hub does for one device: publish desired state, answer chunk requests from files."""

    def __init__(self, broker: Mosquitto) -> None:
        self.obs = Observer(broker, "edgekit/devices/dev-1/#")
        self.files: dict[str, bytes] = {}
        self.requests: list[list[int]] = []
        self.generation = 0
        self.pause = threading.Event()  # while set, requests are recorded but not answered
        self._lock = threading.Lock()
        self.obs._client.message_callback_add(T.chunks_get, self._on_get)

    def _on_get(self, client: Any, userdata: object, msg: Any) -> None:
        req = decode(ChunkRequest, bytes(msg.payload))
        with self._lock:
            self.requests.append(req.chunks)
        if self.pause.is_set():
            return
        data = self.files.get(req.artifact)
        for i in req.chunks:
            if data is None:
                frame = encode_chunk(req.artifact, i, b"", error="unknown artifact")
            else:
                frame = encode_chunk(req.artifact, i, data[i * req.chunk_size : (i + 1) * req.chunk_size])
            client.publish(T.chunks_data, frame, qos=1)

    def deploy(self, model: str, version: int, bundle: Path, **extra: Any) -> None:
        data = bundle.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.files[sha] = data
        self.generation += 1
        artifact = {"sha256": sha, "size": len(data), "chunk_size": CHUNK}
        desired = {"schema": 1, "generation": self.generation,
                   "models": {model: {"version": version, "artifact": artifact, **extra}}}  # fmt: skip
        self.obs.publish(T.desired, json.dumps(desired).encode(), retain=True)

    def desire(self, model: str, version: int, **extra: Any) -> None:
        """Desired state without an artifact (the hub has no bundle for this version)."""
        self.generation += 1
        desired = {"schema": 1, "generation": self.generation, "models": {model: {"version": version, **extra}}}
        self.obs.publish(T.desired, json.dumps(desired).encode(), retain=True)

    def model(self, model: str) -> dict[str, Any]:
        return dict(self.obs.json(T.reported)["models"][model])

    def wait_done(self, model: str, version: int) -> dict[str, Any]:
        """Until ``model`` serves ``version`` or its update failed."""

        def done(r: dict[str, Any]) -> bool:
            m = r["models"].get(model, {})
            return m.get("state") == "failed" or (m.get("state") == "serving" and m.get("active") == version)

        return dict(self.obs.wait_json(T.reported, done, f"{model} v{version} serving or failed")["models"][model])

    def wait_state(self, model: str, *states: str) -> dict[str, Any]:
        report = self.obs.wait_json(
            T.reported, lambda r: r["models"].get(model, {}).get("state") in states, f"{model} in {states}"
        )
        return dict(report["models"][model])


def wide_model(seed: int, hidden: int = 4096) -> bytes:
    """x: float32[-1, 4] -> output_0 = relu(x W1) W2, [-1, 3]; ~110 KB of weights, so ~110 chunks of 1 KB."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(4, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.normal(size=(hidden, 3)) / 64).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["output_0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, ["n", 3])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unsigned ONNX bundles of model "mlp": v1, v2, v3 (other weights each), and a v3 ("bad") whose
    golden samples fail."""
    from tests.runtime import models

    d = tmp_path_factory.mktemp("wide")
    g = {"x": np.random.default_rng(9).normal(size=(4, 4)).astype(np.float32)}
    out: dict[str, Path] = {}
    for key, version, seed in (("v1", 1, 1), ("v2", 2, 2), ("v3", 3, 4), ("bad", 3, 3)):
        model = wide_model(seed)
        golden_out = None
        if key == "bad":
            from edgekit_runtime.backends import load_backend

            golden_out = {"output_0": load_backend("onnx", model).run(g)["output_0"] + 1.0}
        out[key] = models.make_bundle(
            d / f"{key}.ekb", name="mlp", version=version, fmt="onnx", model=model, golden_in=g, golden_out=golden_out
        )
    return out


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


def signed(src: Path, dst: Path, key: Path) -> Path:
    b = read_bundle(src)
    return dataclasses.replace(b, signature=sign_bundle(b, load_signing_key(key))).write(dst)


@contextmanager
def running_device(
    first: Path, store: Path, mosquitto: Mosquitto, keys: tuple[Path, Path]
) -> Iterator[tuple[Runtime, Agent, ScriptedHub]]:
    """A device serving the bundle ``first`` (installed into ``store``) with its agent, and a scripted hub."""
    install_bundle(first, store)
    hub = ScriptedHub(mosquitto)
    rt = Runtime([store], trusted_keys=[load_public_key(keys[1])])
    rt.refresh()
    agent = Agent(
        rt,
        parse_broker_url(mosquitto.url),
        device_id="dev-1",
        state_dir=store / ".edgekit-agent",
        store=store,
        profile="test",
        trusted_keys=[load_public_key(keys[1])],
        link_options={"backoff_base": 0.05, "backoff_max": 0.5, "keepalive": 5},
    )
    agent.start()
    agent.loaded()
    try:
        yield rt, agent, hub
    finally:
        agent.stop()
        rt.close()
        hub.obs.close()


@pytest.fixture
def device(
    wide: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path, keys: tuple[Path, Path]
) -> Iterator[tuple[Runtime, Agent, ScriptedHub]]:
    with running_device(signed(wide["v1"], tmp_path / "v1.ekb", keys[0]), store, mosquitto, keys) as d:
        yield d


X = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)


def test_a_signed_new_version_is_downloaded_installed_tested_and_serves(
    device: tuple[Runtime, Agent, ScriptedHub], wide: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    rt, agent, hub = device
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    v2 = signed(wide["v2"], tmp_path / "v2.ekb", keys[0])
    hub.deploy("mlp", 2, v2, rollout="r-1")
    done = hub.wait_done("mlp", 2)
    assert done["state"] == "serving", done
    assert done["active"] == 2
    assert rt.get("mlp").version == 2
    assert rt.predict("mlp", {"x": X})["output_0"].shape == (2, 3)
    assert len(hub.requests) >= 2  # more than one window: the download is device-driven
    assert max(len(r) for r in hub.requests) <= 16
    assert not list((agent.state.folder / "downloads").glob("*.part"))  # nothing left behind
    # v3 after v2: the store keeps the new version and the one before it, not v1
    hub.deploy("mlp", 3, signed(wide["v3"], tmp_path / "v3.ekb", keys[0]))
    assert hub.wait_done("mlp", 3)["active"] == 3
    assert sorted(d.name for d in (agent.state.folder.parent / "mlp").iterdir()) == ["2", "3"]


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("unsigned", "not signed"),
        ("other-key", "not trusted here"),
        ("golden-fails", "differs from the golden samples"),
        ("wrong-model", "not the desired mlp v4"),
        ("signature-change", "the signature changes"),
        ("other-profile", "built for profile 'jetson'"),
    ],
)
def test_a_bad_version_is_refused_and_the_old_one_keeps_serving(
    device: tuple[Runtime, Agent, ScriptedHub], wide: dict[str, Path], bundles: dict[str, Path], tmp_path: Path,
    keys: tuple[Path, Path], case: str, why: str,
) -> None:  # fmt: skip
    rt, _, hub = device
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    if case == "unsigned":
        bundle, version = wide["v2"], 2
    elif case == "other-key":
        other = generate_keys(tmp_path / "other")[0]
        bundle, version = signed(wide["v2"], tmp_path / "o.ekb", other), 2
    elif case == "golden-fails":
        bundle, version = signed(wide["bad"], tmp_path / "bad.ekb", keys[0]), 3
    elif case == "wrong-model":
        bundle, version = signed(wide["v2"], tmp_path / "v2.ekb", keys[0]), 4  # the file is v2
    elif case == "other-profile":
        b = read_bundle(wide["v2"])
        profile = b.manifest.profile.model_copy(update={"name": "jetson"})
        m = b.manifest.model_copy(update={"profile": profile})
        other_profile = dataclasses.replace(b, manifest=m, manifest_bytes=m.to_json()).write(tmp_path / "j.ekb")
        bundle, version = signed(other_profile, tmp_path / "js.ekb", keys[0]), 2
    else:
        b = read_bundle(bundles["two"])
        renamed = dataclasses.replace(b, manifest=b.manifest.model_copy(update={"name": "mlp", "version": 5}))
        renamed = dataclasses.replace(renamed, manifest_bytes=renamed.manifest.to_json())
        bundle = signed(renamed.write(tmp_path / "two-as-mlp.ekb"), tmp_path / "s.ekb", keys[0])
        version = 5
    hub.deploy("mlp", version, bundle)
    failed = hub.wait_state("mlp", "failed")
    assert why in failed["reason"], failed
    assert failed["target"] == version
    assert rt.get("mlp").version == 1  # the device keeps serving what it had
    assert rt.predict("mlp", {"x": X})["output_0"].shape == (2, 3)


def test_the_download_survives_a_broker_restart(
    device: tuple[Runtime, Agent, ScriptedHub], wide: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path],
    mosquitto: Mosquitto,
) -> None:  # fmt: skip
    _, _, hub = device
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    hub.pause.set()
    hub.deploy("mlp", 2, signed(wide["v2"], tmp_path / "v2.ekb", keys[0]))
    hub.obs.wait_for(lambda: len(hub.requests) >= 1, "the first chunk request")
    hub.obs.close()
    mosquitto.restart()  # kill -9: the retained desired state is gone; the hub publishes it again
    hub2 = ScriptedHub(mosquitto)
    hub2.files, hub2.generation = hub.files, hub.generation - 1
    hub2.deploy("mlp", 2, tmp_path / "v2.ekb")  # same generation as before: the agent keeps its job
    done = hub2.wait_done("mlp", 2)
    assert done["state"] == "serving" and done["active"] == 2, done
    hub.obs = hub2.obs  # the fixture closes this one


def test_kill_9_mid_download_resumes_from_the_chunks_on_disk(
    wide: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    install_bundle(signed(wide["v1"], tmp_path / "v1.ekb", keys[0]), store)
    v2 = signed(wide["v2"], tmp_path / "v2.ekb", keys[0])
    hub = ScriptedHub(mosquitto)
    answered = threading.Event()
    original = hub._on_get

    def first_window_only(client: Any, userdata: object, msg: Any) -> None:
        if answered.is_set():
            hub.requests.append(decode(ChunkRequest, bytes(msg.payload)).chunks)
            return
        answered.set()
        original(client, userdata, msg)

    hub.obs._client.message_callback_add(T.chunks_get, first_window_only)
    args = [sys.executable, "-m", "edgekit_runtime", "serve", str(store), "--port", str(free_port()),
            "--poll-seconds", "0", "--broker", mosquitto.url, "--device-id", "dev-1",
            "--trust-key", str(keys[1])]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
        hub.deploy("mlp", 2, v2)
        marks = store / ".edgekit-agent" / "downloads" / f"{hashlib.sha256(v2.read_bytes()).hexdigest()}.have"
        hub.obs.wait_for(lambda: marks.exists() and 0 < sum(marks.read_bytes()) == 8, "the first window on disk")
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        held = sum(marks.read_bytes())
        total = len(marks.read_bytes())
        assert 0 < held < total
        hub.requests.clear()
        hub.obs._client.message_callback_add(T.chunks_get, original)  # the hub answers everything now
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = hub.wait_done("mlp", 2)
        assert done["state"] == "serving" and done["active"] == 2, done
        asked = sorted({i for r in hub.requests for i in r})
        assert asked and min(asked) >= held  # resumed: the chunks it had were not asked for again
    finally:
        proc.kill()
        proc.wait(WAIT)
        hub.obs.close()
    installed = store / "mlp" / "2"
    assert (installed / "manifest.json").is_file()
    assert read_bundle(v2).model == (installed / "model.onnx").read_bytes()


def test_a_disk_too_full_for_the_download_fails_the_update_and_keeps_serving(
    wide: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    import resource

    install_bundle(signed(wide["v1"], tmp_path / "v1.ekb", keys[0]), store)
    v2 = signed(wide["v2"], tmp_path / "v2.ekb", keys[0])
    limit = v2.stat().st_size // 2  # room for half the download: files past this size cannot grow

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    hub = ScriptedHub(mosquitto)
    port = free_port()
    args = [sys.executable, "-m", "edgekit_runtime", "serve", str(store), "--port", str(port),
            "--poll-seconds", "0", "--broker", mosquitto.url, "--device-id", "dev-1",
            "--trust-key", str(keys[1])]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=small_disk)  # noqa: PLW1509
    try:
        hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
        hub.deploy("mlp", 2, v2)
        failed = hub.wait_state("mlp", "failed")
        assert failed["reason"].startswith(f"no room for a {v2.stat().st_size}-byte download"), failed
        assert failed["active"] == 1
        import requests

        r = requests.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", timeout=30, json={
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"
    finally:
        proc.kill()
        proc.wait(WAIT)
        hub.obs.close()
    assert not list((store / ".edgekit-agent" / "downloads").glob("*.part"))


def failing_on_large_values() -> bytes:
    """x: float32[-1, 4] -> output_0 [-1, 3]: looks x up in a 10-row table, so golden samples and
    warm-up (values in [0, 1)) pass and live requests with x >= 10 fail inside the engine."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(5).normal(size=(10, 3)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "i"], ["g"], axis=0),
        helper.make_node("ReduceSum", ["g", "axes"], ["output_0"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, ["n", 3])],
        [table, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_version_that_fails_live_traffic_is_rolled_back_in_its_health_window(
    device: tuple[Runtime, Agent, ScriptedHub], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from tests.runtime import models

    rt, _, hub = device
    plane = DataPlane(rt)  # what the HTTP routes call: it counts requests, errors and latency

    def request(x: np.ndarray) -> bool:
        async def one() -> None:
            model = plane.model("mlp")
            with plane.counted(model):
                await plane.infer(model, {"x": x})

        try:
            asyncio.run(one())
        except EdgekitError:
            return False
        return True

    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    big = np.full((1, 4), 20.0, np.float32)  # v1 answers these; v2 fails on them inside the engine
    assert all(request(big) for _ in range(30))
    golden = {"x": np.random.default_rng(2).random((4, 4)).astype(np.float32)}
    v2 = models.make_bundle(
        tmp_path / "lookup.ekb", name="mlp", version=2, fmt="onnx", model=failing_on_large_values(), golden_in=golden
    )
    hub.deploy("mlp", 2, signed(v2, tmp_path / "v2.ekb", keys[0]), health_window_s=120)
    hub.obs.wait_json(T.reported, lambda r: r["models"]["mlp"].get("state") == "watching", "v2 in its window")
    assert rt.get("mlp").version == 2
    answered = [request(big) for _ in range(25)]
    assert answered.count(False) >= 20
    back = hub.wait_state("mlp", "rolled_back")
    assert back["reason"].startswith("health window: server error rate 100.0% over"), back
    assert "against 0.0% for v1" in back["reason"]
    assert rt.get("mlp").version == 1  # put back by the device itself, with no word from the hub
    assert request(big)


def test_a_healthy_version_passes_its_health_window(
    device: tuple[Runtime, Agent, ScriptedHub], wide: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    rt, agent, hub = device
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    hub.deploy("mlp", 2, signed(wide["v2"], tmp_path / "v2.ekb", keys[0]), health_window_s=30)
    hub.obs.wait_json(T.reported, lambda r: r["models"]["mlp"].get("state") == "watching", "v2 in its window")
    assert rt.labels("mlp") == {"stable": 2, "canary": 2}  # the version in its window is the canary
    agent.updater.jobs["mlp"].health_window = 0  # type: ignore[union-attr]  # end the window at the next tick
    done = hub.wait_done("mlp", 2)
    assert done["state"] == "serving" and done["active"] == 2, done
    assert agent.updater is not None and agent.updater.jobs["mlp"].state == "succeeded"
    assert rt.labels("mlp") == {"stable": 2}


def versions_in(store: Path, model: str = "mlp") -> list[str]:
    """Every entry of the model's folder, hidden ones too: nothing half-removed may stay."""
    return sorted(d.name for d in (store / model).iterdir())


@pytest.mark.parametrize("artifact", [True, False], ids=["with-artifact", "without-artifact"])
def test_going_back_to_a_version_on_disk_switches_without_a_download(
    device: tuple[Runtime, Agent, ScriptedHub], wide: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path],
    artifact: bool,
) -> None:  # fmt: skip
    rt, agent, hub = device
    store = agent.state.folder.parent
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    hub.deploy("mlp", 2, signed(wide["v2"], tmp_path / "v2.ekb", keys[0]), rollout="r-1")
    assert hub.wait_done("mlp", 2)["active"] == 2
    assert versions_in(store) == ["1", "2"]  # the one before is kept for going back
    asked = len(hub.requests)
    if artifact:  # the hub could serve it: the device still takes the copy it has
        hub.deploy("mlp", 1, tmp_path / "v1.ekb", rollout="r-1-abort")
    else:
        hub.desire("mlp", 1, rollout="r-1-abort")
    back = hub.wait_done("mlp", 1)
    assert back["state"] == "serving" and back["active"] == 1, back
    assert len(hub.requests) == asked  # no chunk asked for
    assert rt.get("mlp").version == 1
    assert rt.predict("mlp", {"x": X})["output_0"].shape == (2, 3)
    assert versions_in(store) == ["1"]  # the newer version left the store, so a restart serves v1 too
    assert agent.updater is not None and agent.updater.jobs["mlp"].state == "succeeded"
    with Runtime([store]) as fresh:  # what a restarted device would serve
        fresh.refresh()
        assert fresh.get("mlp").version == 1


def test_going_back_to_a_version_not_on_disk_downloads_it(
    device: tuple[Runtime, Agent, ScriptedHub], wide: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    rt, agent, hub = device
    store = agent.state.folder.parent
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "v1 serving")
    hub.deploy("mlp", 2, signed(wide["v2"], tmp_path / "v2.ekb", keys[0]))
    assert hub.wait_done("mlp", 2)["active"] == 2
    hub.deploy("mlp", 3, signed(wide["v3"], tmp_path / "v3.ekb", keys[0]))
    assert hub.wait_done("mlp", 3)["active"] == 3
    assert versions_in(store) == ["2", "3"]
    hub.desire("mlp", 1)  # not on disk, and nothing to fetch: refused, v3 keeps serving
    failed = hub.wait_state("mlp", "failed")
    assert failed["reason"] == "v1 is not on this device any more and the desired state names no artifact to fetch"
    assert failed["active"] == 3
    asked = len(hub.requests)
    hub.deploy("mlp", 1, tmp_path / "v1.ekb", rollout="r-back")
    hub.obs.wait_json(T.reported, lambda r: r["models"]["mlp"]["reason"] != failed["reason"], "the new job")
    back = hub.wait_done("mlp", 1)
    assert back["state"] == "serving" and back["active"] == 1, back
    assert len(hub.requests) > asked  # downloaded
    assert rt.get("mlp").version == 1
    assert versions_in(store) == ["1"]
    assert read_bundle(tmp_path / "v1.ekb").model == (store / "mlp" / "1" / "model.onnx").read_bytes()


# Runs the device's serve command in a process that kills itself (SIGKILL, no clean-up of any kind)
# at one file-system step of going back: just before the newer version is renamed out of the store,
# or just after (before the renamed folder is deleted).
_KILLER = """
import os, runpy, signal, sys
target, point = sys.argv[1], sys.argv[2]
def hook(event, args):
    if point == "before-rename" and event == "os.rename" and str(args[0]) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "after-rename" and event == "shutil.rmtree" and str(args[0]).endswith(".removed"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = ["edgekit-runtime", *sys.argv[3:]]
runpy.run_module("edgekit_runtime", run_name="__main__")
"""


@pytest.mark.parametrize("point", ["before-rename", "after-rename"])
def test_kill_9_while_going_back_leaves_a_whole_version_serving(
    wide: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path, keys: tuple[Path, Path], point: str
) -> None:
    import requests

    v1, v2 = signed(wide["v1"], tmp_path / "v1.ekb", keys[0]), signed(wide["v2"], tmp_path / "v2.ekb", keys[0])
    install_bundle(v1, store)
    install_bundle(v2, store)
    hub = ScriptedHub(mosquitto)
    hub.desire("mlp", 1)  # retained: the device finds it when it starts
    port = free_port()
    serve = ["serve", str(store), "--port", str(port), "--poll-seconds", "0", "--broker", mosquitto.url,
             "--device-id", "dev-1", "--trust-key", str(keys[1])]  # fmt: skip
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLER, str(store / "mlp" / "2"), point, *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc = None
    try:
        assert killed.wait(WAIT * 4) == -signal.SIGKILL
        visible = [d for d in versions_in(store) if not d.startswith(".")]
        assert visible == (["1", "2"] if point == "before-rename" else ["1"])
        for v in visible:  # every version the runtime can see is whole
            installed = read_bundle(tmp_path / f"v{v}.ekb")
            assert (store / "mlp" / v / "model.onnx").read_bytes() == installed.model
        proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime", *serve],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        back = hub.wait_done("mlp", 1)
        assert back["state"] == "serving" and back["active"] == 1, back
        r = requests.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", timeout=30, json={
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"
        hub.obs.wait_for(lambda: versions_in(store) == ["1"], "the half-removed folder swept")
    finally:
        for p in (killed, proc):
            if p is not None:
                p.kill()
                p.wait(WAIT)
        hub.obs.close()


ERRORS_10 = "server error rate 10.0% over 30 requests against 0.0% for v1"


def _figures(requests: int, errors: int, p95_bucket: float) -> Figures:
    """``requests`` requests, ``errors`` of them 5xx, every latency in the bucket ``p95_bucket``."""
    bounds = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, float("inf"))
    return Figures(float(requests), float(errors), tuple((le, float(requests) if le >= p95_bucket else 0.0)
                                                        for le in bounds))  # fmt: skip


@pytest.mark.parametrize(
    ("new", "old", "verdict"),
    [
        (_figures(30, 0, 0.0025), _figures(30, 0, 0.001), ""),  # one coarse bucket step: not slower
        (_figures(30, 0, 0.025), _figures(30, 0, 0.01), "p95 latency 25.0 ms against 10.0 ms for v1"),
        (_figures(30, 0, 0.05), _figures(30, 0, 0.025), ""),  # exactly twice: not over twice
        (_figures(30, 0, 0.1), _figures(30, 0, 0.025), "p95 latency 100.0 ms against 25.0 ms for v1"),
        (_figures(30, 0, 0.1), _figures(10, 0, 0.001), ""),  # the previous version served too few
        (_figures(10, 10, 0.001), _figures(30, 0, 0.001), ""),  # too few requests in the window
        (
            _figures(30, 3, 0.001),
            _figures(30, 0, 0.001),
            "server error rate 10.0% over 30 requests against 0.0% for v1",
        ),
        (_figures(30, 1, 0.001), _figures(30, 0, 0.001), ""),  # 3.3%: within the 5-point margin
    ],
)
def test_the_health_verdict(new: Figures, old: Figures, verdict: str) -> None:
    assert health_verdict(new, old, 1) == verdict
