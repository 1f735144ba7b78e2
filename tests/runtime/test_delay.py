"""The batching delay policies on a scripted clock with scripted engine costs: no sleeps, no timing.

The rule itself (``DelayPolicy.decide``) on given facts, then a ``Batcher`` without worker threads
driven step by step through arrival scripts, each request checked for exactly its own rows.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from edgekit_runtime.batching import Batcher, measure_costs
from edgekit_runtime.bundle import BatchingSettings
from edgekit_runtime.delay import ArrivalRate, BatchCosts, Decision, DelayPolicy
from tests.runtime.test_batching import WAIT, FakeBackend, rows

MS = 1e-3
#: weight-bound: a batch of 32 costs little more than a batch of 1 (reading the weights dominates)
WEIGHT_BOUND = {1: 1.0 * MS, 32: 1.6 * MS}
#: compute-bound: cost proportional to rows, nothing to gain from batching
COMPUTE_BOUND = {1: 0.5 * MS, 32: 16.0 * MS}


def policy(
    costs: dict[int, float], *, kind: str = "adaptive", max_rows: int = 32, timeout_ms: float = 2.0
) -> DelayPolicy:
    return DelayPolicy(
        kind,  # type: ignore[arg-type]
        max_rows=max_rows,
        timeout_s=timeout_ms * MS,
        costs=BatchCosts(costs),
        arrivals=ArrivalRate(),
    )


def arrive_every(p: DelayPolicy, gap: float, n: int, start: float = 0.0) -> float:
    """``n`` one-row arrivals ``gap`` seconds apart; returns the time of the last."""
    t = start
    for i in range(n):
        t = start + i * gap
        p.arrivals.arrive(t, 1)
    return t


# -- the facts the rule reads ----------------------------------------------------------------------


def test_the_arrival_rate_is_rows_per_second_and_falls_once_the_stream_stops() -> None:
    a = ArrivalRate()
    assert a.rows_per_second(0.0) == 0  # nothing known yet
    a.arrive(0.0, 1)
    assert a.rows_per_second(0.0) == 0  # one arrival is no rate
    for i in range(1, 200):
        a.arrive(i * MS, 1)
    assert a.rows_per_second(0.199) == pytest.approx(1000)
    for i in range(200, 400):
        a.arrive(i * MS, 4)  # requests of 4 rows each, still one a millisecond
    assert a.rows_per_second(0.399) == pytest.approx(4000, rel=1e-3)
    # no request for 100 ms: the silence itself counts, without waiting for the next arrival
    assert a.rows_per_second(0.499) == pytest.approx(4 / 0.1, rel=1e-3)


def test_batch_costs_interpolate_charge_padding_and_follow_real_runs() -> None:
    c = BatchCosts({1: 1.0, 8: 8.0, 16: 10.0})
    assert c(0) == 0
    assert c(0.5) == pytest.approx(0.5)  # below the smallest size: a line from (0, 0)
    assert c(4) == pytest.approx(4.0)
    assert c(12) == pytest.approx(9.0)
    assert c(32) == pytest.approx(14.0)  # above the largest: the last segment's slope
    padded = BatchCosts({2: 2.0, 4: 3.0, 8: 5.0}, allowed=[2, 4, 8])
    assert padded(3) == 3.0  # runs padded to 4 rows
    assert padded(1) == 2.0
    c.observe(16, 20.0)  # the engine got slower: the estimate moves toward what it measured
    assert 10.0 < c(16) < 20.0
    c.observe(4, 1.0)  # a size never measured before is learnt as it is
    assert c.measured()[4] == 1.0


def test_measure_costs_times_every_size_on_the_backend() -> None:
    be = FakeBackend()
    ticks = iter(range(1000))
    costs = measure_costs(be, [1, 4], clock=lambda: float(next(ticks)))
    assert costs == {1: 1.0, 4: 1.0}  # one tick per run on this clock: the best of the runs
    assert set(be.batches) == {1, 4}


# -- the rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adaptive", "fixed"])
def test_a_full_batch_runs_and_the_timeout_is_the_most_anyone_waits(kind: str) -> None:
    p = policy(WEIGHT_BOUND, kind=kind)
    arrive_every(p, 0.01 * MS, 100, start=1.0 - 1 * MS)  # a flood, up to now
    assert p.decide(1.0, 32, 1.0).close == "full"
    assert p.decide(1.0, 40, 1.0).close == "full"
    assert p.decide(1.0 + 2 * MS, 3, 1.0).close == "timeout"
    d = p.decide(1.0, 3, 1.0)
    assert d.close is None
    assert d.until <= 1.0 + 2 * MS


def test_fixed_waits_for_the_timeout_whatever_the_load_and_the_engine() -> None:
    p = policy(COMPUTE_BOUND, kind="fixed")
    assert p.decide(5.0, 1, 5.0) == (None, 5.0 + 2 * MS)  # TF Serving: the oldest request's deadline
    assert p.decide(5.0 + 2 * MS, 1, 5.0).close == "timeout"


def test_a_timeout_of_zero_takes_what_is_queued_under_both_policies() -> None:
    for kind in ("adaptive", "fixed"):
        p = policy(WEIGHT_BOUND, kind=kind, timeout_ms=0)
        assert p.decide(1.0, 1, 1.0).close == "timeout"


def test_adaptive_runs_a_lone_request_at_once() -> None:
    p = policy(WEIGHT_BOUND)
    assert p.decide(0.0, 1, 0.0).close == "early"  # nothing arrived before: no rate to wait for
    arrive_every(p, 10 * MS, 50)  # one request every 10 ms: no company within the 2 ms timeout
    assert p.decide(0.49, 1, 0.49).close == "early"


def test_adaptive_waits_under_load_when_batches_are_cheap_per_row() -> None:
    p = policy(WEIGHT_BOUND)
    last = arrive_every(p, 0.05 * MS, 200)  # 20,000 rows/s: a row per 50 us, a batch costs 1 ms
    d = p.decide(last, 8, last - 0.4 * MS)
    assert d.close is None
    assert last < d.until <= last - 0.4 * MS + 2 * MS


def test_adaptive_does_not_wait_when_batching_saves_nothing() -> None:
    p = policy(COMPUTE_BOUND)
    last = arrive_every(p, 0.05 * MS, 200)  # the same flood, but 32 rows cost 32 times one
    assert p.decide(last, 8, last).close == "early"


def test_adaptive_stops_waiting_when_the_expected_rows_do_not_come() -> None:
    p = policy(WEIGHT_BOUND, timeout_ms=50)
    last = arrive_every(p, 0.2 * MS, 100)  # 5,000 rows/s, then silence
    d = p.decide(last, 1, last)
    assert d.close is None  # a row is expected every 0.2 ms and would save about 1 ms
    now = d.until
    for _ in range(20):  # each wake-up sees a longer silence, so a lower rate
        d = p.decide(now, 1, last)
        if d.close is not None:
            break
        now = d.until
    assert d.close == "early"
    assert now - last < 2 * MS  # about the saving at stake (1 ms), far short of the 50 ms timeout


def test_adaptive_never_waits_for_less_than_one_expected_row() -> None:
    # a very slow engine would gain from the 0.8 rows expected before the deadline, on average;
    # but a client sending one request at a time never sends it while its request waits
    slow_engine = {1: 10.0 * MS, 32: 12.0 * MS}
    p = policy(slow_engine, timeout_ms=1.0)
    last = arrive_every(p, 1.25 * MS, 100)  # 800 rows/s: 0.8 rows expected within the 1 ms
    assert p.decide(last, 1, last).close == "early"
    p = policy(slow_engine, timeout_ms=2.0)  # with 1.6 rows expected, one is worth the wait
    last = arrive_every(p, 1.25 * MS, 100)
    assert p.decide(last, 1, last) == (None, pytest.approx(last + 1.25 * MS))


def test_the_policy_is_validated_at_the_boundary() -> None:
    with pytest.raises(ValidationError, match="'adaptive' or 'fixed'"):
        BatchingSettings(batch_timeout_policy="sometimes")  # type: ignore[arg-type]
    assert BatchingSettings().batch_timeout_policy == "adaptive"


# -- the batcher on a scripted clock ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CostBackend(FakeBackend):
    """y = 2x, and each batch advances the scripted clock by its scripted cost."""

    def __init__(self, clock: Clock, cost: Callable[[int], float], *, fmt: str = "onnx") -> None:
        super().__init__(fmt=fmt)
        self.clock = clock
        self.cost = cost

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.clock.now += self.cost(feeds["x"].shape[0])
        return super()._run(feeds)


def simulate(
    settings: BatchingSettings,
    costs: dict[int, float],
    arrivals: list[tuple[float, int]],
    *,
    fmt: str = "onnx",
) -> tuple[list[int], list[str], list[float]]:
    """Run ``arrivals`` ((seconds after start, rows)) through a thread-less batcher on a scripted
    clock: one worker, which runs a batch when the policy closes one and otherwise sleeps (the clock
    jumps) to the next arrival or the policy's wake-up. Checks that every request got exactly its
    rows back; returns the batch sizes, the close reasons and each request's latency."""
    clock = Clock()
    engine = BatchCosts(costs)
    be = CostBackend(clock, engine, fmt=fmt)
    reasons: list[str] = []
    b = Batcher([be], settings, costs=costs, clock=clock, start=False, on_close=reasons.append)
    start = clock.now
    pending = sorted(arrivals)
    submitted: list[tuple[np.ndarray, concurrent.futures.Future[dict[str, np.ndarray]], float]] = []
    done: dict[int, float] = {}
    while pending or b.queue_depth:
        while pending and start + pending[0][0] <= clock.now:
            _, n = pending.pop(0)
            x = rows(n, 1000 * len(submitted))
            submitted.append((x, b.submit({"x": x}, n), clock.now))
        d = b.step()
        for i, (_, fut, _) in enumerate(submitted):
            if fut.done() and i not in done:
                done[i] = clock.now
        if d is not None and d.close is not None:
            continue  # a batch ran (the clock moved by its cost): look again
        wake = [start + pending[0][0]] if pending else []
        if d is not None:
            wake.append(d.until)
        assert wake, "nothing queued, nothing to come, yet the loop goes on"
        clock.now = max(clock.now, min(wake))
    for x, fut, _ in submitted:
        np.testing.assert_array_equal(fut.result(0)["y"], x * 2)
    b.close()
    latencies = [done[i] - t for i, (_, _, t) in enumerate(submitted)]
    assert sum(be.batches) >= sum(n for _, n in arrivals)  # padding may add rows, nothing is lost
    return be.batches, reasons, latencies


