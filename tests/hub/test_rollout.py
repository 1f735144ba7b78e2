"""The rollout engine with a scripted clock and scripted device reports: waves, timeouts and retries,
the abort threshold putting switched devices back, skipped profiles, pause/resume/cancel."""

from __future__ import annotations

import pytest

from edgekit.errors import InvalidInputError
from edgekit.hub.rollout import Action, Rollout, RolloutSpec, Target, parse_waves


def fleet(n: int, profile: str = "pi", active: int | None = 1) -> list[Target]:
    return [Target(f"d{i}", profile, active) for i in range(n)]


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"id": "r1", "model": "m", "version": 2, "waves": [1.0], "device_timeout": 60.0}
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def started(actions: list[Action]) -> list[str]:
    return sorted(a.device for a in actions if not a.revert)


def succeed(r: Rollout, device: str, now: float) -> list[Action]:
    r.report(device, "downloading", "", 1, now)
    return r.report(device, "serving", "", 2, now)


def test_parse_waves() -> None:
    assert parse_waves("1,10%,50%,100%") == [1, 0.1, 0.5, 1.0]
    cases = [("1,10%", "last wave must be 100%"), ("x,100%", "neither"), ("0,100%", "positive"), ("150%", "up to")]
    for bad, why in cases:
        with pytest.raises(InvalidInputError, match=why):
            parse_waves(bad)


def test_waves_start_one_after_another() -> None:
    r = Rollout(spec(waves=parse_waves("1,10%,50%,100%")))
    first = r.plan(fleet(20), {"pi"}, 0)
    assert started(first) == ["d0"]
    assert r.report("d0", "downloading", "", 1, 1) == []
    second = r.report("d0", "serving", "", 2, 2)
    assert started(second) == ["d1"]  # cumulative: 10 % of 20 = 2 devices in all
    third = succeed(r, "d1", 3)
    assert len(started(third)) == 8  # up to 50 % = 10 in all
    for a in third:
        assert r.state == "running"
        succeed(r, a.device, 4)
    rest = [d for d, run in r.devices.items() if run.state == "pending" and run.started]
    assert len(rest) == 10
    for d in rest:
        succeed(r, d, 5)
    assert r.state == "completed"
    assert r.counts()["succeeded"] == 20


def test_a_device_without_a_bundle_for_its_profile_is_skipped_with_the_reason() -> None:
    r = Rollout(spec())
    actions = r.plan([*fleet(2), Target("j0", "jetson", 1)], {"pi"}, 0)
    assert started(actions) == ["d0", "d1"]
    assert r.devices["j0"].state == "skipped"
    assert "no bundle of m v2 for profile 'jetson' (pushed: pi)" in r.devices["j0"].reason
    succeed(r, "d0", 1)
    succeed(r, "d1", 1)
    assert r.state == "completed"


def test_devices_already_on_the_version_count_as_succeeded() -> None:
    r = Rollout(spec())
    assert r.plan(fleet(2, active=2), {"pi"}, 0) == []
    assert r.state == "completed"


def test_a_stuck_device_is_retried_then_failed_and_never_blocks() -> None:
    r = Rollout(spec(retries=1, abort_failure_rate=0.5, abort_min_devices=2, waves=[1, 1.0]))
    r.plan(fleet(3), {"pi"}, 0)
    r.report("d0", "downloading", "", 1, 1)
    assert r.tick(30) == []
    assert r.tick(62) == [Action("d0", 2)]  # retried once
    assert "timed out in downloading; asked again (retry 1/1)" in r.devices["d0"].reason
    later = r.tick(130)
    assert r.devices["d0"].state == "failed"
    assert "timed out: no progress for 60 s after 1 retries" in r.devices["d0"].reason
    assert started(later) == ["d1", "d2"]  # the next wave went on without it


def test_the_abort_threshold_stops_the_rollout_and_puts_switched_devices_back() -> None:
    r = Rollout(spec(waves=parse_waves("2,100%"), abort_failure_rate=0.3, abort_min_devices=2))
    assert started(r.plan(fleet(10), {"pi"}, 0)) == ["d0", "d1"]
    succeed(r, "d0", 1)
    assert r.state == "running"
    actions = r.report("d1", "failed", "golden samples differ", 1, 2)  # 1 of 2 = 50 % > 30 %
    assert r.state == "aborted"
    assert "failure rate 50% of 2 finished devices" in r.reason
    assert actions == [Action("d0", 1, revert=True)]
    assert r.devices["d0"].state == "rolled_back"
    assert r.devices["d1"].reason == "golden samples differ"
    assert not any(run.started for d, run in r.devices.items() if d not in ("d0", "d1"))  # no further device
    later = [r.devices[f"d{i}"] for i in range(2, 10)]
    assert {(run.state, run.reason) for run in later} == {
        ("skipped", "not started: the rollout aborted before its wave")
    }
    assert r.tick(10_000) == []


def test_a_device_that_switches_after_the_abort_is_put_back_too() -> None:
    r = Rollout(spec(waves=parse_waves("3,100%"), abort_failure_rate=0.4, abort_min_devices=2))
    r.plan(fleet(6), {"pi"}, 0)
    succeed(r, "d0", 1)
    r.report("d2", "installing", "", 1, 1)
    actions = r.report("d1", "failed", "bad", 1, 2)
    assert r.state == "aborted"
    assert actions == [Action("d0", 1, revert=True), Action("d2", 1, revert=True)]
    assert r.devices["d2"].state == "skipped"  # told to stop before it switched


def test_below_the_minimum_a_failure_does_not_abort() -> None:
    r = Rollout(spec(waves=[1, 1.0], abort_failure_rate=0.1, abort_min_devices=3))
    r.plan(fleet(4), {"pi"}, 0)
    r.report("d0", "failed", "x", 1, 1)
    assert r.state == "running"


def test_pause_resume_cancel() -> None:
    r = Rollout(spec(waves=[1, 1.0]))
    r.plan(fleet(3), {"pi"}, 0)
    r.pause()
    assert succeed(r, "d0", 1) == []  # paused: the next wave waits
    assert r.tick(1000) == []  # and the time paused does not time devices out
    assert started(r.resume(1001)) == ["d1", "d2"]
    r.cancel()
    assert r.state == "cancelled"
    assert succeed(r, "d1", 1002) == []
    assert r.devices["d1"].state == "succeeded"  # in progress ones finish what they did
