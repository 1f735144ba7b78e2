"""A real Mosquitto for tests, on a free port, that a test can kill and restart on purpose; and an
observer client that records what the broker delivers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WAIT = 30.0  # seconds; a bound against hangs, never a timing assertion


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; past ``timeout`` an
    AssertionError naming ``what`` was awaited."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """``mosquitto -c CONF`` on 127.0.0.1:PORT with persistence off (Mosquitto's default), so a
    restart loses retained messages as a real one can."""

    def __init__(
        self, folder: Path, *, extra_conf: str = "", conf: Path | None = None, port: int | None = None
    ) -> None:
        """``conf``: run this configuration file as it is (it must listen on ``port``)."""
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.folder = folder
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        conf = self.conf
        if conf is None:
            conf = self.folder / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                f"log_dest stderr\n{self.extra_conf}"
            )
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        end = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > end:
                    raise AssertionError("mosquitto did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: no goodbye to anyone, retained messages lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)


class Observer:
    """An MQTT client subscribed to ``topic`` that keeps the last payload of every topic and all of
    them in order; reconnects by itself (paho's own loop) after a broker restart."""

    def __init__(self, broker: Mosquitto, topic: str = "#") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.last: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{free_port()}")
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.last[msg.topic] = bytes(msg.payload)
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + WAIT
        with self._cond:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; last messages: {self.last}")
                self._cond.wait(min(left, 0.05))  # also polls: predicates may look at files or other clients

    def json(self, topic: str) -> dict[str, Any]:
        with self._cond:
            return dict(json.loads(self.last[topic]))

    def wait_json(self, topic: str, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        def ok() -> bool:
            raw = self.last.get(topic)
            return raw is not None and bool(raw) and predicate(json.loads(raw))

        self.wait_for(ok, what)
        return self.json(topic)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
