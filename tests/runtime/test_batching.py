"""Batching semantics with a scripted backend: rows not requests, padding, splitting, failures, bounds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from edgekit_runtime.backends import Backend
from edgekit_runtime.batching import Batcher, batch_sizes
from edgekit_runtime.bundle import BatchingSettings
from edgekit_runtime.errors import BackendError, InvalidInputError, UnavailableError
from edgekit_runtime.tensors import Signature, TensorSpec

WAIT = 20  # seconds; only a bound against hangs, never a timing assertion


class FakeBackend(Backend):
    """y = 2x; records batch sizes and threads; can block on a gate or fail on negative values."""

    def __init__(
        self,
        *,
        fixed: int | None = None,
        fmt: str = "onnx",
        gate: threading.Event | None = None,
        fail: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        self.format = fmt
        self.signature = Signature(
            inputs=[TensorSpec(name="x", dtype="float32", shape=[fixed or -1, 2])],
            outputs=[TensorSpec(name="y", dtype="float32", shape=[fixed or -1, 2])],
        )
        self.accelerators = []
        self.notes = []
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.gate = gate
        self.fail = fail
        self.started = threading.Event()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["x"]
        self.batches.append(x.shape[0])
        self.threads.add(threading.get_ident())
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        if self.fail is not None and self.fail(x):
            raise BackendError("scripted failure")
        return {"y": x * 2}


def rows(n: int, start: float = 0) -> np.ndarray:
    return np.arange(n * 2, dtype=np.float32).reshape(n, 2) + start


def settings(**kw: object) -> BatchingSettings:
    base: dict[str, object] = {"max_batch_size": 4, "batch_timeout_micros": 0, "max_enqueued_batches": 16}
    base.update(kw)
    return BatchingSettings(**base)  # type: ignore[arg-type]


def blocked(backend: FakeBackend, batcher: Batcher) -> object:
    """Occupy the worker with a first 1-row request so the following ones queue up."""
    fut = batcher.submit({"x": rows(1, 1000)}, 1)
    assert backend.started.wait(WAIT)
    return fut


def test_capacity_is_counted_in_rows_and_each_caller_gets_its_own_rows() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(max_batch_size=4))
    first = blocked(be, b)
    sizes = [1, 2, 3, 1, 2]
    inputs = [rows(n, 100 * i) for i, n in enumerate(sizes)]
    futs = [b.submit({"x": x}, len(x)) for x in inputs]
    gate.set()
    for x, f in zip(inputs, futs, strict=True):
        np.testing.assert_array_equal(f.result(WAIT)["y"], x * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches[0] == 1
    assert all(n <= 4 for n in be.batches)
    assert sum(be.batches[1:]) == sum(sizes)
    assert be.batches[1] == 4  # rows, not requests: 1 + 2 + the first row of the 3-row request


def test_oversized_request_is_split_and_reassembled_in_order() -> None:
    be = FakeBackend()
    b = Batcher([be], settings(max_batch_size=4))
    x = rows(10)
    out = b.submit({"x": x}, 10).result(WAIT)
    b.close()
    np.testing.assert_array_equal(out["y"], x * 2)
    assert be.batches == [4, 4, 2]


def test_padding_to_allowed_sizes_is_stripped() -> None:
    be = FakeBackend()
    b = Batcher([be], settings(max_batch_size=8, allowed_batch_sizes=[2, 4, 8]))
    x = rows(3)
    out = b.submit({"x": x}, 3).result(WAIT)
    b.close()
    assert be.batches == [4]
    assert out["y"].shape == (3, 2)
    np.testing.assert_array_equal(out["y"], x * 2)


@pytest.mark.parametrize("sizes", [[2, 4], [4, 2, 8], [2, 2, 8], [0, 8]])
def test_allowed_sizes_must_increase_and_end_at_max(sizes: list[int]) -> None:
    with pytest.raises(ValidationError, match="increase strictly and end with max_batch_size"):
        settings(max_batch_size=8, allowed_batch_sizes=sizes)


def test_allowed_sizes_must_fit_a_fixed_batch() -> None:
    with pytest.raises(InvalidInputError, match="multiples of the model's fixed batch 2"):
        Batcher([FakeBackend(fixed=2)], settings(max_batch_size=8, allowed_batch_sizes=[3, 8]))


def test_a_failed_batch_fails_every_caller_in_it() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate, fail=lambda x: bool((x < 0).any()))
    b = Batcher([be], settings(max_batch_size=8))
    first = blocked(be, b)
    good = b.submit({"x": rows(2)}, 2)
    bad = b.submit({"x": -rows(1) - 1}, 1)
    also = b.submit({"x": rows(1)}, 1)
    gate.set()
    first.result(WAIT)  # type: ignore[attr-defined]
    for f in (good, bad, also):
        with pytest.raises(BackendError, match="scripted failure"):
            f.result(WAIT)
    # the worker survives and serves the next request
    np.testing.assert_array_equal(b.submit({"x": rows(1)}, 1).result(WAIT)["y"], rows(1) * 2)
    b.close()


def test_a_full_queue_refuses_at_once() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(max_batch_size=2, max_enqueued_batches=2))
    first = blocked(be, b)
    queued = [b.submit({"x": rows(2)}, 2), b.submit({"x": rows(2)}, 2)]  # 4 rows = 2 batches
    with pytest.raises(UnavailableError, match="queue is full"):
        b.submit({"x": rows(1)}, 1)
    with pytest.raises(InvalidInputError, match="exceeds"):
        b.submit({"x": rows(5)}, 5)  # could never fit
    gate.set()
    for f in (first, *queued):
        f.result(WAIT)  # type: ignore[attr-defined]
    b.close()


def test_the_timeout_closes_a_batch_that_is_not_full() -> None:
    be = FakeBackend()
    b = Batcher([be], settings(max_batch_size=64, batch_timeout_micros=20_000, batch_timeout_policy="fixed"))
    out = b.submit({"x": rows(1)}, 1).result(WAIT)
    assert out["y"].shape == (1, 2)
    assert be.batches == [1]
    b.close()


def test_a_full_batch_does_not_wait_for_the_timeout() -> None:
    be = FakeBackend()
    b = Batcher([be], settings(max_batch_size=2, batch_timeout_micros=600_000_000))  # ten minutes
    out = b.submit({"x": rows(2)}, 2).result(WAIT)  # would hang past WAIT if the batch waited
    assert out["y"].shape == (2, 2)
    b.close(drain=False)


def test_batching_off_runs_each_request_on_its_own() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(enabled=False, max_enqueued_batches=3))
    first = blocked(be, b)
    futs = [b.submit({"x": rows(n)}, n) for n in (1, 3, 2)]
    with pytest.raises(UnavailableError):
        b.submit({"x": rows(1)}, 1)  # bounded: 3 requests waiting
    gate.set()
    for f in futs:
        f.result(WAIT)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [1, 1, 3, 2]


def test_each_worker_thread_owns_its_backend() -> None:
    backends = [FakeBackend(), FakeBackend()]
    b = Batcher(backends, settings(max_batch_size=2, num_batch_threads=2, max_enqueued_batches=100))
    futs = [b.submit({"x": rows(2, i)}, 2) for i in range(50)]
    for i, f in enumerate(futs):
        np.testing.assert_array_equal(f.result(WAIT)["y"], rows(2, i) * 2)
    b.close()
    for be in backends:
        assert len(be.threads) <= 1
    assert sum(len(be.batches) for be in backends) >= 25


def test_close_finishes_queued_requests() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings())
    first = blocked(be, b)
    queued = b.submit({"x": rows(3)}, 3)
    closer = threading.Thread(target=b.close)
    closer.start()
    gate.set()
    closer.join(WAIT)
    first.result(WAIT)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(queued.result(WAIT)["y"], rows(3) * 2)
    with pytest.raises(UnavailableError):
        b.submit({"x": rows(1)}, 1)


def test_asyncio_callers_each_get_their_rows() -> None:
    be = FakeBackend()
    b = Batcher([be], settings(max_batch_size=8))

    async def main() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(b.submit_async({"x": rows(1 + i % 3, i)}, 1 + i % 3) for i in range(40)))

    outs = asyncio.run(main())
    b.close()
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], rows(1 + i % 3, i) * 2)
    assert max(be.batches) <= 8


def test_fixed_batch_models_run_row_by_row() -> None:
    be = FakeBackend(fixed=1)
    b = Batcher([be], settings(max_batch_size=4))
    x = rows(3)
    np.testing.assert_array_equal(b.submit({"x": x}, 3).result(WAIT)["y"], x * 2)
    b.close()
    assert be.batches == [1, 1, 1]


def test_litert_batches_are_cut_to_powers_of_two() -> None:
    gate = threading.Event()
    be = FakeBackend(fmt="tflite", gate=gate)
    b = Batcher([be], settings(max_batch_size=8))
    first = blocked(be, b)
    futs = [b.submit({"x": rows(1, i)}, 1) for i in range(7)]
    gate.set()
    for i, f in enumerate(futs):
        np.testing.assert_array_equal(f.result(WAIT)["y"], rows(1, i) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches[1:] == [4, 2, 1]
    assert batch_sizes(settings(max_batch_size=8), be) == [1, 2, 4, 8]


class PhaseBackend(FakeBackend):
    """Fails in one chosen phase of a batch; every later batch runs normally."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase
        self.calls = 0

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        out = super()._run(feeds)
        if self.calls > (2 if self.phase == "split" else 1):
            return out
        if self.phase == "engine":
            msg = "engine crashed"
            raise RuntimeError(msg)
        if self.phase == "scalar-output":
            return {"y": np.float32(1.0)}  # type: ignore[dict-item]
        if self.phase == "not-an-array":
            return {"y": out["y"].tolist()}  # type: ignore[dict-item]
        if self.phase == "split" and self.calls == 2:
            return {"z": out["y"]}  # the second half of a split request names its output differently
        return out


