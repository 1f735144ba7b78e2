"""`edgekit fleet`, `edgekit fleet show DEVICE`, `edgekit telemetry export`: the fleet's health from
the hub's stored telemetry, through its HTTP API (docs/telemetry.md)."""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgekit.cli._output import console, emit_json
from edgekit.cli.fleet import _client, _hub_options, _json_option
from edgekit.errors import InvalidInputError, MissingDependencyError
from edgekit.hub.telemetry import EXPORT_COLUMNS

__all__ = ["COMMANDS", "fleet", "parse_since", "sparkline", "telemetry"]

_BARS = "▁▂▃▄▅▆▇█"
#: Past this many rows `edgekit fleet` prints plain aligned columns instead of a rich table.
PLAIN_ROWS = 200


def sparkline(values: list[float | None]) -> str:
    """One character per value, scaled between the series' min and max; a gap for None."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif hi == lo:
            out.append(_BARS[0] if hi == 0 else _BARS[3])
        else:
            out.append(_BARS[round((v - lo) / (hi - lo) * (len(_BARS) - 1))])
    return "".join(out)


def parse_since(value: str, now: float | None = None) -> float:
    """``1h``/``30m``/``2d`` ago, unix seconds, or an ISO 8601 time (UTC unless it says) -> unix seconds."""
    from edgekit.hub.fleet import parse_duration

    now = time.time() if now is None else now
    text = value.strip()
    if text and text[-1] in "smhd" and text[:-1].replace(".", "", 1).isdigit():
        return now - parse_duration(text, "--since")
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        msg = f"--since {value!r}: give a duration ago (30m, 1h, 2d), unix seconds, or a time like 2026-12-01T10:00:00Z"
        raise InvalidInputError(msg) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0.0, now - t)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _labels_match(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


def _parse_labels(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            msg = f"--label {item!r}: give KEY=VALUE, e.g. site=lab"
            raise InvalidInputError(msg)
        out[k] = v
    return out


@click.group(invoke_without_command=True)
@click.option("--label", "labels", multiple=True, help="only devices with this KEY=VALUE label (repeatable)")
@click.option("--model", help="only rows of this model (NAME or NAME:VERSION)")
@click.option("--offline", "only_offline", is_flag=True, help="only devices that are offline")
@_hub_options
@_json_option
@click.pass_context
def fleet(  # noqa: PLR0917 - click passes every option as an argument
    ctx: click.Context,
    labels: tuple[str, ...],
    model: str | None,
    only_offline: bool,
    hub_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """The fleet at a glance: per device and model its labels, profile, version, online, p95 latency,
    requests per second and error rate of its newest telemetry interval, and when it was last seen.
    `edgekit fleet show DEVICE` shows one device's recent history."""
    if ctx.invoked_subcommand is not None:
        return
    wanted = _parse_labels(labels)
    name, _, version = (model or "").partition(":")
    if version and not version.isdigit():
        msg = f"--model {model!r}: give NAME or NAME:VERSION, e.g. digits:2"
        raise InvalidInputError(msg)
    with _client(ctx) as client:
        rows = client.fleet()
    rows = [
        r
        for r in rows
        if _labels_match(r["labels"], wanted)
        and (not name or r["model"] == name)
        and (not version or r["version"] == int(version))
        and (not only_offline or not r["online"])
    ]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        console.print("no device matches" if (wanted or model or only_offline) else "no device has registered yet")
        return
    now = time.time()
    columns = ("device", "labels", "profile", "model", "version", "online", "p95 ms", "req/s", "error %", "drift",
               "last seen")  # fmt: skip
    right = {"p95 ms", "req/s", "error %"}
    cells = [
        (
            r["device"],
            ", ".join(f"{k}={v}" for k, v in sorted(r["labels"].items())),
            r["profile"] or "-",
            r["model"] or "-",
            "-" if r["version"] is None else f"v{r['version']}",
            "yes" if r["online"] else "no",
            _num(r["p95_ms"], "{:.2f}"),
            _num(r["req_per_s"]),
            _num(r["error_pct"]),
            "-" if r.get("drift") is None else ("DRIFT" if r["drift"] else "ok"),
            _ago(r["last_seen"], now),
        )
        for r in rows
    ]
    title = f"fleet: {len({r['device'] for r in rows})} device(s)"
    if len(cells) > PLAIN_ROWS:
        # rich lays out every cell of a table before printing it (seconds for 10,000 rows): plain
        # aligned columns instead, as fast as the rows can be written
        widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]

        def line(values: tuple[str, ...]) -> str:
            return "  ".join(
                v.rjust(w) if col in right else v.ljust(w) for v, w, col in zip(values, widths, columns, strict=True)
            )

        out = [title, line(columns), *(line(c) for c in cells)]
        click.echo("\n".join(out), err=True)
    else:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, justify="right" if col in right else "left")
        for c in cells:
            styled = list(c)
            styled[5] = "yes" if c[5] == "yes" else "[red]no[/red]"
            styled[9] = "[red]DRIFT[/red]" if c[9] == "DRIFT" else c[9]
            table.add_row(*styled)
        console.print(table)
    for r in rows:
        for reason in r.get("drift_reasons") or []:
            console.print(f"[red]drift[/red] {r['device']} {r['model']} v{r['version']}: {reason}", soft_wrap=True)


