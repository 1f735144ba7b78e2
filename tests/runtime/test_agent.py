"""The device agent on a real Mosquitto: presence with a last will, reported state republished after a
broker restart, desired state checked, de-duplicated and kept across restarts; the wire protocol's
refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.agent import Agent, Desired, Presence, ProtocolError, Topics, parse_broker_url
from edgekit_runtime.agent.protocol import MAX_PAYLOAD_BYTES, decode, encode
from edgekit_runtime.errors import InvalidInputError
from edgekit_runtime.store import install_bundle
from tests.mqtt import WAIT, Mosquitto, Observer, free_port

T = Topics("edgekit", "dev-1")


def test_protocol_refuses_what_it_cannot_trust() -> None:
    for payload, why in [
        (b"\xff not json", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"schema": 2, "generation": 1}', "schema 2 is newer"),
        (b'{"generation": -1}', "invalid at 'generation'"),
        (b'{"generation": 1, "models": {"m": {"version": "two"}}}', "invalid at 'models.m.version'"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "over the"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            decode(Desired, payload, T.desired)
    assert decode(Desired, b'{"generation": 3, "models": {"m": {"version": 2}}, "future": 1}').generation == 3
    p = decode(Presence, encode(Presence(online=True, labels={"site": "a"})))
    assert p.online and p.labels == {"site": "a"}
    for bad in ("a/b", "+", "#", "", "dev 1"):
        with pytest.raises(InvalidInputError, match="device id"):
            Topics("edgekit", bad)
    assert parse_broker_url("mqtt://u:p@h:1999").port == 1999
    with pytest.raises(InvalidInputError, match="mqtt://HOST"):
        parse_broker_url("http://h:1")
    with pytest.raises(InvalidInputError, match="port"):
        parse_broker_url("mqtt://h:99999")


def agent_for(rt: Runtime, broker: Mosquitto, state: Path) -> Agent:
    a = Agent(
        rt,
        parse_broker_url(broker.url),
        device_id="dev-1",
        state_dir=state,
        profile="raspberrypi",
        labels={"site": "lab"},
        link_options={"backoff_base": 0.05, "backoff_max": 0.5, "keepalive": 5},
    )
    a.start()
    return a


def test_presence_reported_and_desired_on_a_real_broker(
    bundles: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    install_bundle(bundles["mlp"], store)
    obs = Observer(mosquitto, "edgekit/devices/dev-1/#")
    with Runtime([store]) as rt:
        rt.refresh()
        agent = agent_for(rt, mosquitto, tmp_path / "state")
        try:
            presence = obs.wait_json(T.presence, lambda p: p["online"], "presence online")
            assert presence["labels"] == {"site": "lab"}
            assert presence["profile"] == "raspberrypi"
            reported = obs.wait_json(T.reported, lambda r: "mlp" in r["models"], "reported state")
            mlp = reported["models"]["mlp"]
            assert (mlp["active"], mlp["versions"], mlp["state"], mlp["reason"]) == (1, [1], "serving", "")
            # desired v2: received, kept, reported honestly as not acted on
            obs.publish(T.desired, b'{"schema": 1, "generation": 4, "models": {"mlp": {"version": 2}}}', retain=True)
            reported = obs.wait_json(T.reported, lambda r: r["desired_generation"] == 4, "desired seen")
            assert reported["models"]["mlp"]["state"] == "pending"  # no store given to this agent
            assert "no store directory" in reported["models"]["mlp"]["reason"]
            seq = reported["seq"]
            # a duplicate, an older generation and garbage change nothing and crash nothing
            obs.publish(T.desired, b'{"schema": 1, "generation": 4, "models": {}}')
            obs.publish(T.desired, b'{"schema": 1, "generation": 2, "models": {}}')
            obs.publish(T.desired, b"garbage")
            obs.wait_for(lambda: agent.protocol_errors == 1, "the garbage counted")
            assert obs.json(T.reported)["seq"] == seq
            assert agent.state.desired is not None and agent.state.desired.generation == 4
        finally:
            agent.stop()
        assert obs.wait_json(T.presence, lambda p: not p["online"], "presence offline on stop")
        state = json.loads((tmp_path / "state" / "agent.json").read_text())
        assert state["desired"]["generation"] == 4
        assert state["seq"] == seq
        # a restarted agent remembers: its sequence goes on, its desired state is the one kept
        again = agent_for(rt, mosquitto, tmp_path / "state")
        try:
            obs.wait_json(T.reported, lambda r: r["seq"] > seq, "the restarted agent's report")
            assert again.state.desired is not None and again.state.desired.generation == 4
        finally:
            again.stop()
    obs.close()


def test_the_agent_republishes_after_a_broker_restart_that_lost_everything(
    bundles: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    install_bundle(bundles["mlp"], store)
    with Runtime([store]) as rt:
        rt.refresh()
        agent = agent_for(rt, mosquitto, tmp_path / "state")
        try:
            assert agent.link.wait_connected(WAIT)
            mosquitto.restart()  # kill -9; persistence off: retained presence and state are gone
            obs = Observer(mosquitto, "edgekit/devices/dev-1/#")
            obs.wait_json(T.presence, lambda p: p["online"], "presence again after the restart")
            obs.wait_json(T.reported, lambda r: r["models"]["mlp"]["active"] == 1, "reported again")
            assert agent.link.connects >= 2
            obs.close()
        finally:
            agent.stop()


def test_serve_with_broker_runs_the_agent_and_its_will_says_offline_on_kill_9(
    bundles: dict[str, Path], store: Path, mosquitto: Mosquitto
) -> None:
    install_bundle(bundles["mlp"], store)
    obs = Observer(mosquitto, "edgekit/devices/dev-1/#")
    args = [sys.executable, "-m", "edgekit_runtime", "serve", str(store), "--port", str(free_port()),
            "--poll-seconds", "0", "--broker", mosquitto.url, "--device-id", "dev-1",
            "--label", "site=lab"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        obs.wait_json(T.presence, lambda p: p["online"] and p["labels"] == {"site": "lab"}, "presence online")
        obs.wait_json(T.reported, lambda r: r["models"].get("mlp", {}).get("active") == 1, "mlp v1 serving")
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        obs.wait_json(T.presence, lambda p: not p["online"], "the last will: offline")
    finally:
        if proc.poll() is None:
            proc.kill()
        obs.close()


def test_a_new_device_with_no_store_yet_creates_it_and_registers(tmp_path: Path, mosquitto: Mosquitto) -> None:
    store = tmp_path / "new" / "store"  # nothing there yet: a device before its first update
    obs = Observer(mosquitto, "edgekit/devices/dev-1/#")
    args = [sys.executable, "-m", "edgekit_runtime", "serve", str(store), "--port", str(free_port()),
            "--poll-seconds", "0", "--broker", mosquitto.url, "--device-id", "dev-1"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        obs.wait_json(T.presence, lambda p: p["online"], "presence online")
        obs.wait_json(T.reported, lambda r: r["models"] == {}, "an empty report")
        assert store.is_dir()
    finally:
        proc.kill()
        proc.wait(WAIT)
        obs.close()
    # without --broker a missing store stays an error (nothing would ever fill it)
    r = subprocess.run(
        [sys.executable, "-m", "edgekit_runtime", "serve", str(tmp_path / "nope"), "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert "no such store directory or bundle file" in r.stderr
    assert not (tmp_path / "nope").exists()


def test_agent_flags_are_checked_before_anything_starts(bundles: dict[str, Path]) -> None:
    for extra, why in [
        (["--device-id", "d"], "give --broker"),
        (["--broker", "mqtt://127.0.0.1:1"], "needs --device-id"),
        (["--broker", "mqtt://127.0.0.1:1", "--device-id", "a/b"], "device id 'a/b'"),
        (["--broker", "tcp://x", "--device-id", "d"], "mqtt://HOST"),
        (["--broker", "mqtt://127.0.0.1:1", "--device-id", "d", "--label", "novalue"], "KEY=VALUE"),
        (["--broker", "mqtt://127.0.0.1:1", "--device-id", "d"], "first store directory"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "edgekit_runtime", "serve", str(bundles["mlp"]), "--port", "0", *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, (extra, proc.stderr)
        assert why in proc.stderr, (extra, proc.stderr)
