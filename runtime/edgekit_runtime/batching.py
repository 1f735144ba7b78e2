"""Server-side batching of one model version with TF Serving's semantics.

Capacity is counted in rows, never in requests: a batch closes when it holds ``max_batch_size``
rows or when its oldest request has waited ``batch_timeout_micros``. A request bigger than
``max_batch_size`` is split across batches and reassembled. Batches are padded up to the next of
``allowed_batch_sizes`` (copies of the last row) and the padding is stripped from the results. The
queue holds at most ``max_enqueued_batches`` batches' worth of rows; beyond that a request is
refused at once (UnavailableError, HTTP 503), never left waiting. A batch that fails fails every
request in it.

When a batch that is not full closes is ``batch_timeout_policy``'s (``delay.py``): ``fixed`` is TF
Serving's rule (its oldest request waited ``batch_timeout_micros``), ``adaptive`` (the default)
also runs it early when waiting would not pay, from the arrival rate and the engine's cost per
batch size (timed here at load, then from every batch that runs). Each batch's close reason
(``full``, ``timeout``, ``early``) goes to the ``on_close`` callback (``/metrics``).

Threads: requests are enqueued from any thread (usually the event loop); each of the
``num_batch_threads`` workers owns one backend instance (a LiteRT interpreter is not thread-safe)
and runs batches. Results go back to asyncio callers with one ``call_soon_threadsafe`` per batch
and per loop, to ``concurrent.futures`` callers directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgekit_runtime.backends import Backend
from edgekit_runtime.bundle import BatchingSettings
from edgekit_runtime.delay import ArrivalRate, BatchCosts, Decision, DelayPolicy
from edgekit_runtime.errors import BackendError, EdgekitError, InvalidInputError, UnavailableError
from edgekit_runtime.latency import sample_inputs

__all__ = ["Batcher", "BatcherClosedError", "Outputs", "batch_sizes", "measure_costs", "padded_sizes"]

log = logging.getLogger("edgekit_runtime.batching")

Outputs = dict[str, np.ndarray]
Feeds = dict[str, np.ndarray]
AnyFuture = asyncio.Future[Outputs] | concurrent.futures.Future[Outputs]
Clock = Callable[[], float]
#: a batch with batching off is one request, all a batch may then hold
_ONE_REQUEST = Decision("full")


class BatcherClosedError(UnavailableError):
    """The model version is unloading; the caller may retry on the version now serving."""


class _Task:
    """One request: its rows, how many were handed to batches, and the parts that came back."""

    __slots__ = ("enqueued", "failed", "feeds", "future", "loop", "parts", "rows", "rows_done", "taken")

    def __init__(
        self, feeds: Feeds, rows: int, future: AnyFuture, loop: asyncio.AbstractEventLoop | None, now: float
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.future = future
        self.loop = loop
        self.enqueued = now
        self.taken = 0
        self.rows_done = 0
        self.parts: list[tuple[int, Outputs]] = []
        self.failed = False


def padded_sizes(settings: BatchingSettings, fixed_batch: int | None) -> list[int]:
    """The batch sizes the batcher pads up to: ``allowed_batch_sizes`` when set, else none (no padding).

    BatchingSettings itself checks the sizes (increasing, ending at max_batch_size); what only the
    loaded model can tell is whether they fit its fixed batch."""
    allowed = settings.allowed_batch_sizes
    if fixed_batch is not None and any(s % fixed_batch for s in allowed):
        msg = (
            f"allowed_batch_sizes {allowed} must be multiples of the model's fixed batch {fixed_batch}; "
            "change them or turn batching off for this model"
        )
        raise InvalidInputError(msg)
    return list(allowed)


def _rounds_down(settings: BatchingSettings, backend: Backend) -> bool:
    """LiteRT allocates one interpreter per input shape (a new shape costs about one whole model
    load); without allowed_batch_sizes, batches are cut to a power of two (or max_batch_size) so a
    worker keeps a handful of interpreters. The rows left over lead the next batch: no padding."""
    return (
        settings.enabled
        and not settings.allowed_batch_sizes
        and backend.format == "tflite"
        and backend.fixed_batch is None
    )


def batch_sizes(settings: BatchingSettings, backend: Backend) -> list[int]:
    """Every batch size a worker will run (warm-up runs each once before a version serves)."""
    if not settings.enabled:
        return [backend.fixed_batch or 1]
    allowed = padded_sizes(settings, backend.fixed_batch)
    if allowed:
        return allowed
    if _rounds_down(settings, backend):
        sizes = {settings.max_batch_size}
        size = 1
        while size < settings.max_batch_size:
            sizes.add(size)
            size *= 2
        return sorted(sizes)
    return sorted({backend.fixed_batch or 1, settings.max_batch_size})


def measure_costs(backend: Backend, sizes: Sequence[int], clock: Clock = time.perf_counter) -> dict[int, float]:
    """Seconds one batch of each size takes on ``backend`` (the best of up to 3 runs, fewer past 50 ms):
    the adaptive policy's starting point, before real batches refine it. Run after the warm-up."""
    costs: dict[int, float] = {}
    for size in sizes:
        feeds = backend.prepare(sample_inputs(backend, size))
        best, spent, runs = float("inf"), 0.0, 0
        while runs < 3 and spent < 0.05:  # a few runs, in bounded time
            start = clock()
            backend.run_prepared(feeds)
            took = clock() - start
            best, spent, runs = min(best, took), spent + took, runs + 1
        costs[size] = best
    return costs