def adaptive(**kw: object) -> BatchingSettings:
    base: dict[str, object] = {"max_batch_size": 8, "batch_timeout_micros": 2000, "max_enqueued_batches": 64}
    return BatchingSettings(**{**base, **kw})  # type: ignore[arg-type]


WB8 = {1: 1.0 * MS, 8: 1.2 * MS}


def test_a_lone_request_runs_at_once_while_fixed_waits_the_timeout() -> None:
    sparse = [(i * 0.1, 1) for i in range(10)]  # a request every 100 ms
    batches, reasons, latencies = simulate(adaptive(), WB8, sparse)
    assert batches == [1] * 10
    assert reasons == ["early"] * 10
    assert max(latencies) == pytest.approx(1.0 * MS)  # the engine's batch-1 time, no wait
    batches, reasons, latencies = simulate(adaptive(batch_timeout_policy="fixed"), WB8, sparse)
    assert reasons == ["timeout"] * 10
    assert min(latencies) == pytest.approx(3.0 * MS)  # 2 ms waited, then 1 ms of engine


def test_under_load_batches_fill_when_they_are_cheap_per_row() -> None:
    flood = [(i * 0.1 * MS, 1) for i in range(400)]  # 10,000 rows/s against 1 ms for a batch of 1
    batches, reasons, _ = simulate(adaptive(), WB8, flood)
    assert reasons.count("full") > 0.8 * len(reasons)
    assert np.mean(batches) > 7
    compute = {1: 0.1 * MS, 8: 0.8 * MS}
    batches, reasons, _ = simulate(adaptive(), compute, flood)
    assert "timeout" not in reasons  # nothing to gain: no batch waits for its deadline
    assert reasons.count("early") > 0


