"""The hub's fleet side against a real Mosquitto and real device agents (in this process, each with
its own runtime and store): devices register, a deploy reaches every device in waves, the status
says per device what happened, a hub restart mid-rollout loses nothing, bad MQTT input is ignored.

The end-to-end tests with separate processes are in tests/e2e/test_ota.py; these are the faster ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekit.hub.artifacts import Artifacts
from edgekit.hub.errors import ConflictError
from edgekit.hub.fleet import DeployRequest, Fleet, parse_duration, select_devices
from edgekit.hub.registry import Registry
from edgekit.hub.store import DeviceRecord, Store, database_url
from edgekit_runtime.agent import Agent
from edgekit_runtime.agent.link import parse_broker_url
from edgekit_runtime.errors import InvalidInputError, NotFoundError
from edgekit_runtime.runtime import Runtime
from tests.hub.conftest import BundleFactory, Keys
from tests.mqtt import Mosquitto, Observer, wait_until

FAST = {"backoff_base": 0.05, "backoff_max": 0.5, "keepalive": 5}


class Hub:
    """A hub's fleet side over a SQLite file, as `edgekit hub serve` wires it."""

    def __init__(self, data: Path, broker: Mosquitto, keys: Keys) -> None:
        self.data = data
        self.broker = broker
        self.keys = keys
        data.mkdir(parents=True, exist_ok=True)
        self.open()

    def open(self) -> None:
        self.store = Store.open(database_url(None, self.data))
        self.artifacts = Artifacts(self.data / "artifacts")
        self.registry = Registry(self.store, self.artifacts, (self.keys.public,))
        self.fleet = Fleet(
            self.store, self.artifacts, broker=parse_broker_url(self.broker.url), link_options=FAST, tick_seconds=0.2
        )
        self.fleet.start()

    def close(self) -> None:
        self.fleet.stop()
        self.store.close()

    def devices(self) -> list[DeviceRecord]:
        with self.store.begin() as tx:
            return tx.devices()

    def wait_registered(self, n: int) -> None:
        wait_until(lambda: len([d for d in self.devices() if d.profile]) >= n, f"{n} devices registered")

    def wait_ended(self, rollout_id: str) -> dict[str, Any]:
        return dict(
            wait_until(
                lambda: (s := self.fleet.status(rollout_id))["state"] in ("completed", "aborted", "cancelled") and s,
                f"rollout {rollout_id} to end",
                timeout=90,
            )
        )


class Device:
    def __init__(self, folder: Path, device_id: str, broker: Mosquitto, keys: Keys, profile: str = "raspberrypi"):
        self.store = folder / "store"
        self.store.mkdir(parents=True)
        self.runtime = Runtime([self.store], trusted_keys=[keys.public])
        self.runtime.refresh()
        self.agent = Agent(
            self.runtime,
            parse_broker_url(broker.url),
            device_id=device_id,
            state_dir=self.store / ".edgekit-agent",
            store=self.store,
            profile=profile,
            labels={"site": "lab"},
            trusted_keys=[keys.public],
            link_options=FAST,
        )
        self.agent.start()
        self.agent.loaded()

    def serving(self, model: str) -> int | None:
        try:
            return self.runtime.get(model).version
        except Exception:  # noqa: BLE001 - nothing serves yet
            return None

    def close(self) -> None:
        self.agent.stop()
        self.runtime.close()


@pytest.fixture
def hub(tmp_path: Path, mosquitto: Mosquitto, keys: Keys) -> Iterator[Hub]:
    h = Hub(tmp_path / "hub", mosquitto, keys)
    yield h
    h.close()


@pytest.fixture
def fleet_of(tmp_path: Path, mosquitto: Mosquitto, keys: Keys) -> Iterator[Callable[..., list[Device]]]:
    made: list[Device] = []

    def make(n: int, profile: str = "raspberrypi", prefix: str = "pi") -> list[Device]:
        new = [Device(tmp_path / f"{prefix}-{i}", f"{prefix}-{i}", mosquitto, keys, profile) for i in range(n)]
        made.extend(new)
        return new

    yield make
    for d in made:
        d.close()


