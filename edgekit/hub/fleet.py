"""The hub's side of the fleet: devices registered from their MQTT presence and reports, the desired
state per device (kept in the database, published retained), the artifacts served in chunks, and
the rollouts driven by the engine in ``rollout.py``.

One worker thread owns all of it. paho's callbacks only decode and enqueue (the chunk requests
are the exception: they are answered at once from the artifact files, with no database access);
the HTTP API's deploy, pause, resume and cancel are queued to the worker too and wait for their
answer, so rollouts change in one thread and in one order. The worker takes every event waiting
and handles them in one database transaction: a thousand devices reporting at once is a few
commits, not a thousand fsyncs. The desired messages are published after their transaction
committed: the database is the truth, the retained messages a copy, republished whole whenever
the hub (re)connects to the broker and per device when a device comes back online.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgekit.hub.artifacts import Artifacts
from edgekit.hub.errors import ConflictError
from edgekit.hub.rollout import FINISHED, Action, DeviceRun, Rollout, RolloutSpec, Target, parse_waves
from edgekit.hub.store import ACTIVE_ROLLOUT_STATES, DeviceRecord, Store, Tx
from edgekit_runtime.agent.link import BrokerAddress, Link
from edgekit_runtime.agent.protocol import (
    DEFAULT_CHUNK,
    Artifact,
    ChunkRequest,
    Desired,
    DesiredModel,
    Presence,
    ProtocolError,
    Reported,
    check_prefix,
    decode,
    encode,
    encode_chunk,
)
from edgekit_runtime.errors import EdgekitError, InvalidInputError, NotFoundError, UnavailableError

__all__ = ["DeployRequest", "Fleet", "parse_duration", "select_devices"]

log = logging.getLogger("edgekit.hub")

#: Events the worker takes into one transaction at most.
BATCH = 500
#: A chunk sent to a device is not sent again within this many seconds (a device re-asks after 3 s
#: without progress, so a real loss is still answered; a duplicate request is not, which would
#: only double the broker's load when it is busiest), nor while the copy sent before is still
#: waiting in the hub's outgoing queue, unless that is older than STALE_S.
RESEND_AFTER_S = 2.0
STALE_S = 60.0
#: Aborted rollouts stay in memory this long, to put back devices that finish switching late.
ABORTED_KEPT_S = 86400.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float | int, what: str) -> float:
    """``30s``, ``5m``, ``1h``, ``500ms``, ``2d`` or a number of seconds -> seconds."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        unit = next((u for u in ("ms", "s", "m", "h", "d") if text.endswith(u)), "")
        number = text[: -len(unit)] if unit else text
        try:
            seconds = float(number) * _UNITS.get(unit, 1.0)
        except ValueError:
            msg = f"{what} {value!r}: give a duration such as 30s, 5m, 1h or a number of seconds"
            raise InvalidInputError(msg) from None
    if not seconds >= 0 or seconds > 30 * 86400:
        msg = f"{what} {value!r}: a duration from 0 to 30 days"
        raise InvalidInputError(msg)
    return seconds


def select_devices(selector: str, devices: list[DeviceRecord]) -> list[DeviceRecord]:
    """``all``; ``id1,id2`` (every id must be registered); ``KEY=VALUE[,KEY=VALUE]`` over labels
    (all must match)."""
    text = selector.strip()
    if not text:
        msg = "--to is empty: give all, a comma-separated list of device ids, or KEY=VALUE over labels"
        raise InvalidInputError(msg)
    if text == "all":
        return list(devices)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("=" in p for p in parts):
        wanted = dict(p.split("=", 1) for p in parts)
        return [d for d in devices if all(d.labels.get(k) == v for k, v in wanted.items())]
    if any("=" in p for p in parts):
        msg = f"--to {selector!r}: give either device ids or KEY=VALUE labels, not both"
        raise InvalidInputError(msg)
    known = {d.id: d for d in devices}
    unknown = [p for p in parts if p not in known]
    if unknown:
        msg = f"--to: no device {', '.join(map(repr, unknown))} has registered; `edgekit devices` lists those that did"
        raise NotFoundError(msg)
    return [known[p] for p in dict.fromkeys(parts)]


