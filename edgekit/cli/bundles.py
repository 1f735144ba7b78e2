"""`edgekit inspect` and `edgekit bench`: look at a bundle and measure it on this host."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.table import Table

from edgekit.cli._output import console, emit_json, json_option_help
from edgekit_runtime.backends import load_backend
from edgekit_runtime.bundle import read_bundle
from edgekit_runtime.latency import measure


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help=json_option_help)
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's manifest: signature, quantization, profile, validation results."""
    b = read_bundle(bundle)
    m = b.manifest
    if as_json:
        emit_json({**m.model_dump(mode="json"), "signed": b.signature is not None})
        return
    console.print(
        f"[bold]{m.name}[/bold] v{m.version}  {m.format} / {m.quantization}  profile [bold]{m.profile.name}[/bold]"
    )
    console.print(
        f"model {m.model_file}: {_fmt_bytes(m.model_size_bytes)}  sha256 {m.model_sha256[:16]}…  "
        f"signed: {'yes' if b.signature else 'no'}  created {m.created}"
    )
    table = Table(title="signature")
    for col in ("", "name", "dtype", "shape", "quantization (scale, zero point)"):
        table.add_column(col)
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            q = f"{s.quantization.scale[0]:.6g}, {s.quantization.zero_point[0]}" if s.quantization else "-"
            table.add_row(kind, s.name, s.dtype, str(s.shape), q)
    console.print(table)
    if m.validation:
        vt = Table(title="validation (at conversion)", show_header=False)
        vt.add_column("metric", style="bold")
        vt.add_column("value")
        for key, value in m.validation.items():
            if key != "budgets":
                vt.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(vt)
        checks = m.validation.get("budgets") or []
        if checks:
            bt = Table(title="budgets (at conversion)")
            for col in ("budget", "limit", "measured", "result"):
                bt.add_column(col)
            for c in checks:
                measured = "-" if c.get("value") is None else f"{c['value']:.4g}{c.get('unit', '')}"
                result = {True: "[green]ok[/green]", False: "[red]FAILED[/red]"}.get(c.get("ok"), "not measured")
                bt.add_row(str(c.get("budget")), f"{c.get('limit')}{c.get('unit', '')}", measured, result)
            console.print(bt)
        if m.validation.get("trustworthy") is False:
            console.print("[yellow]validated on synthetic data: accuracy numbers are not trustworthy[/yellow]")
    if m.calibration:
        console.print("calibration: " + ", ".join(f"{k}={v}" for k, v in m.calibration.items()))
        if m.calibration.get("trustworthy") is False:
            console.print("[yellow]calibrated on synthetic data: accuracy is not trustworthy[/yellow]")
    rt = m.profile.runtime
    console.print(
        f"runtime: threads={rt.threads} delegates={rt.delegates} providers={rt.execution_providers} "
        f"batching={rt.batching.model_dump()}"
    )
    if m.golden:
        console.print(f"golden samples: {m.golden.count} (atol {m.golden.atol:g})")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--batch-size",
    "-b",
    "batch_sizes",
    type=click.IntRange(min=1),
    multiple=True,
    help="batch sizes to measure (repeatable); default 1 and the profile's max batch size",
)
@click.option(
    "--seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="time budget per batch size"
)
@click.option("--threads", type=click.IntRange(min=0), default=None, help="override the profile's engine threads")
@click.option("--json", "as_json", is_flag=True, help=json_option_help)
def bench(bundle: Path, batch_sizes: tuple[int, ...], seconds: float, threads: int | None, as_json: bool) -> None:
    """Measure latency percentiles and throughput per batch size of a bundle on this host."""
    b = read_bundle(bundle)
    settings = b.manifest.profile.runtime
    if threads is not None:
        settings = settings.model_copy(update={"threads": threads})
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / b.manifest.model_file
        model_path.write_bytes(b.model)
        backend = load_backend(b.manifest.format, model_path, settings)
        fixed = backend.fixed_batch
        sizes = batch_sizes or tuple(sorted({1, settings.batching.max_batch_size}))
        rows = []
        with console.status("measuring…"):
            for bs in sizes:
                if fixed is not None and bs % fixed:
                    continue
                rows.append(measure(backend, bs, budget_s=seconds).as_dict())
    result = {
        "bundle": str(bundle),
        "format": b.manifest.format,
        "quantization": b.manifest.quantization,
        "threads": settings.threads,
        "accelerators": backend.accelerators,
        "notes": backend.notes,
        "results": rows,
    }
    if as_json:
        emit_json(result)
        return
    for note in backend.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    table = Table(
        title=f"{b.manifest.name} v{b.manifest.version} ({b.manifest.format}/{b.manifest.quantization}), "
        f"threads={settings.threads or 'default'}"
    )
    for col in ("batch", "runs", "p50 ms", "p95 ms", "p99 ms", "rows/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch_size"]),
            str(r["runs"]),
            f"{r['p50_ms']:.3f}",
            f"{r['p95_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['rows_per_s']:.1f}",
        )
    console.print(table)
