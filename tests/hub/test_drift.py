"""The drift check's latency rule (edgekit/hub/drift.py): the engine's live p95 against the p95 the
converter measured, at the nearest batch size; over 3x and at least 1 ms more is a flag."""

from __future__ import annotations

from typing import Any

from edgekit.hub.drift import DriftTracker, reference_from_manifest


def interval(engine_p95_ms: float, batches: int = 30, rows: int = 30) -> dict[str, Any]:
    return {"model": "digits", "version": 1, "requests": batches, "rows": rows, "batch_sizes": {"1": batches},
            "engine_p95_ms": engine_p95_ms}  # fmt: skip


REF = reference_from_manifest({"validation": {"latency_p95_ms_b1": 0.025, "latency_p95_ms_b32": 0.4}})


def test_a_sub_millisecond_model_a_few_tenths_of_a_ms_slower_is_not_flagged() -> None:
    # what the demo's devices showed: the runtime's per-batch work around a 0.025 ms engine run
    verdict = DriftTracker().judge("pi-1", interval(0.3), REF)
    assert verdict == {"drift": False, "reasons": [], "figures": {"engine_p95_ms": 0.3, "validation_p95_ms": 0.025}}


def test_a_run_over_three_times_and_a_millisecond_slower_is_flagged_with_its_numbers() -> None:
    verdict = DriftTracker().judge("pi-1", interval(2.5), REF)
    assert verdict is not None and verdict["drift"] is True
    assert verdict["reasons"] == [
        "latency: the engine's p95 2.5 ms per batch over 30 batches (1.0 rows each) against 0.025 ms at batch "
        "size 1 at conversion (100.0x, threshold 3x and 1 ms)"
    ]


def test_the_reference_is_the_measured_batch_size_nearest_the_live_batches() -> None:
    # 30 rows per batch: compared with the batch-32 figure (0.4 ms), so 1.3 ms is 3.25x and 0.9 ms more
    kept = DriftTracker().judge("pi-1", interval(1.3, batches=30, rows=900), REF)
    assert kept is not None and kept["drift"] is False
    flagged = DriftTracker().judge("pi-1", interval(1.5, batches=30, rows=900), REF)
    assert flagged is not None and flagged["drift"] is True and "at batch size 32" in flagged["reasons"][0]


def test_too_few_batches_is_no_verdict() -> None:
    assert DriftTracker().judge("pi-1", interval(50.0, batches=5, rows=5), REF) is None