@dataclass(frozen=True)
class DeployRequest:
    """What `edgekit deploy` and `edgekit rollback` ask for (the API's JSON body, checked)."""

    model: str
    version: int | None  # None: a rollback, each device to its previous version
    to: str = "all"
    waves: str = "100%"
    abort_failure_rate: float = 20.0  # percent
    abort_min_devices: int = 1
    device_timeout: float = 600.0
    retries: int = 1
    health_window: float = 0.0
    shadow: float = 0.0
    min_agreement: float | None = None  # percent
    allow_signature_change: bool = False

    @classmethod
    def from_json(cls, body: Any, *, rollback: bool = False) -> DeployRequest:
        if not isinstance(body, dict):
            msg = 'give a JSON object: {"model": "NAME", "version": N, "to": "all", ...}'
            raise InvalidInputError(msg)
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(body) - known)
        if extra:
            msg = f"unknown field(s) {', '.join(extra)}; known: {', '.join(sorted(known))}"
            raise InvalidInputError(msg)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidInputError('"model" must be the model\'s name')
        version = body.get("version")
        if rollback:
            version = None
        elif not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidInputError('"version" must be a version number (1 or more)')

        def number(key: str, default: float, lo: float, hi: float) -> float:
            v = body.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                msg = f'"{key}" must be a number from {lo:g} to {hi:g}, not {v!r}'
                raise InvalidInputError(msg)
            return float(v)

        def duration(key: str, default: float) -> float:
            return parse_duration(body.get(key, default), f'"{key}"')

        to = body.get("to", "all")
        waves = body.get("waves", "100%")
        if not isinstance(to, str) or not isinstance(waves, str):
            raise InvalidInputError('"to" and "waves" must be strings, e.g. "all" and "1,10%,100%"')
        parse_waves(waves)
        agreement = body.get("min_agreement")
        return cls(
            model=model,
            version=version,
            to=to,
            waves=waves,
            abort_failure_rate=number("abort_failure_rate", 20.0, 0, 100),
            abort_min_devices=int(number("abort_min_devices", 1, 1, 1e6)),
            device_timeout=duration("device_timeout", 600.0) or 600.0,
            retries=int(number("retries", 1, 0, 100)),
            health_window=duration("health_window", 0.0),
            shadow=duration("shadow", 0.0),
            min_agreement=None if agreement is None else number("min_agreement", 0, 0, 100),
            allow_signature_change=bool(body.get("allow_signature_change", False)),
        )


@dataclass
class _Batch:
    """What one transaction of the worker changed: devices whose desired state to publish, rollouts
    to write back."""

    tx: Tx
    now: float
    publish: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)


@dataclass
class Stats:
    """Counters for `edgekit hub serve`'s log and the OTA benchmark."""

    chunks_sent: int = 0
    chunk_bytes_sent: int = 0
    chunk_refusals: int = 0
    chunk_duplicates_skipped: int = 0
    protocol_errors: int = 0
    reports: int = 0
    transactions: int = 0


