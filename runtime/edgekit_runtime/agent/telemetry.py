"""The device's telemetry: every interval, one message per model version (livestats.Window) and one
with the device's own figures go into the on-disk queue (spool.py); a sender drains the queue to
the hub over MQTT, oldest first, and forgets a message only when the hub's Ack names its sequence
number (the hub acks after its database committed the row).

Why not trust the broker: a QoS 1 PUBACK only says the broker has it, and a broker queues at most
``max_queued_messages`` (1000 by default in Mosquitto) for a subscriber that is away, then drops
silently. So the device keeps every message until the hub itself says it is stored, and sends
again what stays unacknowledged: the hub de-duplicates by (device, sequence).

Batching: what the sender takes from the queue at once (an interval's messages, or part of a
backlog) goes as one MQTT message, ``{"schema": 1, "batch": [message, ...]}``, up to BATCH_BYTES;
the hub acks the sequence numbers as ever.

Pacing: at most ``window`` messages unacknowledged at once and at most ``rate`` per second (a
token bucket), so a fleet coming back after an outage drains its backlog at a pace the hub sets by
acknowledging, instead of flooding it. After ``ack_timeout`` without an Ack for the oldest message
in flight (the hub is down, a message was lost) the sender starts again from the oldest unacked.

One thread owns the queue; paho's callback only hands Acks over.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit_runtime import __version__
from edgekit_runtime.agent.link import Link
from edgekit_runtime.agent.protocol import (
    SCHEMA,
    Ack,
    ProtocolError,
    Topics,
    decode,
)
from edgekit_runtime.agent.spool import DEFAULT_MAX_BYTES, Spool
from edgekit_runtime.runtime import AVAILABLE, Runtime

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_RATE", "ErrorLog", "TelemetrySender", "device_figures"]

log = logging.getLogger("edgekit_runtime.agent")

DEFAULT_INTERVAL = 10.0
#: Messages per second a device sends at most when it has a backlog (1,000 devices: 10,000/s).
DEFAULT_RATE = 10.0
#: Messages sent and not yet acknowledged, at most.
DEFAULT_WINDOW = 20
DEFAULT_ACK_TIMEOUT = 15.0
#: One MQTT message carries up to this many bytes of queued telemetry messages (a Batch): a device
#: sends an interval's messages, or a backlog, in a few publishes instead of one each.
BATCH_BYTES = 128 << 10
#: Distinct recent error messages kept for the device message.
RECENT_ERRORS = 10


class ErrorLog(logging.Handler):
    """The last few distinct WARNING-and-worse log messages of the runtime, with their counts."""

    def __init__(self, keep: int = RECENT_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.keep = keep
        self._lock2 = threading.Lock()
        self._seen: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not fail the caller
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        text = text[:1000]
        with self._lock2:
            entry = self._seen.pop(text, None) or [0, 0.0]
            entry[0] += 1
            entry[1] = record.created
            self._seen[text] = entry
            while len(self._seen) > self.keep:
                self._seen.popitem(last=False)

    def recent(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock2:
            return [{"message": m, "count": int(c), "last": t} for m, (c, t) in reversed(self._seen.items())]


def device_figures(store: Path | None) -> dict[str, Any]:
    """CPU, memory, disk, temperature and uptime as the OS shows them (None where it does not)."""
    out: dict[str, Any] = {}
    try:
        import psutil
    except ImportError:  # pragma: no cover - a runtime dependency; without it, only what os gives
        psutil = None
    if psutil is not None:
        out["cpu_percent"] = psutil.cpu_percent(None)  # since the previous call: the interval
        vm = psutil.virtual_memory()
        out["memory_used_bytes"] = int(vm.total - vm.available)
        out["memory_total_bytes"] = int(vm.total)
        out["process_rss_bytes"] = int(psutil.Process().memory_info().rss)
        out["uptime_s"] = round(time.time() - psutil.boot_time(), 1)
        temps = getattr(psutil, "sensors_temperatures", None)
        try:
            readings = [t.current for ts in (temps() if temps else {}).values() for t in ts if t.current]
        except (OSError, RuntimeError):
            readings = []
        out["temperature_c"] = max(readings) if readings else None
    where = store if store is not None and store.exists() else Path.cwd()
    try:
        du = shutil.disk_usage(where)
        out["disk_free_bytes"], out["disk_total_bytes"] = int(du.free), int(du.total)
    except OSError:
        pass
    return out


class TelemetrySender:
    """Collects, queues and sends one device's telemetry.

    Keyword arguments:
        interval: seconds between two collections (``--telemetry-interval``).
        max_bytes: the queue's bound (``--telemetry-queue-bytes``); past it the oldest are dropped.
        rate, window, ack_timeout: pacing (module docstring).
        agent_state: what the agent is doing, for the device message.
        store: the model store, whose file system's free space is reported.
    """

    def __init__(
        self,
        runtime: Runtime,
        link: Link,
        topics: Topics,
        spool_path: Path,
        *,
        interval: float = DEFAULT_INTERVAL,
        max_bytes: int = DEFAULT_MAX_BYTES,
        rate: float = DEFAULT_RATE,
        window: int = DEFAULT_WINDOW,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        agent_state: Callable[[], str] = lambda: "",
        store: Path | None = None,
        errors: ErrorLog | None = None,
    ) -> None:
        self.runtime = runtime
        self.link = link
        self.topics = topics
        self.interval = interval
        self.rate = rate
        self.window = window
        self.ack_timeout = ack_timeout
        self.agent_state = agent_state
        self.store = store
        self.errors = errors or ErrorLog()
        self.spool = Spool(spool_path, max_bytes=max_bytes)
        self.sent = 0
        self.publishes = 0
        self.acked = 0
        self.bad_acks = 0
        self._acks: queue.Queue[list[int]] = queue.Queue()
        self._restart = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._inflight: dict[int, float] = {}
        self._cursor = 0
        self._tokens = float(window)
        self._last_fill = time.monotonic()
        self._last_collect = time.time()
        self._thread: threading.Thread | None = None
        device_figures(store)  # psutil's cpu_percent measures from its previous call: prime it
        link.subscribe(topics.acks, self.on_ack)

    # -- threads ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgekit-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Collect what the last interval holds (so a clean stop loses nothing), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.spool.close()

    def on_ack(self, topic: str, payload: bytes) -> None:
        """paho's thread: decode and hand over."""
        try:
            ack = decode(Ack, payload, topic)
        except ProtocolError as e:
            self.bad_acks += 1
            log.warning("ignored a telemetry ack: %s", e.message)
            return
        self._acks.put(ack.seqs)
        self._wake.set()

    def on_connect(self) -> None:
        """After every (re)connect: send again from the oldest unacknowledged message."""
        self._restart.set()
        self._wake.set()

    def _run(self) -> None:
        next_collect = time.monotonic() + self.interval
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            try:
                if now >= next_collect or stopping:
                    self.collect()
                    next_collect = max(next_collect + self.interval, now + self.interval / 10)
                self._take_acks()
                if not stopping and self.link.connected:
                    self._send(time.monotonic())
            except Exception:  # one bad interval must not end telemetry
                log.exception("telemetry: an interval failed")
            if stopping:
                return
            self._wake.wait(min(0.25, max(0.01, next_collect - time.monotonic())))
            self._wake.clear()

    # -- collecting -------------------------------------------------------------------------------

    def collect(self, now: float | None = None) -> list[int]:
        """One interval: a message per model version and one for the device, into the queue."""
        now = time.time() if now is None else now
        loaded = {(n, s.version) for n in self.runtime.models() for s in self.runtime.status(n) if s.state == AVAILABLE}
        depths = {(m, int(v)): d for m, v, d in self.runtime.queue_depths()}
        bodies: list[dict[str, Any]] = []
        for w in self.runtime.metrics.windows():
            fig = w.take(now)
            if (w.model, w.version) not in loaded:
                self.runtime.metrics.drop_window(w.model, w.version)
                if not fig["requests"]:
                    continue  # it left the runtime and did nothing since the last interval
            fig["queue_depth"] = int(depths.get((w.model, w.version), 0))
            bodies.append({"kind": "model", "model": fig})
        stats = self.spool.stats()
        device = {
            "interval_start": self._last_collect,
            "interval_end": now,
            **device_figures(self.store),
            "runtime_version": __version__,
            "agent_state": self.agent_state(),
            "errors": self.errors.recent(),
            "queue": {"messages": stats.messages, "bytes": stats.bytes, "dropped": stats.dropped},
        }
        self._last_collect = now
        bodies.append({"kind": "device", "device": device})
        return self.spool.append([_maker(b) for b in bodies], now)

    # -- sending ----------------------------------------------------------------------------------

    def _take_acks(self) -> None:
        seqs: list[int] = []
        while True:
            try:
                seqs += self._acks.get_nowait()
            except queue.Empty:
                break
        if seqs:
            self.acked += self.spool.ack(seqs)
            for s in seqs:
                self._inflight.pop(s, None)

    def _send(self, now: float) -> None:
        if self._restart.is_set():
            self._restart.clear()
            self._inflight.clear()
            self._cursor = 0
        if self._inflight and now - min(self._inflight.values()) > self.ack_timeout:
            # the hub did not store what was sent (down, or a message was lost): from the oldest again
            self._inflight.clear()
            self._cursor = 0
        self._tokens = min(float(self.window), self._tokens + (now - self._last_fill) * self.rate)
        self._last_fill = now
        room = min(self.window - len(self._inflight), int(self._tokens))
        if room <= 0:
            return
        batch: list[bytes] = []
        size = 0
        for seq, body in self.spool.oldest(room, after=self._cursor):
            if batch and size + len(body) > BATCH_BYTES:
                self._publish(batch)
                batch, size = [], 0
            batch.append(body)
            size += len(body) + 1
            self._inflight[seq] = now
            self._cursor = seq
            self._tokens -= 1
            self.sent += 1
        if batch:
            self._publish(batch)

    def _publish(self, bodies: list[bytes]) -> None:
        """One MQTT message: a lone telemetry message as it is, several as one Batch."""
        payload = bodies[0] if len(bodies) == 1 else b'{"schema":1,"batch":[' + b",".join(bodies) + b"]}"
        self.link.publish(self.topics.telemetry, payload, qos=1)
        self.publishes += 1


def _maker(body: dict[str, Any]) -> Callable[[int], bytes]:
    def make(seq: int) -> bytes:
        return json.dumps({"schema": SCHEMA, "seq": seq, **body}, separators=(",", ":"), allow_nan=False).encode()

    return make