@fleet.command("show")
@click.argument("device")
@click.option("--limit", type=click.IntRange(1, 10_000), default=60, show_default=True, help="intervals per model")
@_hub_options
@_json_option
@click.pass_context
def show(  # noqa: PLR0917 - click passes every option as an argument
    ctx: click.Context, device: str, limit: int, hub_url: str, token: str | None, as_json: bool
) -> None:
    """DEVICE's recent telemetry per model (sparklines of p95 latency, requests and errors), its
    device figures and its recent error messages."""
    with _client(ctx) as client:
        doc = client.fleet_device(device, limit=limit)
    if as_json:
        emit_json(doc)
        return
    now = time.time()
    tele = doc["telemetry"]
    online = "online" if doc["online"] else "offline"
    console.print(f"[bold]{doc['id']}[/bold] ({doc['profile'] or 'no profile'}, {online}, labels "
                  f"{doc['labels'] or '{}'})", soft_wrap=True)  # fmt: skip
    for name, m in sorted(doc["models"].items()):
        console.print(f"  {name}: v{m.get('active')} {m.get('state')} {m.get('reason') or ''}", soft_wrap=True)
    for name, items in tele["models"].items():
        if not items:
            continue
        table = Table(title=f"{name}: last {len(items)} interval(s)")
        for col in ("figure", "newest", f"history ({len(items)})"):
            table.add_column(col)
        last = items[-1]
        series = {
            "p95 ms": [i["p95_ms"] for i in items],
            "p50 ms": [i["p50_ms"] for i in items],
            "requests": [i["requests"] for i in items],
            "errors": [i["errors"] for i in items],
            "rows/s": [i["rows_per_s"] for i in items],
        }
        newest = {
            "p95 ms": _num(last["p95_ms"], "{:.2f}"),
            "p50 ms": _num(last["p50_ms"], "{:.2f}"),
            "requests": str(last["requests"]),
            "errors": str(last["errors"]),
            "rows/s": _num(last["rows_per_s"]),
        }
        for key, values in series.items():
            table.add_row(key, newest[key], sparkline(values))
        table.add_row("version", f"v{last['version']}", "")
        console.print(table)
    dev = tele.get("latest_device")
    if dev:
        mem = dev.get("memory_used_bytes"), dev.get("memory_total_bytes")
        parts = [
            f"cpu {_num(dev.get('cpu_percent'))}%",
            f"memory {mem[0] / 1e6:.0f}/{mem[1] / 1e6:.0f} MB" if None not in mem else "memory -",
            f"temperature {_num(dev.get('temperature_c'))} C",
            f"disk free {dev['disk_free_bytes'] / 1e9:.1f} GB" if dev.get("disk_free_bytes") is not None else "disk -",
            f"runtime {dev.get('runtime_version') or '-'}",
            f"agent {dev.get('agent_state') or '-'}",
            f"reported {_ago(dev.get('received_at'), now)}",
        ]
        q = dev.get("queue") or {}
        if q:
            parts.append(f"telemetry queue {q.get('messages', 0)} msg, {q.get('dropped', 0)} dropped")
        console.print("device: " + ", ".join(parts), soft_wrap=True)
        for e in dev.get("errors") or []:
            console.print(f"  [red]x{e['count']}[/red] {e['message']} ({_ago(e['last'], now)})", soft_wrap=True)
    elif not tele["models"]:
        console.print("no telemetry from this device yet")


@click.group()
def telemetry() -> None:
    """The devices' stored telemetry (docs/telemetry.md)."""


@telemetry.command("export")
@click.option("--device", help="only this device's rows")
@click.option("--since", help="rows whose interval ended since: 30m, 1h, 2d ago, unix seconds or an ISO time")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), required=True, help="the file's format")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True, help="the file")
@_hub_options
@click.pass_context
def export(  # noqa: PLR0917 - click passes every option as an argument
    ctx: click.Context,
    device: str | None,
    since: str | None,
    fmt: str,
    output: Path,
    hub_url: str,
    token: str | None,
) -> None:
    """Write one row per device, model, version and interval (columns: device, model, version, seq,
    interval_start, interval_end, requests, errors, rejected, p50_ms, p95_ms, p99_ms, rows,
    rows_per_s, queue_depth, errors_by_kind). The file appears whole or not at all."""
    start = parse_since(since) if since else None
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            msg = "--format parquet needs pyarrow: pip install 'edgekit-ml[parquet]' (or use --format csv)"
            raise MissingDependencyError(msg) from None
    folder = output.resolve().parent
    if not folder.is_dir():
        msg = f"-o {output}: the folder {folder} does not exist"
        raise InvalidInputError(msg)
    with _client(ctx) as client:
        rows = list(client.telemetry(device=device, since=start))
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=folder)
    try:
        if fmt == "csv":
            with os.fdopen(fd, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(EXPORT_COLUMNS), extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
        else:
            table = pa.Table.from_pylist(rows, schema=_arrow_schema(pa)) if rows else _arrow_schema(pa).empty_table()
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
        Path(tmp).replace(output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    console.print(f"wrote {len(rows)} row(s) to {output}", soft_wrap=True)


def _arrow_schema(pa: Any) -> Any:
    kinds = {
        "device": pa.string(),
        "model": pa.string(),
        "errors_by_kind": pa.string(),
        "interval_start": pa.float64(),
        "interval_end": pa.float64(),
        "p50_ms": pa.float64(),
        "p95_ms": pa.float64(),
        "p99_ms": pa.float64(),
        "rows_per_s": pa.float64(),
    }
    return pa.schema([(c, kinds.get(c, pa.int64())) for c in EXPORT_COLUMNS])


COMMANDS = [fleet, telemetry]
