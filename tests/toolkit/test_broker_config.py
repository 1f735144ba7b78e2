"""`edgekit broker-config` on a real Mosquitto: TLS with a certificate per device, and an ACL under
which device A can neither read nor write device B's topics, nor write any desired state."""

from __future__ import annotations

import getpass
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from tests.mqtt import WAIT, Mosquitto, free_port

P = "edgekit/devices"


class TlsClient:
    """A paho client with a client certificate, recording every message it receives."""

    def __init__(self, port: int, ident: str, folder: Path, *, cert: bool = True) -> None:
        import paho.mqtt.client as mqtt

        self.ident = ident
        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused = threading.Event()
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{ident}-{free_port()}")
        where = folder / "clients" / ident
        c.tls_set(
            ca_certs=str(folder / "ca.crt"),
            certfile=str(where / f"{ident}.crt") if cert else None,
            keyfile=str(where / f"{ident}.key") if cert else None,
        )
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *args: self._subscribed.set()
        c.on_disconnect = lambda *args: None if self.connected.is_set() else self.refused.set()
        c.on_connect_fail = lambda *args: self.refused.set()
        self._subscribed = threading.Event()
        self.client = c
        try:
            c.connect("127.0.0.1", port)
        except OSError:  # the TLS handshake itself refused (no certificate, unknown CA)
            self.refused.set()
            return
        c.loop_start()

    def _on_connect(self, client: Any, userdata: object, flags: object, reason: Any, props: object) -> None:
        (self.refused if reason.is_failure else self.connected).set()

    def _on_message(self, client: object, userdata: object, msg: Any) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(WAIT), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _ in self.got}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    folder = tmp_path / "broker"
    port = free_port()
    args = ["broker-config", str(folder), "--device", "a", "--device", "b", "--host", "127.0.0.1", "--port", str(port)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    conf = folder / "mosquitto.conf"
    if os.geteuid() == 0:  # mosquitto would drop to the user 'mosquitto', who cannot read broker.key (0600)
        conf.write_text(conf.read_text() + f"user {getpass.getuser()}\n")
    broker = Mosquitto(tmp_path, conf=conf, port=port).start()
    yield folder, port
    broker.stop()


def test_device_a_cannot_see_or_touch_device_b(fleet: tuple[Path, int]) -> None:
    folder, port = fleet
    hub, a, b = (TlsClient(port, i, folder) for i in ("hub", "a", "b"))
    try:
        for c in (hub, a, b):
            assert c.connected.wait(WAIT), f"{c.ident} could not connect with its certificate"
        hub.subscribe("edgekit/#")
        a.subscribe("edgekit/#")  # asks for everything: the ACL must give it only its own
        b.subscribe(f"{P}/b/desired")
        b.publish(f"{P}/b/presence", b"b online")
        b.publish(f"{P}/b/telemetry", b"b data")
        hub.publish(f"{P}/b/desired", b"for b")
        hub.publish(f"{P}/a/desired", b"for a")
        a.publish(f"{P}/b/desired", b"a forging b's desired state")
        a.publish(f"{P}/a/desired", b"a writing its own desired state")
        a.publish(f"{P}/b/presence", b"a pretending to be b")
        a.publish(f"{P}/a/presence", b"a online")
        end = time.monotonic() + WAIT
        while not ({f"{P}/a/desired"} <= a.topics() and f"{P}/a/presence" in hub.topics()):
            assert time.monotonic() < end, (a.got, hub.got)
            time.sleep(0.05)
        time.sleep(0.5)  # anything that should not arrive has had the time to (it never may)
        assert a.got == [(f"{P}/a/desired", b"for a")]  # its own desired state, and nothing of b's
        assert (f"{P}/b/desired", b"for b") in b.got
        assert (f"{P}/b/desired", b"a forging b's desired state") not in b.got
        hub_saw = [p for _, p in hub.got]
        assert b"a online" in hub_saw and b"b online" in hub_saw and b"b data" in hub_saw
        for forged in (b"a forging b's desired state", b"a writing its own desired state", b"a pretending to be b"):
            assert forged not in hub_saw
    finally:
        for c in (hub, a, b):
            c.close()


def test_a_client_without_a_certificate_of_this_ca_is_refused(fleet: tuple[Path, int], tmp_path: Path) -> None:
    folder, port = fleet
    nocert = TlsClient(port, "a", folder, cert=False)
    assert nocert.refused.wait(WAIT)
    assert not nocert.connected.is_set()
    other = tmp_path / "other"
    assert CliRunner().invoke(cli, ["broker-config", str(other), "--device", "a", "--host", "127.0.0.1"]).exit_code == 0
    stranger = TlsClient(port, "a", other)  # same name, certificate from another CA
    assert stranger.refused.wait(WAIT)
    assert not stranger.connected.is_set()
    nocert.close()
    stranger.close()


def test_broker_config_refuses_to_overwrite_and_checks_ids(fleet: tuple[Path, int], tmp_path: Path) -> None:
    folder, _ = fleet
    r = CliRunner().invoke(cli, ["broker-config", str(folder), "--device", "c", "--host", "h"])
    assert r.exit_code == 2
    assert "already holds a broker configuration" in r.output
    r = CliRunner().invoke(cli, ["broker-config", str(tmp_path / "x"), "--device", "a/#", "--host", "h"])
    assert r.exit_code == 2
    assert "device id 'a/#'" in r.output
    assert not (tmp_path / "x").exists()


def test_the_device_agent_connects_over_tls_with_its_certificate(fleet: tuple[Path, int]) -> None:
    from edgekit_runtime.agent import Link, parse_broker_url

    folder, port = fleet
    hub = TlsClient(port, "hub", folder)
    assert hub.connected.wait(WAIT)
    hub.subscribe("edgekit/#")
    where = folder / "clients" / "a"
    link = Link(
        parse_broker_url(f"mqtts://127.0.0.1:{port}"),
        client_id="a",
        tls_ca=str(where / "ca.crt"),
        tls_cert=str(where / "a.crt"),
        tls_key=str(where / "a.key"),
    )
    link.start()
    try:
        assert link.wait_connected(WAIT), link.last_error
        link.publish(f"{P}/a/presence", b"a over tls", retain=True)
        end = time.monotonic() + WAIT
        while (f"{P}/a/presence", b"a over tls") not in hub.got:
            assert time.monotonic() < end, hub.got
            time.sleep(0.05)
    finally:
        link.stop()
        hub.close()