@pytest.mark.parametrize("phase", ["engine", "scalar-output", "not-an-array", "split"])
def test_a_failure_in_any_phase_fails_the_callers_and_keeps_the_worker(phase: str) -> None:
    be = PhaseBackend(phase)
    b = Batcher([be], settings(max_batch_size=4))
    x = rows(6)  # split across two batches of 4 and 2 rows
    with pytest.raises(BackendError):
        b.submit({"x": x}, 6).result(WAIT)  # a worker that died would leave this future hanging
    np.testing.assert_array_equal(b.submit({"x": rows(1)}, 1).result(WAIT)["y"], rows(1) * 2)
    b.close()


def test_rows_of_unequal_shapes_fail_their_batch_not_the_worker() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    be.signature = Signature(
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, -1])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, -1])],
    )
    b = Batcher([be], settings(max_batch_size=8))
    first = blocked(be, b)
    a = b.submit({"x": np.ones((1, 2), np.float32)}, 1)
    c = b.submit({"x": np.ones((1, 3), np.float32)}, 1)  # cannot be stacked with the one before
    gate.set()
    first.result(WAIT)  # type: ignore[attr-defined]
    for f in (a, c):
        with pytest.raises(BackendError, match="failed to run"):
            f.result(WAIT)
    np.testing.assert_array_equal(b.submit({"x": rows(1)}, 1).result(WAIT)["y"], rows(1) * 2)
    b.close()


