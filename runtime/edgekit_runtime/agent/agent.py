"""The device agent: the serving process's presence and reported state on MQTT, the hub's desired
state received, checked and kept on disk, and the updates it asks for (``update.py``).

Built: identity (device id, profile, labels), retained presence with a last will, retained
reported state republished on every reconnect, desired state decoded, de-duplicated by generation
and persisted, and per model an update job: chunked download (resumable across restarts),
verification, install, golden-sample test by loading it, a shadow check on mirrored live traffic,
switch or refusal, a health window after the switch, and going back to an older version on request
(from disk when it is still there).

Threads: paho's callbacks only decode and enqueue; one worker thread runs the jobs (downloads,
installs, model loads), so a slow install never stalls the MQTT connection's keep-alive.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgekit_runtime import __version__
from edgekit_runtime.agent.link import BrokerAddress, Link
from edgekit_runtime.agent.protocol import (
    ChunkRequest,
    Desired,
    Presence,
    ProtocolError,
    Reported,
    ReportedModel,
    Topics,
    decode,
    decode_chunk,
    encode,
)
from edgekit_runtime.agent.telemetry import DEFAULT_INTERVAL, DEFAULT_RATE, ErrorLog, TelemetrySender
from edgekit_runtime.agent.update import ACTIVE_STATES, FAILED, ROLLED_BACK, Job, Updater
from edgekit_runtime.bundle import fsync_dir
from edgekit_runtime.runtime import AVAILABLE, Runtime
from edgekit_runtime.signing import PublicKey

__all__ = ["Agent", "AgentState"]

log = logging.getLogger("edgekit_runtime.agent")

NO_STORE = "this device serves no store directory it could install into (give a STORE to serve)"


class AgentState:
    """What the agent must remember across restarts (``STATE_DIR/agent.json``, written atomically):
    the last desired state accepted and the reported sequence number."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "agent.json"
        self.seq = 0
        self.desired: Desired | None = None
        self.jobs: dict[str, Job] = {}
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("agent state %s unreadable (%s); starting afresh", self.path, e)
            return
        self.seq = int(raw.get("seq", 0))
        self.jobs = Updater.restore(raw.get("jobs") or {})
        if raw.get("desired") is not None:
            try:
                self.desired = Desired.model_validate(raw["desired"])
            except ValueError:
                log.warning("agent state %s: desired state unreadable; waiting for the hub's", self.path)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "seq": self.seq,
            "desired": self.desired.model_dump(mode="json", by_alias=True) if self.desired else None,
            "jobs": {m: j.to_dict() for m, j in self.jobs.items()},
        }
        fd, tmp = tempfile.mkstemp(prefix=".agent.", suffix=".part", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).replace(self.path)
            fsync_dir(self.folder)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Agent:
    """Presence, reported and desired state of one device serving ``runtime``.

    Keyword arguments:
        device_id, profile, labels: the device's identity, as the hub shows it.
        state_dir: where the agent keeps what survives a restart.
        prefix: the topic prefix shared with the hub.
    """

    def __init__(
        self,
        runtime: Runtime,
        broker: BrokerAddress,
        *,
        device_id: str,
        state_dir: Path,
        profile: str = "",
        labels: dict[str, str] | None = None,
        prefix: str = "edgekit",
        link_options: dict[str, Any] | None = None,
        store: Path | None = None,
        trusted_keys: list[PublicKey] | None = None,
        telemetry_interval: float = DEFAULT_INTERVAL,
        telemetry_queue_bytes: int | None = None,
        telemetry_rate: float = DEFAULT_RATE,
    ) -> None:
        self.runtime = runtime
        self.topics = Topics(prefix, device_id)
        self.device_id = device_id
        self.profile = profile
        self.labels = dict(labels or {})
        self.state = AgentState(state_dir)
        self.updater: Updater | None = None
        if store is not None:
            downloads = state_dir / "downloads"
            self.updater = Updater(
                runtime, store, downloads, profile=profile, trusted_keys=trusted_keys, jobs=self.state.jobs
            )
        self.protocol_errors = 0
        self._lock = threading.Lock()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._last_report = 0.0
        # Desired state that arrives before the runtime's first load (a retained message at start) is
        # acted on once it is loaded: what serves decides between an update and going back.
        self._loaded = False
        offline = encode(Presence(online=False, device=device_id, profile=profile, labels=self.labels))
        self.link = Link(
            broker,
            client_id=device_id,
            will=(self.topics.presence, offline),
            on_connect=self._announce,
            **(link_options or {}),
        )
        self.link.subscribe(self.topics.desired, self._on_desired)
        self.link.subscribe(self.topics.chunks_data, self._on_chunk)
        self.errors = ErrorLog()
        self.telemetry: TelemetrySender | None = None
        if telemetry_interval > 0:
            options: dict[str, Any] = {"interval": telemetry_interval, "rate": telemetry_rate}
            if telemetry_queue_bytes is not None:
                options["max_bytes"] = telemetry_queue_bytes
            self.telemetry = TelemetrySender(
                runtime,
                self.link,
                self.topics,
                state_dir / "telemetry.db",
                agent_state=self.activity,
                store=store,
                errors=self.errors,
                **options,
            )

    def start(self) -> None:
        logging.getLogger("edgekit_runtime").addHandler(self.errors)
        self._worker = threading.Thread(target=self._work, name="edgekit-agent", daemon=True)
        self._worker.start()
        if self.telemetry is not None:
            self.telemetry.start()
        self.link.start()

    def activity(self) -> str:
        """One line of what the agent does: ``idle``, or its update jobs (``downloading digits v2``)."""
        jobs = self.updater.jobs if self.updater is not None else {}
        busy = [f"{j.state} {m} v{j.version}" for m, j in sorted(jobs.items()) if j.state in ACTIVE_STATES]
        return ", ".join(busy) if busy else "idle"

    def loaded(self) -> None:
        """The runtime finished its first load: resume interrupted updates, then report."""
        self._events.put(("loaded", None))

    def stop(self) -> None:
        self._stopping.set()
        self._events.put(("stop", None))
        if self._worker is not None:
            self._worker.join(30)
        if self.telemetry is not None:
            self.telemetry.stop()
        offline = Presence(online=False, device=self.device_id, profile=self.profile, labels=self.labels)
        self.link.stop(final=(self.topics.presence, encode(offline)))
        logging.getLogger("edgekit_runtime").removeHandler(self.errors)

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                kind, item = self._events.get(timeout=1.0)
            except queue.Empty:
                kind, item = "tick", None
            if kind == "stop":
                return
            try:
                self._handle(kind, item)
            except Exception:  # one bad event must not stop the agent
                log.exception("agent: handling %s failed", kind)

    def _handle(self, kind: str, item: Any) -> None:
        up = self.updater
        requests: list[ChunkRequest] = []
        if kind == "desired":
            self._accept(item)
            if up is not None and self._loaded:
                for name, want in item.models.items():
                    requests += up.want(name, want)
            self.report()
        elif kind == "chunk" and up is not None:
            before = {m: j.state for m, j in up.jobs.items()}
            requests += up.chunk(item)
            changed = before != {m: j.state for m, j in up.jobs.items()}
            if changed or time.monotonic() - self._last_report > 1.0:  # progress, at most once a second
                self.report()
        elif kind == "tick" and up is not None:
            said = {m: (j.state, j.reason) for m, j in up.jobs.items()}
            requests += up.tick()
            if said != {m: (j.state, j.reason) for m, j in up.jobs.items()}:  # e.g. shadow progress
                self.report()
        elif kind == "loaded":
            self._loaded = True
            if up is not None:
                requests += up.resume()
                desired = self.state.desired
                for name, want in desired.models.items() if desired is not None else ():
                    job = up.jobs.get(name)
                    if job is None or job.version != want.version:  # accepted, not acted on yet
                        requests += up.want(name, want)
            self.report()
        for r in requests:
            self.link.publish(self.topics.chunks_get, encode(r))

    # -- what the device says -----------------------------------------------------------------

    def _announce(self) -> None:
        presence = Presence(
            online=True, device=self.device_id, profile=self.profile, labels=self.labels, runtime_version=__version__
        )
        self.link.publish(self.topics.presence, encode(presence), retain=True)
        self.report()
        if self.telemetry is not None:
            self.telemetry.on_connect()

    def reported(self) -> Reported:
        """This device's state now: every model's active and loaded versions, and its update jobs."""
        models: dict[str, ReportedModel] = {}
        for name in self.runtime.models():
            statuses = self.runtime.status(name)
            loaded = sorted(s.version for s in statuses if s.state == AVAILABLE)
            try:
                active: int | None = self.runtime.get(name).version
            except Exception:  # noqa: BLE001 - no version serving: say so, do not fail the report
                active = None
            failed = next((s for s in statuses if s.error_message), None)
            models[name] = ReportedModel(
                active=active,
                versions=loaded,
                state="serving" if active is not None else "failed",
                reason="" if active is not None else (failed.error_message if failed else "no version loaded"),
            )
        desired = self.state.desired
        jobs = self.updater.jobs if self.updater is not None else {}
        if desired is not None:
            for name, want in desired.models.items():
                have = models.get(name) or ReportedModel(state="pending", reason="not served here yet")
                job = jobs.get(name)
                shown = job is not None and (job.state in ACTIVE_STATES or job.state in (FAILED, ROLLED_BACK))
                if job is not None and shown and job.version == want.version:
                    have = have.model_copy(
                        update={
                            "state": job.state,
                            "reason": job.reason,
                            "target": job.version,
                            "rollout": job.rollout,
                            "progress": self.updater.progress(name) if self.updater is not None else None,
                            "shadow": job.shadow,
                        }
                    )
                elif job is not None and job.version == want.version == have.active and job.shadow is not None:
                    have = have.model_copy(update={"shadow": job.shadow, "rollout": job.rollout})
                elif have.active != want.version:
                    why = NO_STORE if self.updater is None else "waiting for the update to start"
                    have = have.model_copy(update={"state": "pending", "reason": why, "target": want.version})
                models[name] = have
        with self._lock:
            self.state.seq += 1
            seq = self.state.seq
        return Reported(seq=seq, desired_generation=desired.generation if desired else None, models=models)

    def report(self) -> None:
        reported = self.reported()
        self._last_report = time.monotonic()
        if self.updater is not None:
            self.state.jobs = self.updater.jobs
        self.state.save()
        self.link.publish(self.topics.reported, encode(reported), retain=True)

    # -- what the hub says --------------------------------------------------------------------

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            desired = decode(Desired, payload, topic)
        except ProtocolError as e:
            self.protocol_errors += 1
            log.warning("ignored a desired-state message: %s", e.message)
            return
        current = self.state.desired
        if current is not None and desired.generation <= current.generation:
            return  # a duplicate or an older copy (QoS 1 redelivery, a stale retained message)
        self._events.put(("desired", desired))

    def _accept(self, desired: Desired) -> None:
        current = self.state.desired
        if current is not None and desired.generation <= current.generation:
            return
        self.state.desired = desired
        log.info("desired state generation %d: %s", desired.generation, dict(desired.models))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            chunk = decode_chunk(payload, topic)
        except ProtocolError as e:
            self.protocol_errors += 1
            log.warning("ignored a chunk: %s", e.message)
            return
        self._events.put(("chunk", chunk))
