"""The rollout engine: one rollout's plan and progress as plain state, driven by device reports and a
clock. No MQTT, HTTP or database here: the hub stores a Rollout as rows and feeds it events; the
engine answers with actions (tell a device to run a version, or to go back). Tests drive it with a
scripted clock.

Semantics (AWS IoT Jobs' abort criteria and timeouts, hawkBit's groups, plus what neither does):

- Waves are cumulative shares of the targeted devices: ``1,10%,50%,100%`` runs 1 device, then up
  to 10 % of them, then 50 %, then all. The next wave starts when every device of the current one
  has finished (succeeded, failed, rolled back, timed out for good, or skipped).
- A device that stays in one state longer than ``device_timeout`` has timed out: it is asked again
  (a new desired generation) up to ``retries`` times, then counts as failed. It never blocks the
  rollout: "stuck in progress" is the anchors' most reported complaint.
- The failure rate is (failed + rolled back + timed out) / finished devices. Past
  ``abort_failure_rate`` once at least ``abort_min_devices`` have finished, the rollout aborts: no
  further device starts, and the devices this rollout already switched are put back on their
  previous version (AWS IoT Jobs only cancels queued executions; hawkBit only pauses).
- A device whose profile has no bundle of the version is ``skipped`` with the reason.
- A rollback is a rollout too, in which each device has its own target: the version it ran before
  (``Target.target``); a device with none known is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgekit.errors import InvalidInputError

__all__ = [
    "DEVICE_STATES",
    "ROLLOUT_STATES",
    "Action",
    "DeviceRun",
    "Rollout",
    "RolloutSpec",
    "Target",
    "parse_waves",
]

ROLLOUT_STATES = ("running", "paused", "completed", "aborted", "cancelled")
DEVICE_STATES = (
    "pending",
    "downloading",
    "verifying",
    "installing",
    "testing",
    "watching",
    "succeeded",
    "failed",
    "rolled_back",
    "skipped",
)
IN_PROGRESS = ("downloading", "verifying", "installing", "testing", "watching")
FINISHED = ("succeeded", "failed", "rolled_back", "skipped")
FAILURES = ("failed", "rolled_back")


def parse_waves(text: str) -> list[float | int]:
    """``1,10%,50%,100%`` -> [1, 0.1, 0.5, 1.0]: device counts or shares, increasing, ending at 100%."""
    out: list[float | int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            out.append(float(part[:-1]) / 100 if part.endswith("%") else int(part))
        except ValueError:
            msg = f"--waves {text!r}: {part!r} is neither a device count (5) nor a share (10%)"
            raise InvalidInputError(msg) from None
        if out[-1] <= 0 or (isinstance(out[-1], float) and out[-1] > 1):
            msg = f"--waves {text!r}: {part!r} must be a positive count or a share up to 100%"
            raise InvalidInputError(msg)
    if not out or out[-1] != 1.0:
        msg = f"--waves {text!r}: the last wave must be 100% so that every device is reached"
        raise InvalidInputError(msg)
    return out


@dataclass(frozen=True)
class RolloutSpec:
    id: str
    model: str
    version: int
    waves: list[float | int] = field(default_factory=lambda: [1.0])
    abort_failure_rate: float = 0.2  # a share: 0.2 = 20 %
    abort_min_devices: int = 1
    device_timeout: float = 600.0  # seconds in one state
    retries: int = 1
    kind: str = "deploy"  # or "rollback": each device's own previous version
    selector: str = "all"
    health_window: float = 0.0  # seconds the device watches the new version after switching
    shadow: float = 0.0  # seconds of live traffic mirrored to the new version before switching
    min_agreement: float | None = None  # a share: 0.99 = 99 % top-1 agreement in the shadow check
    allow_signature_change: bool = False


@dataclass(frozen=True)
class Target:
    """A device the rollout targets: its id, profile and the version it runs now; ``target`` is its
    own goal when it is not the rollout's version (a rollback), ``skip`` why it cannot take part."""

    device: str
    profile: str
    active: int | None
    target: int | None = None
    skip: str = ""


@dataclass
class DeviceRun:
    device: str
    wave: int
    profile: str
    previous: int | None
    state: str = "pending"
    reason: str = ""
    since: float = 0.0
    attempts: int = 0
    started: bool = False
    switched: bool = False  # it served the new version at some point of this rollout
    reverted: bool = False  # asked to go back after an abort
    target: int = 0  # the version this device is brought to (the rollout's, or its own in a rollback)


@dataclass(frozen=True)
class Action:
    """Tell ``device`` to run ``version`` of the model (``revert`` when going back on an abort)."""

    device: str
    version: int | None
    revert: bool = False


def _wave_sizes(waves: list[float | int], n: int) -> list[int]:
    """Cumulative device counts of each wave, strictly increasing, the last = n."""
    sizes: list[int] = []
    for w in waves:
        k = w if isinstance(w, int) else math.ceil(w * n)
        k = min(max(k, 1), n)
        if not sizes or k > sizes[-1]:
            sizes.append(k)
    if sizes and sizes[-1] != n:
        sizes.append(n)
    return sizes