def test_a_failing_batch_callback_costs_no_caller_its_answer() -> None:
    seen: list[tuple[int, int]] = []

    def on_batch(n: int, padded: int) -> None:
        seen.append((n, padded))
        if len(seen) == 1:
            msg = "metrics broke"
            raise RuntimeError(msg)

    b = Batcher([FakeBackend()], settings(max_batch_size=4, allowed_batch_sizes=[2, 4]), on_batch=on_batch)
    np.testing.assert_array_equal(b.submit({"x": rows(3)}, 3).result(WAIT)["y"], rows(3) * 2)
    np.testing.assert_array_equal(b.submit({"x": rows(1)}, 1).result(WAIT)["y"], rows(1) * 2)
    b.close()
    assert seen == [(3, 4), (1, 2)]


def test_a_batch_that_is_not_full_waits_for_the_timeout_to_gather_rows() -> None:
    be = FakeBackend()
    fixed = settings(max_batch_size=4, batch_timeout_micros=600_000_000, batch_timeout_policy="fixed")  # ten minutes
    b = Batcher([be], fixed)
    first = b.submit({"x": rows(1)}, 1)
    # a timeout of 0 would run the lone row at once; here it waits for company
    assert not be.started.wait(0.3)
    rest = [b.submit({"x": rows(1, i)}, 1) for i in range(1, 4)]
    for i, f in enumerate([first, *rest]):
        np.testing.assert_array_equal(f.result(WAIT)["y"], rows(1, i) * 2)
    assert be.batches == [4]  # the fourth row filled the batch: it closed without waiting the ten minutes
    b.close()


