"""The device agent: the serving process's presence and reported state on MQTT, and the hub's desired
state received, checked and kept on disk.

This is the first slice of the Update issue's agent. Built: identity (device id, profile, labels),
retained presence with a last will, retained reported state (every model's active and loaded
versions, from the Runtime) republished on every reconnect, desired state decoded, de-duplicated by
generation and persisted. Not built yet: acting on desired state (chunked download, verification,
install, smoke test, switch, health window, rollback). A desired version the device does not run
is reported as ``pending`` with that reason, so a hub never mistakes it for progress.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from edgekit_runtime import __version__
from edgekit_runtime.agent.link import BrokerAddress, Link
from edgekit_runtime.agent.protocol import (
    Desired,
    Presence,
    ProtocolError,
    Reported,
    ReportedModel,
    Topics,
    decode,
    encode,
)
from edgekit_runtime.bundle import fsync_dir
from edgekit_runtime.runtime import AVAILABLE, Runtime

__all__ = ["Agent", "AgentState"]

log = logging.getLogger("edgekit_runtime.agent")

NOT_BUILT = "over-the-air install is not built in this runtime yet: install the bundle into the store by hand"


class AgentState:
    """What the agent must remember across restarts (``STATE_DIR/agent.json``, written atomically):
    the last desired state accepted and the reported sequence number."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "agent.json"
        self.seq = 0
        self.desired: Desired | None = None
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
    ) -> None:
        self.runtime = runtime
        self.topics = Topics(prefix, device_id)
        self.device_id = device_id
        self.profile = profile
        self.labels = dict(labels or {})
        self.state = AgentState(state_dir)
        self.protocol_errors = 0
        self._lock = threading.Lock()
        offline = encode(Presence(online=False, device=device_id, profile=profile, labels=self.labels))
        self.link = Link(
            broker,
            client_id=device_id,
            will=(self.topics.presence, offline),
            on_connect=self._announce,
            **(link_options or {}),
        )
        self.link.subscribe(self.topics.desired, self._on_desired)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        offline = Presence(online=False, device=self.device_id, profile=self.profile, labels=self.labels)
        self.link.stop(final=(self.topics.presence, encode(offline)))

    # -- what the device says -----------------------------------------------------------------

    def _announce(self) -> None:
        presence = Presence(
            online=True, device=self.device_id, profile=self.profile, labels=self.labels, runtime_version=__version__
        )
        self.link.publish(self.topics.presence, encode(presence), retain=True)
        self.report()

    def reported(self) -> Reported:
        """This device's state now: every model's active and loaded versions, and desired ones pending."""
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
        if desired is not None:
            for name, want in desired.models.items():
                have = models.get(name)
                if have is None or have.active != want.version:
                    models[name] = ReportedModel(
                        active=have.active if have else None,
                        versions=have.versions if have else [],
                        state="pending",
                        reason=f"desired v{want.version}: {NOT_BUILT}",
                    )
        with self._lock:
            self.state.seq += 1
            seq = self.state.seq
        return Reported(seq=seq, desired_generation=desired.generation if desired else None, models=models)

    def report(self) -> None:
        reported = self.reported()
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
        self.state.desired = desired
        log.info("desired state generation %d: %s", desired.generation, dict(desired.models))
        self.report()