def test_split_requests_get_exactly_their_rows_back_under_the_adaptive_policy() -> None:
    mixed = [(0.0, 20), (0.05 * MS, 3), (0.1 * MS, 1), (5 * MS, 13), (5.01 * MS, 2), (30 * MS, 9)]
    batches, reasons, _ = simulate(adaptive(), WB8, mixed)
    assert max(batches) <= 8
    assert sum(batches) == 20 + 3 + 1 + 13 + 2 + 9
    assert set(reasons) <= {"full", "timeout", "early"}
    assert len(reasons) == len(batches)


def test_padded_batches_get_exactly_their_rows_back_under_the_adaptive_policy() -> None:
    padded = adaptive(allowed_batch_sizes=[2, 4, 8])
    costs = {2: 1.0 * MS, 4: 1.1 * MS, 8: 1.2 * MS}
    arrivals = [(i * 0.3 * MS, 1 + i % 3) for i in range(60)] + [(50 * MS, 1), (80 * MS, 5)]
    batches, _, _ = simulate(padded, costs, arrivals)
    assert set(batches) <= {2, 4, 8}


def test_litert_batches_cut_to_powers_of_two_get_exactly_their_rows_back() -> None:
    arrivals = [(i * 0.3 * MS, 1 + i % 4) for i in range(40)]
    batches, _, _ = simulate(adaptive(), WB8, arrivals, fmt="tflite")
    assert set(batches) <= {1, 2, 4, 8}