def test_the_queue_holds_exactly_its_capacity_and_says_what_is_wrong() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(max_batch_size=2, max_enqueued_batches=2))
    first = blocked(be, b)
    assert b.max_request_rows == 4
    exactly = b.submit({"x": rows(4)}, 4)  # a request of the whole capacity fits
    assert b.queue_depth == 4
    with pytest.raises(UnavailableError) as full:
        b.submit({"x": rows(1)}, 1)
    assert full.value.message == "the model's queue is full (4 rows waiting, max_enqueued_batches=2); retry later"
    with pytest.raises(InvalidInputError) as never:
        b.submit({"x": rows(5)}, 5)
    assert never.value.message == (
        "a request of 5 rows exceeds what the queue can ever hold "
        "(max_enqueued_batches x max_batch_size = 4 rows); send fewer rows per request"
    )
    gate.set()
    np.testing.assert_array_equal(exactly.result(WAIT)["y"], rows(4) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    assert b.queue_depth == 0
    b.close()
    with pytest.raises(UnavailableError) as closed:
        b.submit({"x": rows(1)}, 1)
    assert closed.value.message == "this model version is unloading; retry"


def test_batching_off_counts_requests_and_says_so() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(enabled=False, max_enqueued_batches=1))
    first = blocked(be, b)
    assert b.max_request_rows == 1 << 62  # any number of rows: each request runs alone
    queued = b.submit({"x": rows(3)}, 3)
    assert b.queue_depth == 1
    with pytest.raises(UnavailableError) as full:
        b.submit({"x": rows(1)}, 1)
    assert full.value.message == "the model's queue is full (1 requests waiting, max_enqueued_batches=1); retry later"
    gate.set()
    np.testing.assert_array_equal(queued.result(WAIT)["y"], rows(3) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()


def test_padded_sizes_must_fit_the_models_fixed_batch_and_name_the_fix() -> None:
    from edgekit_runtime.batching import padded_sizes

    with pytest.raises(InvalidInputError) as e:
        padded_sizes(settings(max_batch_size=8, allowed_batch_sizes=[3, 8]), 2)
    assert e.value.message == (
        "allowed_batch_sizes [3, 8] must be multiples of the model's fixed batch 2; "
        "change them or turn batching off for this model"
    )
    assert padded_sizes(settings(max_batch_size=8, allowed_batch_sizes=[4, 8]), 4) == [4, 8]
    assert padded_sizes(settings(max_batch_size=8, allowed_batch_sizes=[4, 8]), None) == [4, 8]
    assert padded_sizes(settings(max_batch_size=8), 4) == []


@pytest.mark.parametrize(
    ("kw", "backend", "sizes"),
    [
        ({"enabled": False}, FakeBackend(), [1]),
        ({"enabled": False}, FakeBackend(fixed=3), [3]),
        ({"max_batch_size": 8, "allowed_batch_sizes": [2, 8]}, FakeBackend(), [2, 8]),
        ({"max_batch_size": 8, "allowed_batch_sizes": [2, 8]}, FakeBackend(fmt="tflite"), [2, 8]),
        ({"max_batch_size": 6}, FakeBackend(fmt="tflite"), [1, 2, 4, 6]),
        ({"max_batch_size": 1}, FakeBackend(fmt="tflite"), [1]),
        ({"max_batch_size": 6, "enabled": False}, FakeBackend(fmt="tflite"), [1]),
        ({"max_batch_size": 6}, FakeBackend(fmt="tflite", fixed=2), [2, 6]),
        ({"max_batch_size": 6}, FakeBackend(), [1, 6]),
        ({"max_batch_size": 1}, FakeBackend(), [1]),
        ({"max_batch_size": 6}, FakeBackend(fixed=2), [2, 6]),
    ],
)
def test_batch_sizes_are_every_size_a_worker_runs(
    kw: dict[str, object], backend: FakeBackend, sizes: list[int]
) -> None:
    assert batch_sizes(settings(**kw), backend) == sizes


def test_litert_rounds_down_only_with_batching_on_and_no_allowed_sizes() -> None:
    gate = threading.Event()
    be = FakeBackend(fmt="tflite", gate=gate)
    b = Batcher([be], settings(max_batch_size=8, allowed_batch_sizes=[2, 8]))
    first = blocked(be, b)
    futs = [b.submit({"x": rows(1, i)}, 1) for i in range(3)]
    gate.set()
    for i, f in enumerate(futs):
        np.testing.assert_array_equal(f.result(WAIT)["y"], rows(1, i) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [2, 8]  # 1 row padded to 2, then 3 rows padded to 8: not cut to 2 + 1


def test_a_fixed_batch_model_without_allowed_sizes_is_padded_to_its_multiple() -> None:
    gate = threading.Event()
    be = FakeBackend(fixed=2, gate=gate)
    b = Batcher([be], settings(max_batch_size=4))
    first = blocked(be, b)
    x = rows(3)
    fut = b.submit({"x": x}, 3)
    gate.set()
    np.testing.assert_array_equal(fut.result(WAIT)["y"], x * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [2, 2, 2]  # 1 row padded to 2; 3 rows padded to 4, run as two of the fixed 2


def test_cancelled_callers_are_skipped_and_the_others_answered() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(max_batch_size=8))

    async def main() -> dict[str, np.ndarray]:
        first = b.submit_async({"x": rows(1, 1000)}, 1)
        while not be.started.is_set():
            await asyncio.sleep(0.01)
        gone = b.submit_async({"x": rows(2)}, 2)
        stays = b.submit_async({"x": rows(1, 10)}, 1)
        gone.cancel()
        gate.set()
        await first
        return await stays

    stays = asyncio.run(main())
    b.close()
    np.testing.assert_array_equal(stays["y"], rows(1, 10) * 2)
    assert be.batches == [1, 1]  # the cancelled rows never ran
    assert b.queue_depth == 0


class SecondGateBackend(FakeBackend):
    """Holds its second batch until ``second`` is set (the first runs at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.second = threading.Event()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super()._run(feeds)
        if len(self.batches) == 2:
            assert self.second.wait(WAIT)
        return out


def test_an_asyncio_caller_cancelled_while_its_batch_runs_does_not_stop_the_others() -> None:
    """A batch's results reach a loop in one call: a cancelled future in it must not cost the ones after it."""
    be = SecondGateBackend()
    b = Batcher([be], settings(max_batch_size=8, batch_timeout_micros=0))

    async def main() -> tuple[bool, dict[str, np.ndarray], dict[str, np.ndarray]]:
        gate = threading.Event()
        be.gate = gate
        first = b.submit_async({"x": rows(1, 1000)}, 1)
        while not be.started.is_set():
            await asyncio.sleep(0.01)
        a = b.submit_async({"x": rows(1)}, 1)
        c = b.submit_async({"x": rows(1, 5)}, 1)
        d = b.submit_async({"x": -rows(1, 5)}, 1)
        gate.set()
        await first
        while len(be.batches) < 2:  # the batch of a, c and d is running, held by the second gate
            await asyncio.sleep(0.01)
        a.cancel()
        be.second.set()
        return a.cancelled(), await c, await d

    cancelled, c, d = asyncio.run(asyncio.wait_for(main(), WAIT))
    b.close()
    assert cancelled
    assert be.batches == [1, 3]
    np.testing.assert_array_equal(c["y"], rows(1, 5) * 2)
    np.testing.assert_array_equal(d["y"], -rows(1, 5) * 2)


def test_a_failure_reaches_asyncio_callers_with_the_error() -> None:
    be = FakeBackend(fail=lambda x: True)
    b = Batcher([be], settings())

    async def main() -> None:
        await b.submit_async({"x": rows(1)}, 1)

    with pytest.raises(BackendError, match="scripted failure"):
        asyncio.run(main())
    b.close()


def test_close_without_draining_fails_the_queued_callers_and_closes_the_backends() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    closed: list[bool] = []
    be.close = lambda: closed.append(True)  # type: ignore[method-assign]
    b = Batcher([be], settings())
    first = blocked(be, b)
    queued = b.submit({"x": rows(2)}, 2)
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    with pytest.raises(UnavailableError, match=r"^the model was unloaded; retry$"):
        queued.result(WAIT)
    assert b.queue_depth == 0
    gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    np.testing.assert_array_equal(first.result(WAIT)["y"], rows(1, 1000) * 2)  # type: ignore[attr-defined]
    assert closed == [True]
    assert all(not t.is_alive() for t in b._threads)


def test_a_batcher_needs_a_backend_and_names_its_threads() -> None:
    with pytest.raises(ValueError, match=r"^a batcher needs at least one backend$"):
        Batcher([], settings())
    b = Batcher([FakeBackend(), FakeBackend()], settings(num_batch_threads=2), name="mlp-3")
    assert [t.name for t in b._threads] == ["edgekit-batch-mlp-3-0", "edgekit-batch-mlp-3-1"]
    assert all(t.daemon for t in b._threads)  # a stuck engine never keeps the process from exiting
    b.close()


def test_a_split_request_cancelled_half_way_leaves_nothing_queued() -> None:
    be = SecondGateBackend()
    b = Batcher([be], settings(max_batch_size=2))

    async def main() -> None:
        big = b.submit_async({"x": rows(5)}, 5)  # batches of 2 + 2 + 1 rows
        while len(be.batches) < 2:  # the second part is running, held by the gate
            await asyncio.sleep(0.01)
        big.cancel()
        be.second.set()
        after = await b.submit_async({"x": rows(1, 7)}, 1)
        np.testing.assert_array_equal(after["y"], rows(1, 7) * 2)

    asyncio.run(asyncio.wait_for(main(), WAIT))
    b.close()
    assert be.batches == [2, 2, 1]  # the last row of the cancelled request never ran; the 1 is the next request
    assert b.queue_depth == 0


def test_batching_off_skips_cancelled_requests() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(enabled=False))
    first = blocked(be, b)
    gone = b.submit({"x": rows(2)}, 2)
    stays = b.submit({"x": rows(3)}, 3)
    assert gone.cancel()
    gate.set()
    np.testing.assert_array_equal(stays.result(WAIT)["y"], rows(3) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [1, 3]


def test_litert_takes_a_whole_queue_of_max_batch_size_rows() -> None:
    gate = threading.Event()
    be = FakeBackend(fmt="tflite", gate=gate)
    b = Batcher([be], settings(max_batch_size=6))
    first = blocked(be, b)
    futs = [b.submit({"x": rows(1, i)}, 1) for i in range(6)]
    gate.set()
    for f in futs:
        f.result(WAIT)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [1, 6]  # 6 is an allowed size (the max): not cut to 4


def test_a_batch_of_an_allowed_size_is_not_padded() -> None:
    be = FakeBackend()
    b = Batcher([be], settings(max_batch_size=8, allowed_batch_sizes=[2, 4, 8]))
    for n in (2, 4, 1):
        np.testing.assert_array_equal(b.submit({"x": rows(n)}, n).result(WAIT)["y"], rows(n) * 2)
    b.close()
    assert be.batches == [2, 4, 2]


class OutputBackend(FakeBackend):
    """Returns what ``make`` makes of the doubled input."""

    def __init__(self, make: Callable[[np.ndarray], object]) -> None:
        super().__init__()
        self.make = make

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": self.make(super()._run(feeds)["y"])}  # type: ignore[dict-item]


def test_one_dimensional_outputs_of_one_value_per_row_are_fine() -> None:
    b = Batcher([OutputBackend(lambda y: y[:, 0])], settings())
    np.testing.assert_array_equal(b.submit({"x": rows(3)}, 3).result(WAIT)["y"], rows(3)[:, 0] * 2)
    b.close()


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda y: np.float32(1.0), "float32"), (lambda y: np.zeros(()), "[]"), (lambda y: y[:1], "[1, 2]")],
)
def test_outputs_that_are_not_one_row_per_input_row_say_so(make: Callable[[np.ndarray], object], shape: str) -> None:
    b = Batcher([OutputBackend(make)], settings())
    with pytest.raises(BackendError) as e:
        b.submit({"x": rows(3)}, 3).result(WAIT)
    assert e.value.message == (
        f"output 'y' has shape {shape}, not one row per input row (3); this model cannot be batched: "
        "turn batching off for it"
    )
    b.close()