def test_devices_register_and_a_deploy_reaches_each_in_waves(
    hub: Hub, fleet_of: Callable[..., list[Device]], bundle: BundleFactory
) -> None:
    devices = fleet_of(3)
    jetson = fleet_of(1, profile="jetson", prefix="jet")[0]
    hub.wait_registered(4)
    found = {d.id: d for d in hub.devices()}
    assert found["pi-0"].profile == "raspberrypi" and found["pi-0"].labels == {"site": "lab"}
    assert found["jet-0"].online

    hub.registry.push(bundle(version=1, seed=1))
    status = hub.fleet.deploy(DeployRequest(model="digits", version=1, to="all", waves="1,100%"))
    assert status["state"] == "running"
    runs = {d["device"]: d for d in status["devices"]}
    assert runs["jet-0"]["state"] == "skipped"
    assert "no bundle of digits v1 for profile 'jetson'" in runs["jet-0"]["reason"]
    assert sorted(d["wave"] for d in status["devices"] if d["device"].startswith("pi")) == [1, 2, 2]

    done = hub.wait_ended(status["id"])
    assert done["state"] == "completed", done
    assert [d["state"] for d in done["devices"] if d["device"].startswith("pi")] == ["succeeded"] * 3
    assert all(d.serving("digits") == 1 for d in devices)
    assert jetson.serving("digits") is None
    # what the devices reported is what `edgekit devices` shows
    assert {d.id: d.models["digits"].active for d in hub.devices() if d.id.startswith("pi")} == dict.fromkeys(
        ("pi-0", "pi-1", "pi-2"), 1
    )

    # a second rollout of the same model while one runs is refused; after it ends, v2 by label
    hub.registry.push(bundle(version=2, seed=2))
    second = hub.fleet.deploy(DeployRequest(model="digits", version=2, to="site=lab", waves="100%"))
    with pytest.raises(ConflictError, match=r"is still running: wait for it, or `edgekit rollout cancel"):
        hub.fleet.deploy(DeployRequest(model="digits", version=2, to="all"))
    ended = hub.wait_ended(second["id"])
    assert ended["state"] == "completed", ended
    assert [d.serving("digits") for d in devices] == [2, 2, 2], ended
    with hub.store.begin() as tx:
        assert tx.device("pi-0") is not None
        assert tx.device("pi-0").models["digits"].previous == 1  # type: ignore[union-attr]


def test_a_hub_restart_mid_rollout_loses_nothing(
    hub: Hub, fleet_of: Callable[..., list[Device]], bundle: BundleFactory
) -> None:
    devices = fleet_of(3)
    hub.wait_registered(3)
    hub.registry.push(bundle(version=1, seed=1))
    # one device per wave, paused after the first: the hub restarts with the rest pending
    status = hub.fleet.deploy(DeployRequest(model="digits", version=1, to="all", waves="1,2,100%"))
    wait_until(lambda: devices[0].serving("digits") == 1 or None, "the first wave's device on v1")
    hub.fleet.control(status["id"], "pause")
    before = hub.fleet.status(status["id"])
    assert before["state"] == "paused"
    hub.close()
    hub.open()
    after = hub.fleet.status(status["id"])
    assert after["state"] == "paused"
    assert [(d["device"], d["wave"]) for d in after["devices"]] == [(d["device"], d["wave"]) for d in before["devices"]]
    hub.fleet.control(status["id"], "resume")
    assert hub.wait_ended(status["id"])["state"] == "completed"
    assert all(d.serving("digits") == 1 for d in devices)


def test_bad_mqtt_input_is_ignored_and_chunks_are_served_only_for_the_desired_artifact(
    hub: Hub, mosquitto: Mosquitto, fleet_of: Callable[..., list[Device]], bundle: BundleFactory
) -> None:
    obs = Observer(mosquitto)
    try:
        # the hub listens once a device's presence registers it (non-retained messages before that are lost)
        probe = json.dumps({"schema": 1, "online": True, "device": "probe", "profile": "test"}).encode()
        wait_until(
            lambda: obs.publish("edgekit/devices/probe/presence", probe) or "probe" in {d.id for d in hub.devices()},
            "the hub to listen",
        )
        for payload in (b"not json", b"[1]", json.dumps({"schema": 99, "online": True}).encode(), b"{" * 300_000):
            obs.publish("edgekit/devices/evil/presence", payload)
            obs.publish("edgekit/devices/evil/reported", payload)
            obs.publish("edgekit/devices/evil/chunks/get", payload)
        wait_until(lambda: hub.fleet.stats.protocol_errors >= 12, "every bad payload counted")
        # a chunk request for an artifact the device is not meant to fetch gets an error frame
        pushed = hub.registry.push(bundle(version=1, seed=1)).bundle
        req = {"schema": 1, "artifact": pushed.sha256, "chunk_size": 1024, "chunks": [0]}
        obs.publish("edgekit/devices/evil/chunks/get", json.dumps(req).encode())
        obs.wait_for(lambda: "edgekit/devices/evil/chunks/data" in obs.last, "an error frame")
        frame = obs.last["edgekit/devices/evil/chunks/data"]
        header = json.loads(frame[4 : 4 + int.from_bytes(frame[:4], "big")])
        assert "is not in device evil's desired state" in header["error"]
        # the hub still works: a device registers and is deployed to
        devices = fleet_of(1)
        hub.wait_registered(2)  # the probe and pi-0
        status = hub.fleet.deploy(DeployRequest(model="digits", version=1, to="pi-0"))
        assert hub.wait_ended(status["id"])["state"] == "completed"
        assert devices[0].serving("digits") == 1
    finally:
        obs.close()