class Fleet:
    """The hub's fleet side. ``start()`` runs the worker (and the MQTT link when there is a
    broker); the API calls ``deploy`` (a rollback too), ``control``, ``status``, ``summaries``."""

    def __init__(
        self,
        store: Store,
        artifacts: Artifacts,
        *,
        broker: BrokerAddress | None = None,
        prefix: str = "edgekit",
        link_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.prefix = check_prefix(prefix)
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.chunk_size = chunk_size
        self.stats = Stats()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.desired: dict[str, Desired] = {}
        self.rollouts: dict[str, Rollout] = {}
        self._saved: dict[str, dict[str, tuple[Any, ...]]] = {}  # rollout -> device -> run as last written
        self._saved_head: dict[str, tuple[str, str, int]] = {}
        self._allowed: dict[str, dict[str, tuple[str, int]]] = {}  # device -> artifact sha256 -> its file, size
        self._online: dict[str, bool] = {}
        self._last_seq: dict[str, int] = {}
        self._has_shadow: dict[str, bool] = {}  # devices whose stored report holds a shadow result
        # (device, artifact, index) -> when sent, paho's message info (None: not sent after all)
        self._sent: dict[tuple[str, str, int], tuple[float, Any]] = {}
        self._sent_lock = threading.Lock()
        self._load()
        self.link: Link | None = None
        if broker is not None:
            self.link = Link(
                broker,
                client_id=f"edgekit-hub-{secrets.token_hex(4)}",
                on_connect=lambda: self._events.put(("connected", None)),
                max_inflight=1000,
                **(link_options or {}),
            )
            base = f"{self.prefix}/devices/+"
            self.link.subscribe(f"{base}/presence", self._on_presence)
            self.link.subscribe(f"{base}/reported", self._on_reported)
            self.link.subscribe(f"{base}/chunks/get", self._on_chunks_get)

    # -- life -----------------------------------------------------------------------------------

    def _load(self) -> None:
        """The desired states and the rollouts still in play, from the database."""
        now = self.clock()
        with self.store.begin() as tx:
            states = tx.desired_states()
            rows = tx.rollout_rows(states=(*ACTIVE_ROLLOUT_STATES, "aborted"))  # not the finished history
        self.desired = {d: Desired(generation=g, models=models) for d, (g, models) in states.items()}
        for device in self.desired:
            self._allow(device)
        self.rollouts.clear()
        for row in rows:
            if row["state"] in ACTIVE_ROLLOUT_STATES or now - row["updated_at"] < ABORTED_KEPT_S:
                r = _rollout_from_row(row)
                self.rollouts[r.spec.id] = r
                self._remember(r)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="edgekit-hub-fleet", daemon=True)
        self._thread.start()
        if self.link is not None:
            self.link.start()

    def stop(self) -> None:
        self._stop.set()
        self._events.put(("stop", None))
        if self._thread is not None:
            self._thread.join(30)
        if self.link is not None:
            self.link.stop()

    # -- MQTT callbacks (paho's thread) ----------------------------------------------------------

    def _device_of(self, topic: str) -> str:
        return topic[len(self.prefix) + len("/devices/") :].split("/", 1)[0]

    def _on_presence(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            presence = decode(Presence, payload, topic)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        self._events.put(("presence", (self._device_of(topic), presence)))

    def _on_reported(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            reported = decode(Reported, payload, topic)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        self._events.put(("reported", (self._device_of(topic), reported)))

    def _protocol_error(self, e: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        log.warning("ignored a device message: %s", e.message)

    def _on_chunks_get(self, topic: str, payload: bytes) -> None:
        """Answer a device's window of chunk requests from the artifact file it is meant to fetch."""
        device = self._device_of(topic)
        try:
            req = decode(ChunkRequest, payload, topic)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        assert self.link is not None
        out = f"{self.prefix}/devices/{device}/chunks/data"
        allowed = self._allowed.get(device, {}).get(req.artifact)
        if allowed is None:
            self.stats.chunk_refusals += 1
            why = f"artifact {req.artifact[:12]} is not in device {device}'s desired state"
            self.link.publish(out, encode_chunk(req.artifact, req.chunks[0], b"", error=why))
            return
        path, pushed = allowed
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            self.stats.chunk_refusals += 1
            why = f"the hub cannot read artifact {req.artifact[:12]} ({e.strerror}); push the bundle again"
            self.link.publish(out, encode_chunk(req.artifact, req.chunks[0], b"", error=why))
            return
        try:
            size = os.fstat(fd).st_size
            if size != pushed:  # changed on the hub's disk after the push: no device gets any of it
                self.stats.chunk_refusals += 1
                why = (
                    f"artifact {req.artifact[:12]} on the hub's disk is {size} bytes, not the {pushed} pushed: "
                    "it changed after the push; push the bundle again"
                )
                self.link.publish(out, encode_chunk(req.artifact, req.chunks[0], b"", error=why))
                return
            last = -(-size // req.chunk_size) - 1
            for index in self._not_just_sent(device, req):
                if not 0 <= index <= last:
                    frame = encode_chunk(req.artifact, index, b"", error=f"chunk {index} is outside 0..{last}")
                else:
                    data = os.pread(fd, req.chunk_size, index * req.chunk_size)
                    frame = encode_chunk(req.artifact, index, data)
                    self.stats.chunks_sent += 1
                    self.stats.chunk_bytes_sent += len(data)
                info = self.link.publish(out, frame)
                with self._sent_lock:
                    self._sent[(device, req.artifact, index)] = (time.monotonic(), info)
        finally:
            os.close(fd)

    def _not_just_sent(self, device: str, req: ChunkRequest) -> list[int]:
        """The requested chunk indexes to send: not sent to this device in the last RESEND_AFTER_S
        seconds, and not still queued from an earlier send (backpressure: at most one copy of a
        chunk per device waits in the hub's queue, whatever the device re-asks)."""
        now = time.monotonic()
        out = []
        with self._sent_lock:
            if len(self._sent) > 200_000:  # forget what is long past
                self._sent = {k: v for k, v in self._sent.items() if now - v[0] < STALE_S}
            for index in dict.fromkeys(req.chunks):
                at, info = self._sent.get((device, req.artifact, index), (-STALE_S, None))
                queued = info is not None and not info.is_published()
                if now - at < RESEND_AFTER_S or (queued and now - at < STALE_S):
                    self.stats.chunk_duplicates_skipped += 1
                else:
                    out.append(index)
        return out

    # -- the API's calls (any thread) -----------------------------------------------------------

    def call(self, fn: Callable[[_Batch], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` in the worker, in its own transaction, and return its result."""
        if self._thread is None or not self._thread.is_alive():
            msg = "the hub's fleet worker is not running"
            raise UnavailableError(msg)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._events.put(("call", (fn, future)))
        return future.result(timeout)

    def deploy(self, request: DeployRequest) -> dict[str, Any]:
        """Start a rollout (a rollback when ``request.version`` is None); its status document."""
        return self.status(self.call(lambda b: self._deploy(b, request)))

    def control(self, rollout_id: str, action: str) -> dict[str, Any]:
        return dict(self.call(lambda b: self._control(b, rollout_id, action)))

    def status(self, rollout_id: str) -> dict[str, Any]:
        with self.store.read() as tx:
            rows = tx.rollout_rows([rollout_id])
            if not rows:
                msg = f"no rollout {rollout_id!r}; `edgekit rollout list` shows them"
                raise NotFoundError(msg)
            return rollout_json(rows[0], _progress(tx, rows[0]))

    def summaries(self) -> list[dict[str, Any]]:
        """Every rollout, newest first, without the per-device list."""
        with self.store.read() as tx:
            return [rollout_json(row, {}, devices=False) for row in tx.rollout_rows()]

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        next_tick = time.monotonic() + self.tick_seconds
        while not self._stop.is_set():
            wait = max(0.0, next_tick - time.monotonic())
            try:
                events = [self._events.get(timeout=wait)]
            except queue.Empty:
                events = []
            while len(events) < BATCH:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            if any(kind == "stop" for kind, _ in events):
                return
            tick = time.monotonic() >= next_tick
            if tick:
                next_tick = time.monotonic() + self.tick_seconds
            try:
                self._handle(events, tick=tick)
            except Exception:  # the database failed under us: start again from what it holds
                log.exception("hub: handling %d event(s) failed; reloading the fleet state", len(events))
                with contextlib.suppress(Exception):
                    self._load()

    def _handle(self, events: list[tuple[str, Any]], *, tick: bool) -> None:
        plain = [e for e in events if e[0] != "call"]
        if plain or tick:
            self._transaction(lambda b: self._apply(b, plain, tick))
        for kind, item in events:
            if kind == "call":
                fn, future = item
                try:
                    future.set_result(self._transaction(fn))
                except EdgekitError as e:
                    self._load()  # what fn changed in memory before it refused is dropped
                    future.set_exception(e)
                except Exception as e:
                    self._load()
                    future.set_exception(e)
                    log.exception("hub: a fleet call failed")

    def _transaction(self, fn: Callable[[_Batch], Any]) -> Any:
        with self.store.begin() as tx:
            batch = _Batch(tx, self.clock())
            result = fn(batch)
            self._write_back(batch)
        self.stats.transactions += 1
        for device in sorted(batch.publish):
            self._publish_desired(device)
        return result

    def _apply(self, b: _Batch, events: list[tuple[str, Any]], tick: bool) -> None:
        republish_all = False
        for kind, item in events:
            if kind == "presence":
                self._presence(b, *item)
            elif kind == "reported":
                self._reported(b, *item)
            elif kind == "connected":
                republish_all = True
        if tick:
            for r in list(self.rollouts.values()):
                if r.state == "running":
                    before = _states(r)
                    self._act(b, r, r.tick(b.now))
                    if before != _states(r):
                        b.touched.add(r.spec.id)
                        self._settle(b, r, before)
        if republish_all:
            b.publish.update(self.desired)

    def _presence(self, b: _Batch, device: str, p: Presence) -> None:
        if p.device and p.device != device:
            self.stats.protocol_errors += 1
            log.warning("presence on device %s's topic names device %s: ignored", device, p.device)
            return
        was = self._online.get(device, False)
        self._online[device] = p.online
        b.tx.register_device(device, profile=p.profile, labels=p.labels, online=p.online, now=b.now)
        if p.online and not was:
            self._last_seq.pop(device, None)  # a new session: its reports count again from here
            if device in self.desired:
                b.publish.add(device)  # on a device's reconnect, its desired state again

    def _reported(self, b: _Batch, device: str, rep: Reported) -> None:
        last = self._last_seq.get(device)
        if last is not None and rep.seq <= last:
            return  # a duplicate (QoS 1) or an older copy
        self._last_seq[device] = rep.seq
        self.stats.reports += 1
        b.tx.ensure_device(device, b.now)
        for name, m in rep.models.items():
            detail: dict[str, Any] = {
                "versions": m.versions,
                "target": m.target,
                "rollout": m.rollout,
                "progress": m.progress,
                "desired_generation": rep.desired_generation,
            }
            if m.shadow is not None:
                detail["shadow"] = {**m.shadow, "rollout": m.rollout}
            else:  # the shadow check's result outlives the reports after it (the status shows it)
                known = b.tx.device(device) if self._has_shadow.get(device) else None
                stored = known.models.get(name) if known is not None else None
                if stored is not None and stored.detail.get("shadow"):
                    detail["shadow"] = stored.detail["shadow"]
            self._has_shadow[device] = "shadow" in detail or self._has_shadow.get(device, False)
            b.tx.report_model(device, name, active=m.active, state=m.state, reason=m.reason, detail=detail, now=b.now)
            for r in list(self.rollouts.values()):
                run = r.devices.get(device)
                if r.spec.model != name or run is None:
                    continue
                if m.state not in ("serving", "pending") and m.rollout != r.spec.id:
                    continue  # about another rollout's attempt, not this one's
                before = run.state
                self._act(b, r, r.report(device, m.state, m.reason, m.active, b.now))
                b.touched.add(r.spec.id)
                # only this device can have failed here (an abort marks the others reverted)
                self._settle(b, r, {device: before}, only=run)

    def _settle(self, b: _Batch, r: Rollout, before: dict[str, str], only: DeviceRun | None = None) -> None:
        """A device that failed or timed out in this rollout is told to stay on its previous
        version, so its desired state says what it runs and a later deploy starts afresh."""
        runs = [(only.device, only)] if only is not None else list(r.devices.items())
        for device, run in runs:
            if run.state == before.get(device) or run.reverted or run.state not in ("failed", "rolled_back"):
                continue
            if run.previous is not None:
                self._want(b, r, Action(device, run.previous, revert=True))

    def _act(self, b: _Batch, r: Rollout, actions: list[Action]) -> None:
        for action in actions:
            self._want(b, r, action)

    def _want(self, b: _Batch, r: Rollout, action: Action) -> None:
        """Change one device's desired state for the rollout's model."""
        current = self.desired.get(action.device) or Desired(generation=0)
        models = dict(current.models)
        if action.version is None:
            models.pop(r.spec.model, None)
        else:
            device = b.tx.device(action.device)
            profile = device.profile if device is not None else ""
            bundle = b.tx.bundle(r.spec.model, action.version, profile)
            artifact = None
            if bundle is not None:
                artifact = Artifact(sha256=bundle.sha256, size=bundle.size_bytes, chunk_size=self.chunk_size)
            forward = not action.revert and r.spec.kind == "deploy"
            models[r.spec.model] = DesiredModel(
                version=action.version,
                artifact=artifact,
                rollout=r.spec.id,
                allow_signature_change=r.spec.allow_signature_change or not forward,
                health_window_s=r.spec.health_window if forward else 0.0,
                shadow_s=r.spec.shadow if forward else 0.0,
                min_agreement=r.spec.min_agreement if forward else None,
            )
        desired = Desired(generation=current.generation + 1, models=models)
        self.desired[action.device] = desired
        b.tx.save_desired(action.device, desired.generation, desired.model_dump(mode="json")["models"], b.now)
        self._allow(action.device)
        b.publish.add(action.device)

    def _allow(self, device: str) -> None:
        d = self.desired.get(device)
        allowed = {}
        for m in d.models.values() if d is not None else ():
            if m.artifact is not None:
                allowed[m.artifact.sha256] = (str(self.artifacts.path(m.artifact.sha256)), m.artifact.size)
        self._allowed[device] = allowed

    def _publish_desired(self, device: str) -> None:
        desired = self.desired.get(device)
        if self.link is None or desired is None:
            return
        self.link.publish(f"{self.prefix}/devices/{device}/desired", encode(desired), retain=True)

    # -- rollouts --------------------------------------------------------------------------------

    def _deploy(self, b: _Batch, req: DeployRequest) -> str:
        tx = b.tx
        active = tx.rollout_rows(states=ACTIVE_ROLLOUT_STATES)
        clash = [row["id"] for row in active if row["model"] == req.model]
        if clash:
            state = next(r["state"] for r in active if r["id"] == clash[0])
            msg = (
                f"rollout {clash[0]} of {req.model} is still {state}: "
                f"wait for it, or `edgekit rollout cancel {clash[0]}` first"
            )
            raise ConflictError(msg)
        bundles = tx.bundles(req.model, req.version)
        if req.version is not None and not bundles:
            pushed = sorted({x.version for x in tx.bundles(req.model)})
            have = ", ".join(f"v{v}" for v in pushed) or "none"
            msg = (
                f"no bundle of {req.model} v{req.version} on the hub (pushed versions: {have}); `edgekit push` it first"
            )
            raise NotFoundError(msg)
        chosen = select_devices(req.to, tx.devices())
        if not chosen:
            msg = f"--to {req.to!r} matches no registered device; `edgekit devices` lists them and their labels"
            raise InvalidInputError(msg)
        kind = "deploy" if req.version is not None else "rollback"
        spec = RolloutSpec(
            id=f"r-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(b.now))}-{secrets.token_hex(2)}",
            model=req.model,
            version=req.version or 0,
            waves=parse_waves(req.waves),
            abort_failure_rate=req.abort_failure_rate / 100,
            abort_min_devices=req.abort_min_devices,
            device_timeout=req.device_timeout,
            retries=req.retries,
            kind=kind,
            selector=req.to,
            health_window=req.health_window,
            shadow=req.shadow,
            min_agreement=None if req.min_agreement is None else req.min_agreement / 100,
            allow_signature_change=req.allow_signature_change,
        )
        targets = []
        for d in chosen:
            m = d.models.get(req.model)
            act = m.active if m is not None else None
            if kind == "deploy":
                targets.append(Target(d.id, d.profile, act))
                continue
            prev = m.previous if m is not None else None
            skip = "" if prev is not None else f"no version of {req.model} known to have run before the active one"
            targets.append(Target(d.id, d.profile, act, target=prev, skip=skip))
        r = Rollout(spec)
        tx.add_rollout(spec.id, spec.model, spec.version, r.state, asdict(spec))
        actions = r.plan(targets, {x.profile for x in bundles}, b.now)
        tx.save_rollout_devices(spec.id, [_run_row(run) for run in r.devices.values()], insert=True)
        self._remember(r)
        self._saved_head[spec.id] = ("", "", -1)  # the row holds the state before planning: write it
        self.rollouts[spec.id] = r
        self._act(b, r, actions)
        b.touched.add(spec.id)
        log.info("rollout %s: %s %s to %d device(s)", spec.id, kind, req.model, len(r.devices))
        return spec.id

    def _control(self, b: _Batch, rollout_id: str, action: str) -> dict[str, Any]:
        r = self.rollouts.get(rollout_id)
        if r is None:
            rows = b.tx.rollout_rows([rollout_id])
            if not rows:
                msg = f"no rollout {rollout_id!r}; `edgekit rollout list` shows them"
                raise NotFoundError(msg)
            msg = f"rollout {rollout_id} is {rows[0]['state']}: only a running or paused rollout can be {action}d"
            raise ConflictError(msg)
        allowed = {"pause": ("running",), "resume": ("paused",), "cancel": ("running", "paused")}[action]
        if r.state not in allowed:
            msg = f"rollout {rollout_id} is {r.state}: {action} needs it {' or '.join(allowed)}"
            raise ConflictError(msg)
        before = _states(r)
        if action == "pause":
            r.pause()
        elif action == "resume":
            self._act(b, r, r.resume(b.now))
        else:
            r.cancel()
        self._settle(b, r, before)
        b.touched.add(rollout_id)
        return {"id": rollout_id, "state": r.state}

    def _remember(self, r: Rollout) -> None:
        """Note the rollout as the database now holds it (to write only what changes later)."""
        self._saved[r.spec.id] = {d: _run_key(run) for d, run in r.devices.items()}
        self._saved_head[r.spec.id] = (r.state, r.reason, r.wave)

    def _write_back(self, b: _Batch) -> None:
        for rid in sorted(b.touched):
            r = self.rollouts.get(rid)
            if r is None:
                continue
            saved = self._saved.get(rid, {})
            changed = [_run_row(run) for d, run in r.devices.items() if _run_key(run) != saved.get(d)]
            if changed:
                b.tx.save_rollout_devices(rid, changed)
            head = (r.state, r.reason, r.wave)
            if head != self._saved_head.get(rid):
                b.tx.save_rollout(rid, state=r.state, reason=r.reason, wave=r.wave, now=b.now)
            self._remember(r)
            if r.state in ("completed", "cancelled"):
                del self.rollouts[rid]
                log.info("rollout %s %s", rid, r.state)


def _states(r: Rollout) -> dict[str, str]:
    return {d: run.state for d, run in r.devices.items()} | {"": r.state}


def _run_row(run: DeviceRun) -> dict[str, Any]:
    return asdict(run)


def _run_key(run: DeviceRun) -> tuple[Any, ...]:
    """The run's fields as a tuple: what write-back compares (asdict over a thousand devices per
    batch was most of the worker's time in the 1,000-device benchmark)."""
    return tuple(run.__dict__.values())


def _rollout_from_row(row: dict[str, Any]) -> Rollout:
    spec = RolloutSpec(**row["spec"])
    runs = {}
    for d in row["devices"]:
        values = {k: d[k] for k in DeviceRun.__dataclass_fields__ if k != "device" and k in d}
        runs[d["device_id"]] = DeviceRun(device=d["device_id"], **values)
    r = Rollout(spec, state=row["state"], devices=runs)
    r.reason = row.get("reason", "")
    r.wave = row.get("wave", r.wave)
    return r


def _progress(tx: Tx, row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per device of the rollout, what it reported last about the model (download progress)."""
    ids = [d["device_id"] for d in row["devices"]]
    out = {}
    for dev in tx.devices(ids):
        m = dev.models.get(row["model"])
        if m is not None:
            out[dev.id] = {
                "active": m.active,
                "progress": m.detail.get("progress"),
                "shadow": m.detail.get("shadow"),
                "online": dev.online,
            }
    return out


def rollout_json(row: dict[str, Any], progress: dict[str, dict[str, Any]], *, devices: bool = True) -> dict[str, Any]:
    """The status document (`edgekit rollout status --json`)."""
    from edgekit.hub.registry import iso_time

    spec = row["spec"]
    runs = row.get("devices", [])
    counts: dict[str, int] = {}
    for d in runs:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    finished = sum(counts.get(s, 0) for s in ("succeeded", "failed", "rolled_back"))
    failed = sum(counts.get(s, 0) for s in ("failed", "rolled_back"))
    out: dict[str, Any] = {
        "id": row["id"],
        "kind": spec.get("kind", "deploy"),
        "model": row["model"],
        "version": row["version"] if spec.get("kind", "deploy") == "deploy" else None,
        "state": row["state"],
        "reason": row.get("reason", ""),
        "wave": row.get("wave", 0),
        "waves": spec.get("waves"),
        "selector": spec.get("selector", "all"),
        "created": iso_time(row["created_at"]),
        "updated": iso_time(row["updated_at"]),
        "counts": counts,
        "failure_rate": round(failed / finished, 4) if finished else 0.0,
        "settings": {
            k: spec.get(k)
            for k in (
                "abort_failure_rate",
                "abort_min_devices",
                "device_timeout",
                "retries",
                "health_window",
                "shadow",
                "min_agreement",
                "allow_signature_change",
            )
        },
    }
    if devices:
        shown = []
        for d in runs:
            device = d.get("device_id") or d.get("device")
            entry: dict[str, Any] = {
                "device": device,
                "wave": d["wave"],
                "state": d["state"],
                "reason": d["reason"],
                "previous": d["previous"],
                "target": d["target"],
                "attempts": d["attempts"],
            }
            seen = progress.get(device or "")
            if seen is not None:
                entry["active"] = seen["active"]
                entry["online"] = seen["online"]
                if seen["progress"] and d["state"] not in FINISHED:
                    entry["progress"] = seen["progress"]
                if seen["shadow"] and seen["shadow"].get("rollout") == row["id"]:
                    entry["shadow"] = {k: v for k, v in seen["shadow"].items() if k != "rollout"}
            shown.append(entry)
        out["devices"] = shown
    return out