def test_an_engine_crash_is_reported_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def on_batch(n: int, padded: int) -> None:
        raise RuntimeError("metrics broke")

    crash = OutputBackend(lambda y: (_ for _ in ()).throw(ValueError("bad weights")))
    b = Batcher([crash], settings(), on_batch=on_batch)
    with caplog.at_level("ERROR", logger="edgekit_runtime.batching"):
        with pytest.raises(BackendError) as e:
            b.submit({"x": rows(3)}, 3).result(WAIT)
        b.close()
    assert e.value.message == "the model failed to run: ValueError: bad weights"
    assert [r.getMessage() for r in caplog.records] == ["batch of 3 rows failed", "the batch callback failed"]


# -- the mutation triage (docs/testing.md): cancelled and failed parts, several workers, closing ----


def test_a_cancelled_request_between_two_others_does_not_split_their_batch() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(max_batch_size=8))
    first = blocked(be, b)
    a = b.submit({"x": rows(1)}, 1)
    gone = b.submit({"x": rows(2, 50)}, 2)
    c = b.submit({"x": rows(1, 10)}, 1)
    assert gone.cancel()
    gate.set()
    np.testing.assert_array_equal(a.result(WAIT)["y"], rows(1) * 2)
    np.testing.assert_array_equal(c.result(WAIT)["y"], rows(1, 10) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [1, 2]  # a and c together; the cancelled rows skipped


def test_the_rest_of_a_request_whose_first_part_failed_never_runs() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate, fail=lambda x: x.shape[0] == 4)
    seen: list[tuple[int, int]] = []
    b = Batcher([be], settings(max_batch_size=4), on_batch=lambda n, padded: seen.append((n, padded)))
    first = blocked(be, b)
    doomed = b.submit({"x": rows(6)}, 6)  # 4 rows (they fail), then 2 more
    after = b.submit({"x": rows(1, 10)}, 1)
    gate.set()
    with pytest.raises(BackendError, match=r"^scripted failure$"):
        doomed.result(WAIT)
    np.testing.assert_array_equal(after.result(WAIT)["y"], rows(1, 10) * 2)
    first.result(WAIT)  # type: ignore[attr-defined]
    b.close()
    assert be.batches == [1, 4, 1]  # the doomed request's last 2 rows were dropped, not run with `after`
    assert seen == [(1, 1), (4, 4), (1, 1)]  # a failed batch is counted with its rows too
    assert b.queue_depth == 0