def test_a_shadow_check_gates_the_switch_on_min_agreement(
    hub: Hub, fleet_of: Callable[..., list[Device]], bundle: BundleFactory
) -> None:
    devices = fleet_of(2)
    hub.wait_registered(2)
    hub.registry.push(bundle(version=1, seed=1))
    assert (
        hub.wait_ended(hub.fleet.deploy(DeployRequest(model="digits", version=1, to="all"))["id"])["state"]
        == "completed"
    )
    # v2: other weights (the top-1 class differs on some golden rows); v3: v1's weights again
    hub.registry.push(bundle(version=2, seed=2))
    hub.registry.push(bundle(version=3, seed=1))
    req = DeployRequest(model="digits", version=2, to="pi-0", shadow=1.0, min_agreement=100.0)
    failed = hub.wait_ended(hub.fleet.deploy(req)["id"])
    run = failed["devices"][0]
    assert (failed["state"], run["state"]) == ("aborted", "failed"), failed
    assert "agreement" in run["reason"], run
    assert run["shadow"]["source"] == "golden"  # no live traffic in the window: the golden samples
    assert run["shadow"]["value"] < 1.0
    assert devices[0].serving("digits") == 1
    req = DeployRequest(model="digits", version=3, to="all", shadow=1.0, min_agreement=100.0)
    passed = hub.wait_ended(hub.fleet.deploy(req)["id"])
    assert passed["state"] == "completed", passed
    assert all(d.serving("digits") == 3 for d in devices)


def test_a_broker_down_at_start_and_restarted_mid_rollout_costs_nothing(
    hub: Hub, mosquitto: Mosquitto, fleet_of: Callable[..., list[Device]], bundle: BundleFactory
) -> None:
    devices = fleet_of(2)
    hub.wait_registered(2)
    hub.registry.push(bundle(version=1, seed=1))
    mosquitto.kill()  # down: the deploy is stored and published once the hub is connected again
    status = hub.fleet.deploy(DeployRequest(model="digits", version=1, to="all"))
    assert [d["state"] for d in status["devices"]] == ["pending", "pending"]
    mosquitto.start()  # persistence off: no retained message survived; the hub republishes
    assert hub.wait_ended(status["id"])["state"] == "completed"
    assert [d.serving("digits") for d in devices] == [1, 1]


def test_a_hub_started_while_the_broker_is_down_connects_when_it_comes(
    tmp_path: Path, mosquitto: Mosquitto, keys: Keys, fleet_of: Callable[..., list[Device]], bundle: BundleFactory
) -> None:
    mosquitto.kill()
    late = Hub(tmp_path / "late-hub", mosquitto, keys)  # starts without a broker: no error, it retries
    try:
        devices = fleet_of(1)
        mosquitto.start()
        late.wait_registered(1)
        late.registry.push(bundle(version=1, seed=1))
        assert (
            late.wait_ended(late.fleet.deploy(DeployRequest(model="digits", version=1, to="all"))["id"])["state"]
            == "completed"
        )
        assert devices[0].serving("digits") == 1
    finally:
        late.close()


def test_deploy_requests_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="unknown field"):
        DeployRequest.from_json({"model": "m", "version": 1, "colour": "red"})
    with pytest.raises(InvalidInputError, match='"version" must be a version number'):
        DeployRequest.from_json({"model": "m", "version": "2"})
    with pytest.raises(InvalidInputError, match="the last wave must be 100%"):
        DeployRequest.from_json({"model": "m", "version": 1, "waves": "1,50%"})
    with pytest.raises(InvalidInputError, match='"abort_failure_rate" must be a number from 0 to 100'):
        DeployRequest.from_json({"model": "m", "version": 1, "abort_failure_rate": 150})
    assert DeployRequest.from_json({"model": "m", "version": 3, "device_timeout": "5m"}).device_timeout == 300
    assert parse_duration("500ms", "--x") == 0.5
    assert parse_duration("2h", "--x") == 7200
    with pytest.raises(InvalidInputError, match="give a duration such as 30s"):
        parse_duration("soon", "--device-timeout")
    devices = [
        DeviceRecord(i, "pi", {"site": s}, True, None, 0.0, {}) for i, s in (("a", "lab"), ("b", "field"), ("c", "lab"))
    ]
    assert [d.id for d in select_devices("site=lab", devices)] == ["a", "c"]
    assert [d.id for d in select_devices("b,a", devices)] == ["b", "a"]
    assert len(select_devices("all", devices)) == 3
    with pytest.raises(NotFoundError, match="no device 'z' has registered"):
        select_devices("a,z", devices)
    with pytest.raises(InvalidInputError, match="not both"):
        select_devices("a,site=lab", devices)
