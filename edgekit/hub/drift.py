"""Drift: does a device's model behave as it did in validation? The hub compares each device's recent
telemetry (the last WINDOW intervals of a model version) with the figures the converter recorded in
the bundle's manifest (``validation``: the output summary of the validation data, the measured
latency, the accuracy), and flags what departs, with the numbers:

- **class distribution** (classifiers): the total variation distance between the live predicted-class
  shares and the validation shares, 0.5 * sum |p - q| (0 = the same, 1 = disjoint; "a share d of the
  predictions moved class"), over at least ``min_rows`` rows;
- **output shift** (other models): per output, how far the live mean moved, in validation standard
  deviations, and the ratio of the live to the validation standard deviation;
- **latency**: the engine's live p95 per batch (the batch-weighted mean of the intervals'
  ``engine_p95_ms``: the model's run alone, without queueing, batching waits or HTTP) against the
  manifest's p95 measured at conversion for the profile, at the measured batch size nearest the
  live mean batch;
- **live accuracy**: from ground-truth feedback, against the converted model's validation accuracy.

Several ingestion workers each judge the messages they receive: a random share of a device's
telemetry, still a fair sample of it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DriftSettings", "DriftTracker", "Reference", "reference_from_manifest"]

#: Intervals of a device's model version judged together (2 minutes at the default 10 s).
WINDOW = 12


@dataclass(frozen=True)
class DriftSettings:
    class_distance: float = 0.25
    mean_shift: float = 1.0  # validation standard deviations
    std_ratio: float = 2.0
    latency_factor: float = 3.0
    latency_margin_ms: float = 1.0  # ... and at least this much slower: a sub-millisecond model's
    # run is dominated by the runtime's own per-batch work (copies, the interpreter call), which
    # the converter's bare-engine figure leaves out: 0.3 ms against 0.025 ms is "12x" and nothing
    accuracy_drop: float = 10.0  # percentage points
    min_rows: int = 100
    min_requests: int = 20
    min_feedback: int = 20


@dataclass(frozen=True)
class Reference:
    """What validation measured for one model version and profile."""

    classes: dict[int, float] | None = None  # class -> share
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # output -> (mean, std)
    p95_ms: dict[int, float] = field(default_factory=dict)  # batch size -> engine p95 at conversion
    accuracy: float | None = None  # percent

    def p95_for(self, rows_per_batch: float) -> tuple[int, float] | None:
        """The measured (batch size, p95) nearest ``rows_per_batch`` (on a log scale)."""
        if not self.p95_ms:
            return None
        bs = min(self.p95_ms, key=lambda b: abs(math.log(b) - math.log(max(rows_per_batch, 1.0))))
        return bs, self.p95_ms[bs]


def reference_from_manifest(manifest: dict[str, Any]) -> Reference | None:
    validation = manifest.get("validation") or {}
    if not isinstance(validation, dict):
        return None
    out = validation.get("outputs") or {}
    classes = None
    numeric: dict[str, tuple[float, float]] = {}
    if isinstance(out, dict) and out.get("kind") == "classes" and isinstance(out.get("classes"), dict):
        counts = {int(k): float(v) for k, v in out["classes"].items()}
        total = sum(counts.values())
        classes = {k: v / total for k, v in counts.items()} if total else None
    elif isinstance(out, dict) and out.get("kind") == "numeric" and isinstance(out.get("outputs"), dict):
        for name, fig in out["outputs"].items():
            if (
                isinstance(fig, dict)
                and isinstance(fig.get("mean"), int | float)
                and isinstance(fig.get("std"), int | float)
            ):
                numeric[name] = (float(fig["mean"]), float(fig["std"]))
    p95: dict[int, float] = {}
    for key, value in validation.items():
        bs = key.removeprefix("latency_p95_ms_b")
        if key.startswith("latency_p95_ms_b") and bs.isdigit() and isinstance(value, int | float) and value > 0:
            p95[int(bs)] = float(value)
    acc = validation.get("accuracy_converted")
    ref = Reference(
        classes=classes,
        numeric=numeric,
        p95_ms=p95,
        accuracy=float(acc) if isinstance(acc, int | float) else None,
    )
    if ref.classes is None and not ref.numeric and not ref.p95_ms and ref.accuracy is None:
        return None
    return ref


class _Recent:
    """The last WINDOW intervals of one device's model version, kept compact (what the checks sum)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        # per interval: class counts, numeric (output -> (count, mean, std)), engine p95, batches,
        # feedback rows and correct, rows
        self.items: deque[tuple[dict[int, int], dict[str, tuple[int, float, float]], float | None, int, int, int, int]]
        self.items = deque(maxlen=WINDOW)

    def add(self, fig: dict[str, Any]) -> None:
        out = fig.get("outputs") or {}
        classes: dict[int, int] = {}
        numeric: dict[str, tuple[int, float, float]] = {}
        if out.get("kind") == "classes":
            classes = {int(k): int(v) for k, v in (out.get("classes") or {}).items()}
        elif out.get("kind") == "numeric":
            for name, f in (out.get("outputs") or {}).items():
                n = int(f.get("count", 0))
                if n > 0:
                    numeric[name] = (n, float(f.get("mean", 0.0)), float(f.get("std", 0.0)))
        fb = fig.get("feedback") or {}
        rows, correct = (int(fb.get("rows", 0)), int(fb.get("correct", 0))) if "correct" in fb else (0, 0)
        p95 = fig.get("engine_p95_ms")
        batches = sum(int(v) for v in (fig.get("batch_sizes") or {}).values())
        self.items.append((classes, numeric, None if p95 is None else float(p95), batches, rows, correct,
                           int(fig.get("rows") or 0)))  # fmt: skip

    def classes(self) -> tuple[dict[int, int], int]:
        counts: dict[int, int] = {}
        for classes, *_ in self.items:
            for k, v in classes.items():
                counts[k] = counts.get(k, 0) + v
        return counts, sum(counts.values())

    def numeric(self) -> dict[str, tuple[float, float, int]]:
        acc: dict[str, list[float]] = {}
        for _, numeric, *_rest in self.items:
            for name, (n, mean, std) in numeric.items():
                a = acc.setdefault(name, [0.0, 0.0, 0.0])
                a[0] += n
                a[1] += mean * n
                a[2] += (std * std + mean * mean) * n
        result = {}
        for name, (total, s, ss) in acc.items():
            m = s / total
            result[name] = (m, math.sqrt(max(0.0, ss / total - m * m)), int(total))
        return result

    def p95(self) -> tuple[float | None, int, float]:
        """(batch-weighted engine p95, batches, mean rows per batch)."""
        weighted, batches, rows = 0.0, 0, 0
        for _, _, p, b, _fb, _ok, r in self.items:
            if p is not None and b > 0:
                weighted += p * b
                batches += b
                rows += r
        return (weighted / batches if batches else None), batches, (rows / batches if batches else 0.0)

    def feedback(self) -> tuple[int, int]:
        return sum(i[4] for i in self.items), sum(i[5] for i in self.items)