class HookBackend(FakeBackend):
    """Before a batch of n rows runs, sets ``starts[n]`` and waits for ``hooks[n]``; fails the batches
    whose size is in ``fail``. Every batch that starts releases ``running`` (shared by the backends)."""

    def __init__(
        self,
        hooks: dict[int, threading.Event],
        fail: set[int],
        running: threading.Semaphore,
        starts: dict[int, threading.Event],
    ) -> None:
        super().__init__()
        self.hooks = hooks
        self.starts = starts
        self.fail_sizes = fail
        self.running = running

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["x"]
        self.batches.append(x.shape[0])
        self.running.release()
        if x.shape[0] in self.starts:
            self.starts[x.shape[0]].set()
        hook = self.hooks.get(x.shape[0])
        if hook is not None:
            assert hook.wait(WAIT)
        if x.shape[0] in self.fail_sizes:
            raise BackendError("scripted failure")
        return {"y": x * 2}


@pytest.mark.parametrize("case", ["tail first", "head fails first", "both fail"])
def test_the_parts_of_a_request_on_two_workers_in_either_order(case: str) -> None:
    """A 6-row request over batches of 4: its head (4 rows) on one worker, its tail (2 rows) with the
    next request (1 row) on the other, finishing in the order ``case`` says."""
    gate, head_may_run, tail_may_run, tail_started = (threading.Event() for _ in range(4))
    hooks = {1: gate}  # the two 1-row blockers, one per worker
    if case == "tail first":
        hooks[4] = head_may_run
        fail: set[int] = set()
    else:  # the head fails once the tail is taken; the tail runs once the request has failed
        hooks[4] = tail_started
        hooks[3] = tail_may_run
        fail = {4} if case == "head fails first" else {4, 3}
    running = threading.Semaphore(0)
    starts = {3: tail_started}
    backends = [HookBackend(hooks, fail, running, starts), HookBackend(hooks, fail, running, starts)]
    b = Batcher(backends, settings(max_batch_size=4, num_batch_threads=2))
    blockers = [b.submit({"x": rows(1, 1000)}, 1)]
    assert running.acquire(timeout=WAIT)
    blockers.append(b.submit({"x": rows(1, 2000)}, 1))
    assert running.acquire(timeout=WAIT)  # both workers busy
    big = b.submit({"x": rows(6)}, 6)
    small = b.submit({"x": rows(1, 10)}, 1)
    small.add_done_callback(lambda _: head_may_run.set())
    big.add_done_callback(lambda _: tail_may_run.set())
    gate.set()
    if case == "tail first":
        np.testing.assert_array_equal(small.result(WAIT)["y"], rows(1, 10) * 2)
        np.testing.assert_array_equal(big.result(WAIT)["y"], rows(6) * 2)  # reassembled in order
    else:
        with pytest.raises(BackendError, match=r"^scripted failure$"):
            big.result(WAIT)
        if case == "head fails first":
            np.testing.assert_array_equal(small.result(WAIT)["y"], rows(1, 10) * 2)
        else:
            with pytest.raises(BackendError, match=r"^scripted failure$"):
                small.result(WAIT)
    for f in blockers:
        f.result(WAIT)
    b.close()
    assert sorted(n for be in backends for n in be.batches) == [1, 1, 3, 4]