def test_the_batcher_learns_the_engine_cost_from_real_batches() -> None:
    clock = Clock()
    be = CostBackend(clock, lambda n: 5 * MS)  # really 5 ms, whatever the size
    b = Batcher([be], adaptive(max_batch_size=1), costs={1: 1 * MS}, clock=clock, start=False)
    for i in range(100):  # batches of one row: each is full at once, and runs
        b.submit({"x": rows(1, i)}, 1)
        assert b.step() == ("full", 0.0)
    assert b.costs(1) == pytest.approx(5 * MS, rel=0.05)  # slower timings are believed slowly, but believed
    b.close()


def test_the_cost_follows_the_lower_envelope_of_noisy_timings() -> None:
    # A busy server's timings also hold GIL waits: noise that only adds. A 1 ms engine timed at
    # 1 ms most of the time and at 3-10 ms now and then is still a 1 ms engine.
    c = BatchCosts({1: 1.0 * MS})
    for i in range(200):
        c.observe(1, (3 + i % 8) * MS if i % 4 == 0 else 1.0 * MS)
    assert c(1) < 1.5 * MS
    c.observe(1, 0.5 * MS)  # faster: believed at once (half way per timing)
    assert c(1) < 1.0 * MS


def test_no_batch_costs_more_than_a_bigger_one() -> None:
    # a noisy size-4 figure above the size-8 one: a batch of 4 can always run as a batch of 8
    c = BatchCosts({1: 1.0, 4: 9.0, 8: 5.0, 16: 6.0})
    assert c(4) == 5.0
    assert c(2) <= c(4) <= c(8) <= c(16)
    assert [c(n) for n in range(17)] == sorted(c(n) for n in range(17))
    assert c.measured()[4] == 9.0  # the figure itself is kept: only the estimate is bounded


def test_with_threads_an_idle_request_is_not_held_for_a_long_timeout() -> None:
    be = FakeBackend()
    b = Batcher([be], adaptive(batch_timeout_micros=600_000_000))  # ten minutes
    out = b.submit({"x": rows(3)}, 3).result(WAIT)  # would hang past WAIT if the batch waited
    np.testing.assert_array_equal(out["y"], rows(3) * 2)
    b.close()


def test_the_adaptive_batcher_times_each_batch_size_at_load_and_fixed_does_not() -> None:
    gate = threading.Event()
    gate.set()
    timed = FakeBackend(gate=gate)
    Batcher([timed], adaptive(max_batch_size=4)).close()
    assert set(timed.batches) == {1, 4}  # the sizes it will run (ONNX: 1 and the maximum)
    untimed = FakeBackend()
    Batcher([untimed], adaptive(batch_timeout_policy="fixed")).close()
    Batcher([untimed], adaptive(batch_timeout_micros=0)).close()  # no wait to decide on
    assert untimed.batches == []


def test_a_wait_is_never_shorter_than_the_floor_nor_past_the_deadline() -> None:
    p = policy(WEIGHT_BOUND)
    last = arrive_every(p, 1e-7, 300)  # ten million rows a second
    d = p.decide(last, 1, last)
    assert d.close is None
    assert d.until == pytest.approx(last + 50e-6)
    d = p.decide(last, 1, last - 2 * MS + 10e-6)  # 10 us left before the timeout
    assert d.until == pytest.approx(last + 10e-6)


# -- who can still send: keep-alive clients waiting for their answers send nothing more -----------


def test_adaptive_waits_only_while_some_client_could_send() -> None:
    p = policy(WEIGHT_BOUND)
    last = arrive_every(p, 0.05 * MS, 200)  # 20,000 rows/s: waiting pays, as far as the rate tells
    assert p.decide(last, 8, last).close is None  # nothing known of the clients: it waits
    assert p.decide(last, 8, last, idle=1).close is None  # one client could still send
    assert p.decide(last, 8, last, idle=0).close == "early"  # every client is waiting for an answer
    assert p.decide(last, 32, last, idle=3).close == "full"
    fixed = policy(WEIGHT_BOUND, kind="fixed")
    assert fixed.decide(last, 8, last, idle=0) == (None, last + 2 * MS)  # TF Serving's rule ignores it


