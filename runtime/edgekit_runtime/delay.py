"""When a batch that is not full closes: the ``fixed`` and ``adaptive`` batching delay policies.

Pure logic over measured facts, with the time passed in, so tests drive it on a scripted clock:

- ``ArrivalRate``: rows per second arriving, from an EWMA of the gaps between requests (and of
  rows per request). The gap since the last arrival counts as soon as it is longer than the
  average, so a stream that stops is seen as stopping at once, not after many samples.
- ``BatchCosts``: what one batch of n rows costs the engine, per batch size: measured at warm-up,
  then updated from every batch that really runs; sizes in between are interpolated and padding
  (``allowed_batch_sizes``) is charged at the padded size. A batch's timing on a busy server also
  holds the wait for the GIL after the engine returns (up to the switch interval, while the event
  loop parses requests): noise that only ever adds. So the estimate follows the lower envelope of
  the timings (down fast, up slowly: an engine that really slows down, e.g. from heat, still moves
  it within a few dozen batches), and no size costs more than a bigger one (a batch can always be
  run as a bigger one). Measured on the small MLP: without this, batch-1 timings of 300-470 µs
  against 42 µs at load made the policy wait for rows that a closed-loop client could not send.
- ``DelayPolicy.decide``: run now (and why: ``full``, ``timeout``, ``early``) or wait until when.

The adaptive rule. With n rows queued and rows arriving at r per second, waiting w brings about
k = r * w more rows. Running the n rows now and the k later costs c(n) + c(k) of engine time;
waiting and running them together costs c(n + k) plus the wait itself. So waiting pays only while
c(n) + c(k) - c(n + k) > w: the rows expected within the wait cut the cost per row (of those n + k
rows) by more than the wait costs. The policy tries k = 1, 2, 4, ... up to a full batch, within
what is left of ``batch_timeout_micros`` (still the most any request waits; at least one row must
be expected by then), and waits for the k that gains most; otherwise the batch runs now
("early"). It is decided again at every wake-up, and the arrival rate has by then seen whether
the expected rows came. A worker only decides while it
is idle: while it runs a batch, arriving rows simply fill the queue.

Who can still send. The arrival rate says how fast rows came, not whether more can: c clients that
each send one request at a time and wait for its answer (a camera loop, wrk, most SDKs) send
nothing while all c are queued, however high their rate. The native HTTP server counts its
connections with no request in flight (``idle``; a connection that pipelines always counts), and
the policy waits for at most that many requests' rows; with none idle the batch runs now. Measured
on the wide MLP (512-2048x3-10) at 4 and 8 connections, before this bound: batches held all 4 or 8
rows and then waited for more that could not come, p50 2.46 and 4.60 ms against 2.21 and 3.89 ms
for the best fixed delay. Without a count (the uvicorn server, in-process callers) there is no bound.

What that gives: idle or lightly loaded (r * c(1) well under 1), every request runs at once, as
with no delay; under load with an engine whose batches are cheap per row (weight-bound models),
batches fill as with a tuned delay; for a compute-bound engine (cost proportional to rows),
waiting never pays and batches run as soon as a worker is free.

``fixed`` is TF Serving's rule exactly: a batch that is not full closes once its oldest request
has waited ``batch_timeout_micros``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from edgekit_runtime.bundle import BatchTimeoutPolicy

__all__ = ["CLOSE_REASONS", "ArrivalRate", "BatchCosts", "Decision", "DelayPolicy"]

#: Why a batch closed: it held max_batch_size rows; its oldest request waited batch_timeout_micros;
#: the adaptive policy ran it before (waiting would not pay, or the version is unloading).
CLOSE_REASONS = ("full", "timeout", "early")

_ALPHA = 1 / 16  # EWMA weight of one arrival gap: smooth over bursts of a few dozen requests
_MIN_WAIT = 50e-6  # seconds
_COST_DOWN = 0.5  # weight of a batch that ran faster than the estimate
_COST_UP = 0.05  # weight of one that ran slower (mostly GIL waits on a busy server, see above)


class Decision(NamedTuple):
    """``close`` is the reason to run the queued rows now, or None to wait until ``until`` at the latest."""

    close: str | None
    until: float = 0.0


class ArrivalRate:
    """Rows per second arriving at one model version (an EWMA of request gaps and rows per request)."""

    __slots__ = ("_gap", "_last", "_rows")

    def __init__(self) -> None:
        self._gap: float | None = None
        self._last: float | None = None
        self._rows = 1.0

    def arrive(self, now: float, rows: int) -> None:
        last = self._last
        if last is not None:
            gap = max(now - last, 0.0)
            self._gap = gap if self._gap is None else self._gap + _ALPHA * (gap - self._gap)
        self._rows += _ALPHA * (rows - self._rows)
        self._last = now

    @property
    def rows_per_request(self) -> float:
        return self._rows

    def rows_per_second(self, now: float) -> float:
        """0 before two requests came; the gap since the last one counts once it is the longer."""
        if self._gap is None or self._last is None:
            return 0.0
        gap = max(self._gap, now - self._last, 1e-9)
        return self._rows / gap


class BatchCosts:
    """Seconds of engine time one batch costs, by rows; ``measured`` maps batch size -> seconds."""

    def __init__(self, measured: Mapping[int, float], *, allowed: Sequence[int] = ()) -> None:
        self._lock = threading.Lock()  # between workers observing at once; readers take the snapshot
        self._sizes: list[int] = []
        self._secs: list[float] = []
        self._allowed = list(allowed)
        # (sizes, floor): replaced as a whole, so a reader on another thread never sees half an
        # update. floor[i] is the cheapest of sizes i.. (a batch can run as a bigger one). It runs
        # after every batch over the few sizes measured (2-6), in a few µs of pure Python.
        self._snapshot: tuple[list[int], list[float]] = ([], [])
        for size, secs in sorted(measured.items()):
            self.observe(size, secs, alpha=1.0)

    def observe(self, size: int, seconds: float, *, alpha: float | None = None) -> None:
        """A batch of ``size`` rows (padded size) took ``seconds``: move that size's estimate toward it
        (``alpha``: the weight of this timing; by default fast when it is lower, slow when higher)."""
        if size < 1 or seconds < 0:
            return
        with self._lock:
            i = bisect.bisect_left(self._sizes, size)
            if i < len(self._sizes) and self._sizes[i] == size:
                old = self._secs[i]
                weight = alpha if alpha is not None else (_COST_DOWN if seconds < old else _COST_UP)
                self._secs[i] = old + weight * (seconds - old)
            else:
                self._sizes.insert(i, size)
                self._secs.insert(i, seconds)
            sizes = self._sizes[:]
            floor = self._secs[:]
            for j in range(len(floor) - 2, -1, -1):
                floor[j] = min(floor[j], floor[j + 1])
            self._snapshot = (sizes, floor)

    def measured(self) -> dict[int, float]:
        with self._lock:
            return dict(zip(self._sizes, self._secs, strict=True))

    def __call__(self, rows: float) -> float:
        """The cost of a batch of ``rows`` (fractional: an expected count); 0 for none."""
        sizes, secs = self._snapshot  # the floor: no size above a bigger one
        if rows <= 0 or not sizes:
            return 0.0
        for size in self._allowed:  # padded up to the next allowed size
            if size >= rows:
                rows = size
                break
        i = bisect.bisect_left(sizes, rows)
        if i < len(sizes) and sizes[i] == rows:
            return secs[i]
        if i == 0:  # below the smallest measured size: a straight line from (0, 0)
            return secs[0] * rows / sizes[0]
        if i == len(sizes):  # above the largest: the last segment's slope (or proportional)
            if len(sizes) == 1:
                return secs[0] * rows / sizes[0]
            i -= 1
        x0, x1, y0, y1 = sizes[i - 1], sizes[i], secs[i - 1], secs[i]
        return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)


class DelayPolicy:
    """Decides, for the rows queued now, whether a batch closes or waits (see the module's docstring)."""

    def __init__(
        self,
        policy: BatchTimeoutPolicy,
        *,
        max_rows: int,
        timeout_s: float,
        costs: BatchCosts,
        arrivals: ArrivalRate,
    ) -> None:
        self.policy = policy
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.costs = costs
        self.arrivals = arrivals
        candidates = []
        k = 1
        while k < max_rows:
            candidates.append(k)
            k *= 2
        self._candidates = candidates

    def decide(self, now: float, rows: int, oldest: float, idle: int | None = None) -> Decision:
        """``rows`` queued, the oldest enqueued at ``oldest`` (same clock as ``now``); ``idle``: how
        many clients could send a request now (None: not known), which bounds the rows worth waiting for."""
        if rows >= self.max_rows:
            return Decision("full")
        deadline = oldest + self.timeout_s
        left = deadline - now
        if left <= 0:
            return Decision("timeout")
        if self.policy == "fixed":
            return Decision(None, deadline)
        rate = self.arrivals.rows_per_second(now)
        if rate <= 0:
            return Decision("early")
        room = self.max_rows - rows
        if idle is not None:
            # Keep-alive clients that are all waiting for an answer send nothing more: however fast
            # rows arrived so far, no more than the idle ones can send are worth waiting for.
            room = min(room, math.ceil(idle * self.arrivals.rows_per_request))
            if room < 1:
                return Decision("early")
        cost = self.costs
        now_cost = cost(rows)
        best_gain, best_wait = 0.0, 0.0
        for k in (*(c for c in self._candidates if c < room), room):
            wait = k / rate
            if wait > left:
                # Not even that many rows before the deadline. Waiting for less than one expected
                # row is not tried: a client that sends one request at a time never sends it.
                break
            gain = now_cost + cost(k) - cost(rows + k) - wait
            if gain > best_gain:
                best_gain, best_wait = gain, wait
        if best_gain <= 0:
            return Decision("early")
        # a floor on the sleep: at a very high rate the best wait is a few microseconds, and a
        # worker that wakes that often only burns the cores the event loop needs to bring the rows
        return Decision(None, min(now + max(best_wait, _MIN_WAIT), deadline))