def test_callers_on_a_closed_event_loop_cost_the_worker_nothing() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    b = Batcher([be], settings(max_batch_size=8))
    first = blocked(be, b)

    async def enqueue() -> object:
        return b.submit_async({"x": rows(1)}, 1)  # not awaited: its loop closes before the answer

    loop = asyncio.new_event_loop()
    loop.run_until_complete(enqueue())
    loop.close()
    gate.set()
    first.result(WAIT)  # type: ignore[attr-defined]
    # the worker delivered to a closed loop and lives on
    np.testing.assert_array_equal(b.submit({"x": rows(2)}, 2).result(WAIT)["y"], rows(2) * 2)
    b.close()
    assert be.batches == [1, 1, 2]


def test_a_failure_while_handing_out_the_answers_is_reported_with_its_cause() -> None:
    be = PhaseBackend("split")  # the second half of the split request names its output differently
    b = Batcher([be], settings(max_batch_size=4))
    with pytest.raises(BackendError) as e:
        b.submit({"x": rows(6)}, 6).result(WAIT)
    assert e.value.message == "the model failed to run: KeyError: 'y'"
    b.close()


def test_an_engine_crash_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    crash = OutputBackend(lambda y: (_ for _ in ()).throw(ValueError("bad weights")))
    b = Batcher([crash], settings())
    with caplog.at_level("ERROR", logger="edgekit_runtime.batching"):
        with pytest.raises(BackendError):
            b.submit({"x": rows(3)}, 3).result(WAIT)
        b.close()
    (record,) = caplog.records
    assert record.getMessage() == "batch of 3 rows failed"
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError


