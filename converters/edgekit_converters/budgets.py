"""A profile's budgets against a converted model's measurements: size, accuracy, agreement, latency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.errors import BudgetError
from edgekit.profiles import Budgets


@dataclass(frozen=True)
class BudgetCheck:
    """One budget: its key in the profile, the measured value, the limit and whether it held."""

    budget: str
    value: float | None
    limit: float
    ok: bool | None  # None: not measured (e.g. accuracy without labels)
    unit: str = ""

    def describe(self) -> str:
        if self.value is None:
            return f"{self.budget}: not measured (limit {self.limit:g}{self.unit})"
        return f"{self.budget} = {self.limit:g}{self.unit}: measured {self.value:.4g}{self.unit}"

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "value": self.value, "limit": self.limit, "ok": self.ok, "unit": self.unit}


def check(budgets: Budgets, size_bytes: int, metrics: dict[str, Any]) -> list[BudgetCheck]:
    """Every budget the profile sets, measured or not."""
    checks: list[BudgetCheck] = []

    def at_most(key: str, value: float | None, limit: float | None, unit: str = "") -> None:
        if limit is not None:
            checks.append(BudgetCheck(key, value, limit, None if value is None else value <= limit, unit))

    def at_least(key: str, value: float | None, limit: float | None) -> None:
        if limit is not None:
            checks.append(BudgetCheck(key, value, limit, None if value is None else value >= limit))

    at_most("max_model_size_mb", size_bytes / 1e6, budgets.max_model_size_mb, " MB")
    at_most("max_accuracy_drop_points", metrics.get("accuracy_drop_points"), budgets.max_accuracy_drop_points)
    at_least("min_top1_agreement", metrics.get("top1_agreement"), budgets.min_top1_agreement)
    at_least("min_cosine_similarity", metrics.get("cosine_similarity"), budgets.min_cosine_similarity)
    at_most("max_latency_ms_p50", metrics.get("latency_p50_ms_b1"), budgets.max_latency_ms_p50, " ms")
    return checks


def failures(checks: list[BudgetCheck]) -> list[BudgetCheck]:
    return [c for c in checks if c.ok is False]


def enforce(failed: dict[str, list[BudgetCheck]]) -> None:
    """BudgetError naming each broken budget, its value and limit, per profile."""
    if not any(failed.values()):
        return
    parts = [f"{profile}: " + "; ".join(c.describe() for c in checks) for profile, checks in failed.items() if checks]
    msg = (
        "budget exceeded (no bundle written for these profiles): "
        + " | ".join(parts)
        + ". Fix the model or the profile's [budgets], or pass --no-strict to write the bundle anyway"
    )
    raise BudgetError(msg)