class DriftTracker:
    """Recent telemetry per (device, model, version) and the verdict on it."""

    def __init__(self, settings: DriftSettings | None = None) -> None:
        self.settings = settings or DriftSettings()
        self._recent: dict[tuple[str, str, int], _Recent] = {}

    def judge(self, device: str, fig: dict[str, Any], ref: Reference | None) -> dict[str, Any] | None:
        """Add one interval (a TelemetryModel as a dict); the verdict, or None when there is not
        enough data yet (the last verdict stands). ``{"drift": bool, "reasons": [...], "figures": {...}}``."""
        key = (device, str(fig.get("model")), int(fig.get("version") or 0))
        recent = self._recent.setdefault(key, _Recent())
        recent.add(fig)
        if ref is None:
            return None
        s = self.settings
        reasons: list[str] = []
        figures: dict[str, Any] = {}
        decided = False
        if ref.classes is not None:
            counts, rows = recent.classes()
            if rows >= s.min_rows:
                decided = True
                live = {k: v / rows for k, v in counts.items()}
                keys = set(live) | set(ref.classes)
                tvd = 0.5 * sum(abs(live.get(k, 0.0) - ref.classes.get(k, 0.0)) for k in keys)
                figures["class_distance"] = round(tvd, 4)
                figures["rows"] = rows
                if tvd > s.class_distance:
                    top = max(live, key=lambda k: live[k])
                    reasons.append(
                        f"class distribution moved: distance {tvd:.2f} over {rows} rows (threshold "
                        f"{s.class_distance:g}); class {top} is {live[top]:.0%} of live predictions, "
                        f"{ref.classes.get(top, 0.0):.0%} in validation"
                    )
        live_numeric = recent.numeric() if ref.numeric else {}
        for name, (vmean, vstd) in ref.numeric.items():
            live_fig = live_numeric.get(name)
            if live_fig is None or live_fig[2] < s.min_rows:
                continue
            decided = True
            lmean, lstd, n = live_fig
            scale = vstd if vstd > 1e-12 else max(abs(vmean), 1e-12)
            shift = abs(lmean - vmean) / scale
            ratio = lstd / vstd if vstd > 1e-12 else (1.0 if lstd <= 1e-12 else math.inf)
            figures.setdefault("outputs", {})[name] = {"mean_shift": round(shift, 3), "std_ratio": round(ratio, 3)}
            if shift > s.mean_shift or ratio > s.std_ratio or ratio < 1 / s.std_ratio:
                reasons.append(
                    f"output {name} shifted: mean {lmean:.4g} against {vmean:.4g} in validation "
                    f"({shift:.1f} std), std {lstd:.4g} against {vstd:.4g} ({ratio:.2f}x) over {n} values"
                )
        p95, batches, per_batch = recent.p95()
        nearest = ref.p95_for(per_batch)
        if nearest is not None and p95 is not None and batches >= s.min_requests:
            decided = True
            bs, ref_p95 = nearest
            figures["engine_p95_ms"] = round(p95, 4)
            figures["validation_p95_ms"] = ref_p95
            if p95 > s.latency_factor * ref_p95 and p95 - ref_p95 >= s.latency_margin_ms:
                reasons.append(
                    f"latency: the engine's p95 {p95:.3g} ms per batch over {batches} batches ({per_batch:.1f} rows "
                    f"each) against {ref_p95:.3g} ms at batch size {bs} at conversion ({p95 / ref_p95:.1f}x, "
                    f"threshold {s.latency_factor:g}x and {s.latency_margin_ms:g} ms)"
                )
        rows, correct = recent.feedback()
        if ref.accuracy is not None and rows >= s.min_feedback:
            decided = True
            live_acc = 100.0 * correct / rows
            figures["accuracy"] = round(live_acc, 2)
            figures["validation_accuracy"] = ref.accuracy
            if live_acc < ref.accuracy - s.accuracy_drop:
                reasons.append(
                    f"live accuracy {live_acc:.1f}% over {rows} labelled rows against {ref.accuracy:.1f}% in "
                    f"validation (more than {s.accuracy_drop:g} points lower)"
                )
        if not decided:
            return None
        return {"drift": bool(reasons), "reasons": reasons, "figures": figures}
