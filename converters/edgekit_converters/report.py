"""The human-readable conversion report: one table per profile with its budgets beside the numbers."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from edgekit_converters.budgets import BudgetCheck
from edgekit_converters.pipeline import ProfileResult, Report

# metric key -> (label, format, budget key)
_ROWS: list[tuple[str, str, str, str | None]] = [
    ("accuracy_source", "accuracy, source (%)", "{:.2f}", None),
    ("accuracy_converted", "accuracy, converted (%)", "{:.2f}", None),
    ("accuracy_drop_points", "accuracy drop (points)", "{:+.2f}", "max_accuracy_drop_points"),
    ("top1_agreement", "top-1 agreement", "{:.4f}", "min_top1_agreement"),
    ("cosine_similarity", "cosine similarity", "{:.6f}", "min_cosine_similarity"),
    ("sqnr_db", "SQNR (dB)", "{:.1f}", None),
    ("max_abs_error", "max abs error", "{:.3g}", None),
]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _budget(check: BudgetCheck | None) -> str:
    if check is None:
        return ""
    op = "≤" if check.budget.startswith("max") else "≥"
    limit = f"{op} {check.limit:g}{check.unit}"
    if check.ok is None:
        return f"[dim]{limit} (not measured)[/dim]"
    return f"[green]{limit} ok[/green]" if check.ok else f"[bold red]{limit} FAILED[/bold red]"


def _table(r: ProfileResult, strict: bool) -> Table:
    checks = {c.budget: c for c in r.checks}
    where = str(r.bundle) if r.bundle else ("no bundle (budget failed)" if strict else "no bundle")
    table = Table(title=f"[bold]{r.profile}[/bold]: {r.format} {r.quantization} → {where}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("budget")
    m = r.metrics
    table.add_row("model size", fmt_bytes(r.size_bytes), _budget(checks.get("max_model_size_mb")))
    table.add_row("conversion time", f"{r.conversion_s:.1f} s", "")
    for key, label, form, budget in _ROWS:
        value = m.get(key)
        if value is not None:
            table.add_row(label, form.format(value), _budget(checks.get(budget) if budget else None))
        elif budget and budget in checks:
            table.add_row(label, "-", _budget(checks[budget]))
    for key in sorted(k for k in m if k.startswith("latency_p50_ms_b")):
        bs = key.removeprefix("latency_p50_ms_b")
        latency_budget = checks.get("max_latency_ms_p50") if bs == "1" else None
        table.add_row(
            f"host latency p50 / p95, batch {bs}",
            f"{m[key]:.3f} / {m[f'latency_p95_ms_b{bs}']:.3f} ms",
            _budget(latency_budget),
        )
    if "tensor_arena_kb" in r.facts:
        table.add_row("tensor arena (estimate)", f"{r.facts['tensor_arena_kb']:.1f} KB", "")
    table.add_row(
        "validated on", f"{m.get('samples')} samples", "[yellow]synthetic![/yellow]" if not m.get("trustworthy") else ""
    )
    return table


def _tries(r: ProfileResult) -> Table:
    """--quantization auto: every try, in order, with its size, latency, accuracy and verdict."""
    table = Table(title=f"[bold]{r.profile}[/bold]: --quantization auto, tries in order", title_justify="left")
    for column in ("mode", "layers in float", "size", "p50 ms (b1)", "accuracy", "verdict"):
        table.add_column(column, justify="right" if column in {"size", "p50 ms (b1)"} else "left")
    assert r.search is not None
    for t in r.search["tries"]:
        size = fmt_bytes(t["size_bytes"]) if t.get("size_bytes") is not None else "-"
        latency = f"{t['latency_p50_ms_b1']:.3f}" if t.get("latency_p50_ms_b1") is not None else "-"
        accuracy = f"{t['accuracy_kind']} {t['accuracy']:g}" if t.get("accuracy") is not None else "-"
        verdict = t.get("error") or t["verdict"]
        verdict = f"[bold green]chosen: {verdict}[/bold green]" if t.get("chosen") else verdict
        table.add_row(t["mode"], str(len(t["float_layers"])), size, latency, accuracy, verdict)
    return table


def render(report: Report, console: Console) -> None:
    s = report.source
    console.print(
        f"source [bold]{s['path']}[/bold] ({s['format']}, {fmt_bytes(s['size_bytes'])}); "
        f"validation: {s['validation_samples']} samples from {s['validation_data']}"
        + (" with labels" if s["validation_labels"] else " (no labels: no task accuracy)")
    )
    for note in report.data_notes:
        style = "yellow" if "NOT trustworthy" in note else "dim"
        console.print(f"[{style}]note: {note}[/{style}]")
    for r in report.results:
        if r.search is not None:
            console.print(_tries(r))
        console.print(_table(r, report.strict))
        for note in r.notes:
            console.print(f"  [yellow]note:[/yellow] {note}")
    for f in report.failed:
        console.print(
            f"[bold]{f.profile}[/bold]: {f.format} {f.quantization} → [bold red]no bundle[/bold red] "
            "(the engine failed; the error follows)"
        )
    failures = report.budget_failures
    if failures and not report.strict:
        for profile, checks in failures.items():
            for c in checks:
                console.print(
                    f"[yellow]warning:[/yellow] {profile}: budget {c.describe()} (--no-strict: bundle written)"
                )


def summary(report: Report) -> dict[str, Any]:
    return report.as_dict()
