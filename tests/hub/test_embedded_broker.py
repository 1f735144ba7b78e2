"""The embedded broker (amqtt in its own thread): a device's Link and a paho client exchanging a
retained message through it, a busy port refused up front (by a plain socket and by a real
Mosquitto), loopback only; and `edgekit hub serve --embedded-broker` as a real process."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgekit.hub.embedded_broker import start_embedded_broker
from edgekit_runtime.agent.link import BrokerAddress, Link, parse_broker_url
from edgekit_runtime.errors import InvalidInputError, UnavailableError
from tests.hub.conftest import HubProcess, edgekit
from tests.mqtt import WAIT, Mosquitto, Observer

pytest.importorskip("amqtt", reason="pip install 'edgekit-ml[embedded-broker]' (scripts/setup does)")

_BROKER_LINE = re.compile(
    r"^embedded MQTT broker on (mqtt://127\.0\.0\.1:\d+) \(amqtt; for a laptop quick start, not for production: "
    r"use Mosquitto with edgekit broker-config\)$"
)


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_retained_message_from_a_link_reaches_a_later_subscriber() -> None:
    with start_embedded_broker(port=0) as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert broker.port != 0
        device = Link(parse_broker_url(broker.url), client_id="pi-7")
        device.start()
        assert device.wait_connected(WAIT)
        device.stop(final=("edgekit/test/pi-7/state", b'{"state": "idle"}'))

        observer = Observer(broker, "edgekit/test/#")  # type: ignore[arg-type]  # it only reads .port
        try:
            observer.wait_for(lambda: "edgekit/test/pi-7/state" in observer.last, "the retained state")
            assert observer.messages == [("edgekit/test/pi-7/state", b'{"state": "idle"}', True)]

            # and the other way: a retained message the device finds when it (re)connects
            observer.publish("edgekit/test/pi-7/desired", b'{"version": 3}', retain=True)
            received: list[bytes] = []
            got = threading.Event()
            again = Link(BrokerAddress(broker.host, broker.port), client_id="pi-7")
            again.subscribe("edgekit/test/pi-7/desired", lambda _topic, payload: (received.append(payload), got.set()))
            again.start()
            assert got.wait(WAIT)
            # at least once, as QoS 1 promises: amqtt 0.12.1 now and then sends a retained message
            # twice to a client that subscribes right after connecting
            assert set(received) == {b'{"version": 3}'}
            again.stop()
        finally:
            observer.close()
    assert _refused(broker.host, broker.port)  # stopped: nothing listens there any more
    broker.stop()  # again: nothing happens


def test_a_port_held_by_another_program_is_refused_before_anything_starts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UnavailableError) as e:
            start_embedded_broker(port=port)
    assert e.value.message == (
        f"port {port} on 127.0.0.1 is already in use; "
        "give the embedded broker another port with --broker-port N (0 picks a free one)"
    )
    assert not any(t.name == "edgekit-embedded-broker" for t in threading.enumerate())


def test_a_port_held_by_mosquitto_is_refused_saying_so(tmp_path: Path) -> None:
    mosquitto = Mosquitto(tmp_path).start()
    try:
        with pytest.raises(UnavailableError) as e:
            start_embedded_broker(port=mosquitto.port)
    finally:
        mosquitto.stop()
    assert e.value.message == (
        f"port {mosquitto.port} on 127.0.0.1 is already in use by another MQTT broker (a system Mosquitto?): "
        f"use it with --broker mqtt://127.0.0.1:{mosquitto.port} instead of --embedded-broker, "
        "or give the embedded broker another port with --broker-port N (0 picks a free one)"
    )


def test_it_listens_on_loopback_only() -> None:
    with pytest.raises(InvalidInputError) as e:
        start_embedded_broker("0.0.0.0", 0)
    assert e.value.message == (
        "the embedded MQTT broker lets anyone in without a password, so it listens on loopback (127.0.0.1) only, "
        "not 0.0.0.0; for a broker devices on the network reach, run Mosquitto with edgekit broker-config"
    )
    with start_embedded_broker("::1", 0) as broker:
        assert broker.url == f"mqtt://[::1]:{broker.port}"


def test_hub_serve_with_the_embedded_broker(hub_factory: Callable[..., HubProcess]) -> None:
    hub = hub_factory("--embedded-broker", "--broker-port", "0")
    broker_line, hub_line = hub.lines[:2]
    m = _BROKER_LINE.match(broker_line)
    assert m, hub.lines
    assert hub_line.startswith(f"edgekit hub on {hub.url} (data "), hub.lines
    address = parse_broker_url(m.group(1))
    assert address.port != 1883

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="laptop")
    assert client.connect(address.host, address.port) == mqtt.MQTT_ERR_SUCCESS
    client.loop_start()
    try:
        client.publish("edgekit/test/hello", b"hi", qos=1, retain=True).wait_for_publish(WAIT)
    finally:
        client.loop_stop()
        client.disconnect()

    assert hub.stop() == 0, hub.lines
    assert not any("Traceback" in line for line in hub.lines), hub.lines
    assert _refused(address.host, address.port)


def test_embedded_broker_flags_that_do_not_fit_are_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    cases = [
        (["--embedded-broker", "--broker", "mqtt://127.0.0.1:1883"], "Error: give either --broker URL"),
        (
            ["--broker-port", "1884"],
            "Error: --broker-port is the embedded broker's port: give it with --embedded-broker",
        ),
    ]
    for args, start in cases:
        r = edgekit("hub", "serve", "--data", str(data), "--http", "127.0.0.1:0", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(start), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    assert not data.exists()  # refused before anything started