def closed_loop(
    settings: BatchingSettings, costs: dict[int, float], clients: int, requests: int, *, bounded: bool
) -> tuple[list[int], list[str], list[float]]:
    """``clients`` that each send a one-row request, wait for its answer, and send the next 50 µs
    later (wrk, a camera loop), through a thread-less batcher on a scripted clock; ``bounded``: the
    batcher knows how many of them are not waiting for an answer (as the native HTTP server tells
    it). Checks every answer's rows; returns batch sizes, close reasons and request latencies."""
    think = 0.05 * MS
    clock = Clock()
    be = CostBackend(clock, BatchCosts(costs))
    reasons: list[str] = []
    b = Batcher([be], settings, costs=costs, clock=clock, start=False, on_close=reasons.append)
    next_send = [clock.now + i * 0.01 * MS for i in range(clients)]  # None while one is in flight
    in_flight: dict[int, tuple[np.ndarray, concurrent.futures.Future[dict[str, np.ndarray]], float]] = {}
    if bounded:
        b.set_idle_source(lambda: clients - len(in_flight))
    latencies: list[float] = []
    sent = 0
    while sent < requests or in_flight:
        for c in range(clients):
            t = next_send[c]
            if c not in in_flight and t is not None and t <= clock.now and sent < requests:
                x = rows(1, 1000 * sent)
                in_flight[c] = (x, b.submit({"x": x}, 1), clock.now)
                sent += 1
        d = b.step()
        for c, (x, fut, t0) in list(in_flight.items()):
            if fut.done():
                np.testing.assert_array_equal(fut.result(0)["y"], x * 2)
                latencies.append(clock.now - t0)
                del in_flight[c]
                next_send[c] = clock.now + think
        if d is not None and d.close is not None:
            continue
        wake = [t for c, t in enumerate(next_send) if c not in in_flight and t is not None and sent < requests]
        if d is not None:
            wake.append(d.until)
        assert wake, "nothing queued, nothing to come, yet the loop goes on"
        clock.now = max(clock.now, min(wake))
    b.close()
    return be.batches, reasons, latencies


def test_closed_loop_clients_are_not_kept_waiting_for_rows_they_cannot_send() -> None:
    # 4 clients against a weight-bound engine: the rate says rows keep coming, but once all 4 are
    # queued nobody can send.
    wide = adaptive(max_batch_size=32, batch_timeout_micros=2000)
    costs = {1: 1.0 * MS, 32: 1.6 * MS}
    unbounded, _, slow = closed_loop(wide, costs, 4, 400, bounded=False)
    batches, reasons, lat = closed_loop(wide, costs, 4, 400, bounded=True)
    assert np.mean(batches[5:]) > 3.5  # they still batch: all 4 rows together
    assert set(reasons) == {"early"}  # never held for the 2 ms deadline
    assert np.mean(batches) == pytest.approx(np.mean(unbounded))
    # unbounded, each batch of 4 waits for a fifth row until the silence shows in the rate (about
    # as long again as the batch costs); bounded, it runs as soon as the fourth is in
    assert float(np.median(lat)) < float(np.median(slow)) - 0.5 * MS
    assert float(np.median(lat)) < 1.2 * MS
    assert len(lat) == 400


def test_a_waiting_worker_runs_at_once_when_the_last_idle_client_sends() -> None:
    # A real worker thread; the costs are scripted so that waiting a minute for one more row pays.
    slow = {1: 100.0, 2: 100.0, 8: 100.0}
    be = FakeBackend()
    b = Batcher([be], adaptive(batch_timeout_micros=600_000_000), costs=slow)
    idle = [1]
    b.set_idle_source(lambda: idle[0])
    now = b._clock()
    for i in range(20):  # a row a minute until now: the next is expected in about a minute
        b.arrivals.arrive(now - 60 * (20 - i), 1)
    decide, waiting = b.policy.decide, threading.Event()

    def watched(*args: object, **kw: object) -> Decision:
        d = decide(*args, **kw)  # type: ignore[arg-type]
        if d.close is None:
            waiting.set()
        return d

    b.policy.decide = watched  # type: ignore[method-assign]
    first = b.submit({"x": rows(1)}, 1)
    assert waiting.wait(WAIT)  # the worker waits for the one idle client's row
    assert not first.done()
    idle[0] = 0
    second = b.submit({"x": rows(1, 10)}, 1)  # that client sent: nobody is left
    np.testing.assert_array_equal(first.result(WAIT)["y"], rows(1) * 2)  # would hang without a wake-up
    np.testing.assert_array_equal(second.result(WAIT)["y"], rows(1, 10) * 2)
    assert be.batches == [2]
    b.close()