def _resolve_many(items: list[tuple[AnyFuture, Outputs | None, BaseException | None]]) -> None:
    for fut, result, exc in items:
        if fut.done():
            continue  # the caller went away (cancelled); nobody to tell
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]


class Batcher:
    """Queue + worker threads for one model version. ``close()`` drains in-flight work first."""

    def __init__(
        self,
        backends: Sequence[Backend],
        settings: BatchingSettings,
        *,
        name: str = "model",
        on_batch: Callable[[int, int], None] | None = None,
        on_engine: Callable[[float], None] | None = None,
        on_close: Callable[[str], None] | None = None,
        costs: Mapping[int, float] | None = None,
        clock: Clock = time.monotonic,
        start: bool = True,
    ) -> None:
        """``costs`` (batch size -> seconds) seeds the adaptive policy's cost model; without it the
        batcher times every batch size once on the first backend. ``clock`` is the time of arrivals,
        deadlines and batch costs. ``start=False`` starts no worker threads: ``step()`` runs batches
        (tests drive the policy on a scripted clock so)."""
        if not backends:
            msg = "a batcher needs at least one backend"
            raise ValueError(msg)
        self.settings = settings
        self._merge = settings.enabled
        self._max = settings.max_batch_size
        self._timeout = settings.batch_timeout_micros / 1e6
        self._allowed = padded_sizes(settings, backends[0].fixed_batch)
        self._fixed = backends[0].fixed_batch
        self._round_down = _rounds_down(settings, backends[0])
        # Batching on: the bound is in rows (max_enqueued_batches full batches). Off: in requests.
        self._capacity = settings.max_enqueued_batches * (self._max if self._merge else 1)
        self._queue: deque[_Task] = deque()
        self._queued = 0  # rows (batching on) or requests (off) waiting
        self._cond = threading.Condition(threading.Lock())
        self._parts_lock = threading.Lock()
        self._closed = False
        self._on_batch = on_batch
        self._on_engine = on_engine  # seconds the engine took for each batch that ran
        self._on_close = on_close
        self._clock = clock
        self._idle: Callable[[], int | None] | None = None
        self._adaptive = settings.batch_timeout_policy == "adaptive" and self._merge and self._timeout > 0
        if self._adaptive and costs is None:
            costs = measure_costs(backends[0], batch_sizes(settings, backends[0]), clock)
        self.costs = BatchCosts(costs or {}, allowed=self._allowed)
        self.arrivals = ArrivalRate()
        self.policy = DelayPolicy(
            settings.batch_timeout_policy,
            max_rows=self._max,
            timeout_s=self._timeout,
            costs=self.costs,
            arrivals=self.arrivals,
        )
        self._input_names = [s.name for s in backends[0].signature.inputs]
        self._backends = list(backends)
        self._threads = [
            threading.Thread(target=self._work, args=(b,), name=f"edgekit-batch-{name}-{i}", daemon=True)
            for i, b in enumerate(self._backends)
        ]
        if start:
            for t in self._threads:
                t.start()

    def set_on_close(self, on_close: Callable[[str], None] | None) -> None:
        """Where each batch's close reason goes (the runtime wires its ``/metrics`` counter here)."""
        self._on_close = on_close

    def set_idle_source(self, idle: Callable[[], int | None] | None) -> None:
        """How many clients could send a request now (the HTTP server's connections with none in
        flight), or None when unknown: the adaptive policy waits for no more rows than they can send."""
        self._idle = idle

    # -- submitting ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Rows (batching on) or requests (batching off) waiting for a worker."""
        return self._queued

    @property
    def max_request_rows(self) -> int:
        return self._capacity if self._merge else 1 << 62

    def submit_async(self, feeds: Feeds, rows: int) -> asyncio.Future[Outputs]:
        """Enqueue from a running event loop; await the returned future for this request's rows.

        ``feeds`` must already have the model's input names, dtypes and shapes (LoadedModel.prepare)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outputs] = loop.create_future()
        self._enqueue(_Task(feeds, rows, fut, loop, self._clock()))
        return fut

    def submit(self, feeds: Feeds, rows: int) -> concurrent.futures.Future[Outputs]:
        """Enqueue from any thread; the returned future resolves to this request's rows."""
        fut: concurrent.futures.Future[Outputs] = concurrent.futures.Future()
        self._enqueue(_Task(feeds, rows, fut, None, self._clock()))
        return fut

    def _enqueue(self, task: _Task) -> None:
        cost = task.rows if self._merge else 1
        with self._cond:
            if self._closed:
                msg = "this model version is unloading; retry"
                raise BatcherClosedError(msg)
            if cost > self._capacity:
                msg = (
                    f"a request of {task.rows} rows exceeds what the queue can ever hold "
                    f"(max_enqueued_batches x max_batch_size = {self._capacity} rows); send fewer rows per request"
                )
                raise InvalidInputError(msg)
            if self._queued + cost > self._capacity:
                msg = (
                    f"the model's queue is full ({self._queued} {'rows' if self._merge else 'requests'} waiting, "
                    f"max_enqueued_batches={self.settings.max_enqueued_batches}); retry later"
                )
                raise UnavailableError(msg)
            was_empty = not self._queue
            self._queue.append(task)
            self._queued += cost
            if self._adaptive:
                self.arrivals.arrive(task.enqueued, task.rows)
            if was_empty or not self._merge or self._queued >= self._max:
                self._cond.notify()
            elif self._adaptive and self._idle is not None and self._idle() == 0:
                self._cond.notify()  # nobody else can send: a worker waiting for more runs it now

    # -- working ------------------------------------------------------------------------------

    def _decide(self) -> Decision:
        """Close a batch of what is queued now, or wait (called with the lock held, queue not empty)."""
        if not self._merge:
            return _ONE_REQUEST
        if self._closed:  # unloading: drain without waiting
            return Decision("full" if self._queued >= self._max else "early")
        idle = self._idle() if self._adaptive and self._idle is not None else None
        return self.policy.decide(self._clock(), self._queued, self._queue[0].enqueued, idle)

    def _work(self, backend: Backend) -> None:
        cond = self._cond
        while True:
            with cond:
                while True:
                    if not self._queue:
                        if self._closed:
                            return  # closed and drained
                        cond.wait()
                        continue
                    decision = self._decide()
                    if decision.close is not None:
                        break
                    cond.wait(max(decision.until - self._clock(), 0.0))
                items = self._take()
                if self._queue:
                    cond.notify()  # more work than one batch: wake another worker
            if items:
                self._run(backend, items, decision.close)

    def step(self, backend: Backend | None = None) -> Decision | None:
        """Decide once, at the clock's time and without waiting; when a batch closes, run it on this
        thread (on ``backend``, else the first one). None when nothing is queued. For batchers made
        with ``start=False``."""
        with self._cond:
            if not self._queue:
                return None
            decision = self._decide()
            if decision.close is None:
                return decision
            items = self._take()
        if items:
            self._run(backend or self._backends[0], items, decision.close)
        return decision

    def _take(self) -> list[tuple[_Task, int, int]]:
        """Pop up to one batch: whole requests, and the head of the next one if it does not fit."""
        items: list[tuple[_Task, int, int]] = []
        queue = self._queue
        if not self._merge:
            task = queue.popleft()
            self._queued -= 1
            if not task.failed and not task.future.cancelled():
                items.append((task, 0, task.rows))
            return items
        limit = self._max
        if self._round_down and self._queued < limit:
            limit = 1 << (self._queued.bit_length() - 1)
        n = 0
        while queue and n < limit:
            task = queue[0]
            if task.failed or task.future.cancelled():
                queue.popleft()
                self._queued -= task.rows - task.taken
                continue
            k = min(task.rows - task.taken, limit - n)
            items.append((task, task.taken, task.taken + k))
            task.taken += k
            n += k
            if task.taken == task.rows:
                queue.popleft()
        self._queued -= n
        return items

    def _run(self, backend: Backend, items: list[tuple[_Task, int, int]], reason: str) -> None:
        """Run one batch and resolve every caller in it. Whatever fails (joining the rows, the engine,
        an output that does not split back, the metrics callback) fails this batch's callers that are
        still waiting, never the worker: a dead worker would leave every later request queued. The
        batch is counted before any caller hears back, so a reply's batch is already in /metrics."""
        rows = sum(e - s for _, s, e in items)
        padded = rows
        try:
            padded = self._pad_to(rows)
            start = self._clock()
            out = self._execute(backend, items, rows, padded)
            engine_s = self._clock() - start
        except Exception as e:  # noqa: BLE001 - any failure fails this batch (logged in _failure), never the worker
            error = self._failure(e, rows)
            self._record(rows, padded, reason)
            self._fail(items, error)
            return
        self._record(rows, padded, reason)
        if self._on_engine is not None:
            try:
                self._on_engine(engine_s)
            except Exception:  # as for the batch callback: never the worker's life
                log.exception("the engine-time callback failed")
        try:
            self._deliver(items, out)
        except Exception as e:  # noqa: BLE001 - as above
            self._fail(items, self._failure(e, rows))
        if self._adaptive:
            # After the answers are on their way (this holds the GIL the event loop needs to send
            # them), and not under _cond: the loop enqueues under it, and a lock it must wait for
            # costs it a cross-core wake-up (tens of µs on a small VM); the costs swap in a snapshot.
            self.costs.observe(padded, engine_s)

    @staticmethod
    def _failure(e: Exception, rows: int) -> EdgekitError:
        if isinstance(e, EdgekitError):
            return e
        log.exception("batch of %d rows failed", rows, exc_info=e)
        return BackendError(f"the model failed to run: {type(e).__name__}: {e}")

    def _record(self, rows: int, padded: int, reason: str) -> None:
        try:  # metrics must never cost a caller its answer, nor the worker its life
            if self._on_batch is not None:
                self._on_batch(rows, padded)
            if self._on_close is not None:
                self._on_close(reason)
        except Exception:
            log.exception("the batch callback failed")

    def _execute(self, backend: Backend, items: list[tuple[_Task, int, int]], rows: int, padded: int) -> Outputs:
        if len(items) == 1 and items[0][1] == 0 and items[0][2] == items[0][0].rows:
            feeds = items[0][0].feeds
        else:
            feeds = {k: np.concatenate([t.feeds[k][s:e] for t, s, e in items]) for k in self._input_names}
        if padded > rows:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], padded - rows, axis=0)]) for k, v in feeds.items()}
        out = backend.run_prepared(feeds)  # each request was checked and coerced on submit
        for k, v in out.items():
            if not isinstance(v, np.ndarray) or v.ndim == 0 or v.shape[0] != padded:
                shape = list(v.shape) if isinstance(v, np.ndarray) else type(v).__name__
                msg = (
                    f"output {k!r} has shape {shape}, not one row per input row ({padded}); "
                    "this model cannot be batched: turn batching off for it"
                )
                raise BackendError(msg)
        return out

    def _pad_to(self, rows: int) -> int:
        for size in self._allowed:
            if size >= rows:
                return size
        if self._fixed is not None and rows % self._fixed:
            return rows + self._fixed - rows % self._fixed
        return rows

    def _deliver(self, items: list[tuple[_Task, int, int]], out: Outputs) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AnyFuture, Outputs | None, BaseException | None]]] = {}
        offset = 0
        for task, s, e in items:
            n = e - s
            part = {k: v[offset : offset + n] for k, v in out.items()}
            offset += n
            if n == task.rows:
                result: Outputs | None = part
            else:
                result = None
                with self._parts_lock:
                    if task.failed:
                        continue
                    task.parts.append((s, part))
                    task.rows_done += n
                    if task.rows_done == task.rows:
                        task.parts.sort(key=lambda p: p[0])
                        result = {k: np.concatenate([p[k] for _, p in task.parts]) for k in task.parts[0][1]}
                        task.parts = []
            if result is None:
                continue
            self._resolve(task, result, None, by_loop)
        for loop, batch in by_loop.items():
            self._call_in_loop(loop, batch)

    def _fail(self, items: list[tuple[_Task, int, int]], exc: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AnyFuture, Outputs | None, BaseException | None]]] = {}
        for task, _, _ in items:
            with self._parts_lock:
                if task.failed:
                    continue
                task.failed = True
                task.parts = []
            self._resolve(task, None, exc, by_loop)
        for loop, batch in by_loop.items():
            self._call_in_loop(loop, batch)

    @staticmethod
    def _resolve(
        task: _Task,
        result: Outputs | None,
        exc: BaseException | None,
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AnyFuture, Outputs | None, BaseException | None]]],
    ) -> None:
        if task.loop is not None:
            by_loop.setdefault(task.loop, []).append((task.future, result, exc))
            return
        fut: Any = task.future
        try:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the caller

    @staticmethod
    def _call_in_loop(
        loop: asyncio.AbstractEventLoop, batch: list[tuple[AnyFuture, Outputs | None, BaseException | None]]
    ) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: its callers are gone
            loop.call_soon_threadsafe(_resolve_many, batch)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; finish the queued ones (``drain``) or fail them; stop workers; close backends."""
        with self._cond:
            self._closed = True
            dropped: list[_Task] = []
            if not drain:
                dropped = list(self._queue)
                self._queue.clear()
                self._queued = 0
            self._cond.notify_all()
        if dropped:
            self._fail([(t, 0, t.rows) for t in dropped], UnavailableError("the model was unloaded; retry"))
        me = threading.current_thread()
        for t in self._threads:
            if t is not me and t.ident is not None:  # started (not so with start=False)
                t.join(timeout)
        for b in self._backends:
            b.close()