def test_close_from_a_worker_thread_does_not_wait_for_itself(caplog: pytest.LogCaptureFixture) -> None:
    be = FakeBackend()
    closed: list[bool] = []
    be.close = lambda: closed.append(True)  # type: ignore[method-assign]
    box: list[Batcher] = []
    b = Batcher([be], settings(), on_batch=lambda n, padded: box[0].close())
    box.append(b)
    with caplog.at_level("ERROR", logger="edgekit_runtime.batching"):
        np.testing.assert_array_equal(b.submit({"x": rows(2)}, 2).result(WAIT)["y"], rows(2) * 2)
    assert closed == [True]  # closed from the callback, on the worker's own thread
    assert caplog.records == []
    with pytest.raises(UnavailableError):
        b.submit({"x": rows(1)}, 1)


def test_close_returns_once_the_workers_have_finished_the_queue() -> None:
    gate = threading.Event()
    be = FakeBackend(gate=gate)
    order: list[str] = []
    be.close = lambda: order.append("backend closed")  # type: ignore[method-assign]
    b = Batcher([be], settings())
    first = blocked(be, b)
    queued = b.submit({"x": rows(3)}, 3)
    queued.add_done_callback(lambda _: order.append("answered"))

    def open_gate_once_closing() -> None:
        while not b._closed:
            threading.Event().wait(0.01)
        gate.set()

    opener = threading.Thread(target=open_gate_once_closing)
    opener.start()
    b.close()
    opener.join(WAIT)
    assert queued.done()
    assert order == ["answered", "backend closed"]
    assert all(not t.is_alive() for t in b._threads)
    first.result(WAIT)  # type: ignore[attr-defined]


def test_a_sub_second_timeout_waits_for_company_too() -> None:
    # the batcher's clock stands still: the timeout never runs out, only rows can close the batch
    be = FakeBackend()
    half_a_second = settings(max_batch_size=4, batch_timeout_micros=500_000, batch_timeout_policy="fixed")
    b = Batcher([be], half_a_second, clock=lambda: 1000.0)
    first = b.submit({"x": rows(1)}, 1)
    assert not be.started.wait(0.3)  # waiting for company, not run at once
    rest = [b.submit({"x": rows(1, i)}, 1) for i in range(1, 4)]
    for i, f in enumerate([first, *rest]):
        np.testing.assert_array_equal(f.result(WAIT)["y"], rows(1, i) * 2)
    assert be.batches == [4]
    b.close()


def test_batch_sizes_refuse_allowed_sizes_that_do_not_fit_a_fixed_batch() -> None:
    with pytest.raises(InvalidInputError, match="multiples of the model's fixed batch 2"):
        batch_sizes(settings(max_batch_size=8, allowed_batch_sizes=[3, 8]), FakeBackend(fixed=2))


def test_an_unnamed_batchers_threads_are_named_model() -> None:
    b = Batcher([FakeBackend()], settings())
    assert [t.name for t in b._threads] == ["edgekit-batch-model-0"]
    b.close()