class Rollout:
    """One rollout's state. ``plan`` once; then ``report`` and ``tick`` return the actions to take."""

    def __init__(
        self, spec: RolloutSpec, *, state: str = "running", devices: dict[str, DeviceRun] | None = None
    ) -> None:
        self.spec = spec
        self.state = state
        self.devices: dict[str, DeviceRun] = dict(devices or {})
        self.wave = max((d.wave for d in self.devices.values() if d.started), default=0)
        self.reason = ""

    # -- planning -----------------------------------------------------------------------------

    def plan(self, targets: list[Target], profiles: set[str], now: float) -> list[Action]:
        """Assign targets to waves (devices without a bundle for their profile are skipped) and start
        the first wave."""
        have = ", ".join(sorted(profiles)) or "none"
        runnable = []
        for t in targets:
            goal = self.spec.version if t.target is None else t.target
            why = t.skip
            if not why and t.target is None and t.profile not in profiles:
                why = f"no bundle of {self.spec.model} v{self.spec.version} for profile {t.profile!r} (pushed: {have})"
            if why:
                self.devices[t.device] = DeviceRun(t.device, 0, t.profile, t.active, "skipped", why, now, target=goal)
            else:
                runnable.append((t, goal))
        sizes = _wave_sizes(self.spec.waves, len(runnable)) if runnable else []
        for i, (t, goal) in enumerate(runnable):
            wave = next(w for w, size in enumerate(sizes, 1) if i < size)
            run = DeviceRun(t.device, wave, t.profile, t.active, since=now, target=goal)
            if t.active == goal:
                run.state, run.reason, run.started = "succeeded", f"already runs v{goal}", True
            self.devices[t.device] = run
        return self._advance(now)

    # -- events -------------------------------------------------------------------------------

    def report(self, device: str, state: str, reason: str, active: int | None, now: float) -> list[Action]:
        """A device reported the model's ``state`` (the agent's words: downloading ... serving,
        failed) and the version it now serves."""
        run = self.devices.get(device)
        if run is None or not run.started or run.reverted:
            return []  # not part of it, or told to go back after an abort: its reports are about that
        if self.state == "aborted":
            if active == run.target:  # it finished switching after the abort: back it goes
                run.switched = True
                return self._revert(run)
            return []
        new = run.state
        if active == run.target and state in ("serving", "succeeded"):
            new, run.switched = "succeeded", True
        elif state == "failed":
            new = "failed"
        elif state == "rolled_back":
            new = "rolled_back"
        elif state in IN_PROGRESS:
            new = state
        if new != run.state:
            run.state, run.since = new, now
            run.reason = reason if new in FAILURES else ""
        elif reason and new in FAILURES:
            run.reason = reason
        return self._advance(now)

    def tick(self, now: float) -> list[Action]:
        """Timeouts: a device stuck in one state is asked again, then counted as failed."""
        actions: list[Action] = []
        if self.state == "running":
            for run in self.devices.values():
                if run.started and run.state not in FINISHED and now - run.since > self.spec.device_timeout:
                    if run.attempts <= self.spec.retries:
                        run.attempts += 1
                        run.since = now
                        retry = f"retry {run.attempts - 1}/{self.spec.retries}"
                        run.reason = f"timed out in {run.state}; asked again ({retry})"
                        actions.append(Action(run.device, run.target))
                    else:
                        run.state = "failed"
                        wait = self.spec.device_timeout
                        run.reason = f"timed out: no progress for {wait:g} s after {self.spec.retries} retries"
                        run.since = now
        return actions + self._advance(now)

    # -- control ------------------------------------------------------------------------------

    def pause(self) -> None:
        if self.state == "running":
            self.state = "paused"

    def resume(self, now: float) -> list[Action]:
        if self.state != "paused":
            return []
        self.state = "running"
        for run in self.devices.values():
            if run.started and run.state not in FINISHED:
                run.since = now  # the time paused does not count against the device timeout
        return self._advance(now)

    def cancel(self) -> None:
        """Stop starting devices; those in progress finish what they do (their result is kept)."""
        if self.state in ("running", "paused"):
            self.state = "cancelled"

    # -- the core -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(DEVICE_STATES, 0)
        for run in self.devices.values():
            out[run.state] += 1
        return out

    def failure_rate(self) -> tuple[float, int]:
        finished = [r for r in self.devices.values() if r.started and r.state in ("succeeded", *FAILURES)]
        failed = sum(r.state in FAILURES for r in finished)
        return (failed / len(finished) if finished else 0.0), len(finished)

    def _advance(self, now: float) -> list[Action]:
        if self.state != "running":
            return []
        rate, finished = self.failure_rate()
        if finished >= self.spec.abort_min_devices and rate > self.spec.abort_failure_rate:
            return self._abort(rate, finished)
        actions: list[Action] = []
        while True:
            current = [r for r in self.devices.values() if r.wave == self.wave and r.state != "skipped"]
            if any(r.state not in FINISHED for r in current):
                return actions
            nxt = [r for r in self.devices.values() if r.wave == self.wave + 1]
            if not nxt:
                if not any(r.state not in FINISHED for r in self.devices.values()):
                    self.state = "completed"
                return actions
            self.wave += 1
            for run in nxt:
                if not run.started:
                    run.started, run.since, run.attempts = True, now, 1
                    if run.state == "pending":
                        actions.append(Action(run.device, run.target))

    def _abort(self, rate: float, finished: int) -> list[Action]:
        self.state = "aborted"
        self.reason = (
            f"failure rate {rate:.0%} of {finished} finished devices is over --abort-failure-rate "
            f"{self.spec.abort_failure_rate:.0%}"
        )
        actions = []
        for run in self.devices.values():
            if run.started and not run.reverted and (run.switched or run.state not in FINISHED):
                actions += self._revert(run)
            elif not run.started and run.state == "pending":  # its wave never came: say so, never "pending"
                run.state, run.reason = "skipped", "not started: the rollout aborted before its wave"
        return actions

    def _revert(self, run: DeviceRun) -> list[Action]:
        run.reverted = True
        if run.switched:
            run.state = "rolled_back"
            run.reason = f"put back on v{run.previous}: the rollout aborted ({self.reason})"
        else:
            run.state = "skipped"
            run.reason = f"stopped before switching: the rollout aborted; told to stay on v{run.previous}"
        return [Action(run.device, run.previous, revert=True)]
