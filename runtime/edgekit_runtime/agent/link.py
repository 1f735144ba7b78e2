"""The agent's MQTT connection: paho-mqtt in one thread, reconnecting with jittered exponential backoff.

paho's own reconnect loop waits a fixed exponential series; a fleet that lost its broker would then
come back in lockstep and hit it all at once. Here every wait is drawn at random between 0 and the
current cap ("full jitter"), the cap doubling from ``backoff_base`` up to ``backoff_max``.

The retained copies a broker keeps are a cache, not the truth (Mosquitto's default is
``persistence false``): on every (re)connect the link calls ``on_connect`` so the owner publishes
its presence and state again, and it resubscribes.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from edgekit_runtime.errors import InvalidInputError

__all__ = ["BrokerAddress", "Link", "parse_broker_url"]

log = logging.getLogger("edgekit_runtime.agent")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://...:8883``; InvalidInputError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        msg = f"--broker {url!r}: give mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)"
        raise InvalidInputError(msg)
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        msg = f"--broker {url!r}: the port is not a number between 0 and 65535"
        raise InvalidInputError(msg) from None
    return BrokerAddress(parts.hostname, port, parts.scheme == "mqtts", parts.username, parts.password)


Handler = Callable[[str, bytes], None]


class Link:
    """One MQTT client: connect, keep connected, publish, deliver subscribed messages to handlers.

    Keyword arguments:
        client_id: the MQTT client id (the device id).
        will: (topic, payload) published retained by the broker if this client vanishes.
        on_connect: called (in the link's thread) after every successful connect, to republish state.
        backoff_base, backoff_max: seconds; the reconnect waits' starting and largest cap.
        keepalive: seconds; the broker declares the client gone (and sends the will) after 1.5x this.
        tls_ca, tls_cert, tls_key: files for TLS (mqtts://) with a client certificate.
        max_inflight: QoS 1 messages sent and not yet acknowledged (paho's default is 20; the hub,
            which answers a whole fleet's chunk requests, raises it).
        mqtt5: speak MQTT 5 (the hub's telemetry workers, for a shared subscription) instead of 3.1.1.
    """

    def __init__(
        self,
        broker: BrokerAddress,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        keepalive: int = 30,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_inflight: int = 20,
        mqtt5: bool = False,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.broker = broker
        self._mqtt = mqtt
        if mqtt5:  # shared subscriptions ($share/GROUP/...) are MQTT 5's; clean start is its default
            self._client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
                client_id=client_id,
                protocol=mqtt.MQTTv5,
            )
        else:
            self._client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
                client_id=client_id,
                protocol=mqtt.MQTTv311,
                clean_session=True,
            )
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls or tls_ca is not None:
            self._client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._handlers: dict[str, Handler] = {}
        self._filters: dict[str, Handler] = {}  # what messages are matched against ($share/G/ cut off)
        self._on_connect = on_connect
        self._base = backoff_base
        self._max = backoff_max
        self._keepalive = keepalive
        self._stop = threading.Event()
        self._is_connected = threading.Event()
        self._connecting = False  # CONNECT sent, CONNACK not yet seen: owned by the loop thread
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.connects = 0

    # -- use ----------------------------------------------------------------------------------

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Deliver messages on ``topic`` to ``handler``; kept across reconnects. ``topic`` may hold
        MQTT wildcards (``+``, ``#``): the hub subscribes to every device's topics at once; and it
        may be a shared subscription, ``$share/GROUP/FILTER`` (the broker gives each message to one
        subscriber of the group)."""
        self._handlers[topic] = handler
        if topic.startswith("$share/"):
            self._filters[topic.split("/", 2)[2]] = handler
        if self._is_connected.is_set():
            self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> Any:
        """Queue a message; paho sends it now or, at QoS 1, once connected again. Returns paho's
        MQTTMessageInfo (``is_published()`` once the broker acknowledged it)."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def connected(self) -> bool:
        return self._is_connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._is_connected.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgekit-mqtt", daemon=True)
        self._thread.start()

    def stop(self, *, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (retained; e.g. presence offline) if connected, disconnect, stop the thread."""
        if final is not None and self._is_connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            # the loop thread sends it; if the connection goes away meanwhile, the will says offline
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._stop.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(10)
        # paho closes its socket and its wake-up socket pair (two TCP sockets on 127.0.0.1) only when
        # its loop sees the disconnect; this loop has stopped, so close them here (a publish while
        # never connected makes the pair too): left to the garbage collector they warn
        reset = getattr(self._client, "_reset_sockets", None)
        if callable(reset) and (self._thread is None or not self._thread.is_alive()):
            reset()

    # -- the loop -----------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        return random.uniform(0, min(self._max, self._base * 2**attempt))  # noqa: S311 - jitter, not crypto

    def _run(self) -> None:
        mqtt = self._mqtt
        attempt = 0
        first = True
        while not self._stop.is_set():
            if not self._is_connected.is_set() and not self._connecting:
                try:
                    if first:
                        self._client.connect(self.broker.host, self.broker.port, keepalive=self._keepalive)
                        first = False
                    else:
                        self._client.reconnect()
                    self._connecting = True
                except (OSError, ValueError) as e:
                    self._note(f"cannot reach the broker at {self.broker.host}:{self.broker.port}: {e}")
                    self._stop.wait(self._delay(attempt))
                    attempt += 1
                    continue
            rc = self._client.loop(timeout=0.2)
            if self._is_connected.is_set():
                attempt = 0
            if rc != mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                self._is_connected.clear()
                self._connecting = False
                self._stop.wait(self._delay(attempt))
                attempt += 1

    def _note(self, error: str) -> None:
        if error != self.last_error:
            log.warning("mqtt: %s; retrying", error)
        self.last_error = error

    # -- paho callbacks (in the loop thread) --------------------------------------------------

    def _connected(self, client: object, userdata: object, flags: object, reason: object, props: object) -> None:
        # The loop owns the connecting/down state; a refused CONNACK closes the socket and the loop
        # then backs off like after any other failure.
        if getattr(reason, "is_failure", False):
            self._note(f"the broker refused the connection: {reason}")
            return
        self.connects += 1
        self.last_error = ""
        self._is_connected.set()
        log.info("mqtt: connected to %s:%d", self.broker.host, self.broker.port)
        for topic in self._handlers:
            self._client.subscribe(topic, qos=1)
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:  # the owner's bug must not kill the connection
                log.exception("mqtt: on_connect failed")

    def _disconnected(self, client: object, userdata: object, flags: object, reason: object, props: object) -> None:
        self._is_connected.clear()
        if not self._stop.is_set():
            self._note(f"disconnected from the broker ({reason})")

    def _message(self, client: object, userdata: object, message: object) -> None:
        topic = getattr(message, "topic", "")
        handler = self._handlers.get(topic)
        if handler is None:
            patterns = {**self._handlers, **self._filters}
            matches = (h for pattern, h in patterns.items() if self._mqtt.topic_matches_sub(pattern, topic))
            handler = next(matches, None)
        if handler is None:
            return
        try:
            handler(topic, bytes(getattr(message, "payload", b"")))
        except Exception:  # a handler's bug must not kill the connection
            log.exception("mqtt: handling a message on %s failed", topic)
