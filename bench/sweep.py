"""Concurrency sweep of the batching delay (issue 11): does ``adaptive`` serve every load without tuning?

For each model, ``edgekit-runtime serve`` is started once per batching setting and driven by wrk
(v2 binary tensor requests, one sample each, keep-alive) at 1, 2, 4, 8, 16, 32 and 64 connections:

- ``adaptive`` (at most ``--timeout`` µs, default 2000);
- ``fixed`` at 0, 1000 and 2000 µs (TF Serving's rule);
- batching off;
- MobileNetV2 also ``adaptive`` with ``--workers 2 --threads 1`` (two processes, one-thread engines).

Models: the small MLP 64-256-256-10 (float ONNX, max batch 32), the wide MLP 512-2048x3-10 (float
TFLite, max batch 32) and MobileNetV2 224x224x3 (float TFLite, max batch 8). The raw engine is timed
in this process first (batch 1 p50, best rows/s over batch sizes; for MobileNetV2 also one-thread
engines side by side). Each cell checks one answer against the raw engine before the load.

Targets (printed per model, judged here; never a CI gate): adaptive within 10 % of the best fixed
setting at every concurrency in req/s and p50; at 1 connection adaptive's p50 at most 0.3 ms over
the raw engine's batch-1 p50; MobileNetV2 at 16 connections at least 95 % of the better raw
configuration (the best edgekit row counts, --workers included).

    python bench/sweep.py                 # the full sweep: 3 models x 6 settings x 7 concurrencies, 10 s each
    python bench/sweep.py --model mlp-small --duration 5
    python bench/sweep.py --smoke         # small models, 2 concurrencies, 0.5 s per cell: a quick check
    python bench/sweep.py --model mlp-big --rounds 3 --duration 5   # interleaved rounds on a noisy machine
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from _load import run_wrk
from _servers import Server, edgekit_server
from serve import (
    RESULTS,
    Batching,
    Context,
    Payload,
    Row,
    _input_name,
    environment,
    load_row,
    raw_expected,
    raw_row,
    raw_sweep,
    sample_input,
    v2_binary,
)

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
SMOKE_CONCURRENCY = (1, 16)


@dataclass(frozen=True)
class Subject:
    model: str  # bench/_models.py name
    fmt: str
    max_batch_size: int
    parallel_raw: bool = False  # also time one-thread engines side by side, and serve with --workers


SUBJECTS = (
    Subject("mlp-small", "onnx", 32),
    Subject("mlp-big", "tflite", 32),
    Subject("mobilenet-v2", "tflite", 8, parallel_raw=True),
)


def settings(subject: Subject, timeout_us: int, threads: int) -> list[tuple[str, Batching, int]]:
    """(label, batching, engine threads) of each server the sweep runs for ``subject``."""
    base = Batching(max_batch_size=subject.max_batch_size, max_enqueued_batches=64)
    adaptive = replace(base, batch_timeout_micros=timeout_us, batch_timeout_policy="adaptive")
    rows = [
        ("adaptive", adaptive, threads),
        *[(f"fixed {us}", replace(base, batch_timeout_micros=us), threads) for us in (0, 1000, 2000)],
        ("off", Batching(enabled=False, max_enqueued_batches=128), threads),
    ]
    if subject.parallel_raw:
        rows.append(("adaptive --workers", replace(adaptive, workers=max(2, threads)), 1))
    return rows


def sweep_subject(
    ctx: Context, subject: Subject, concurrency: tuple[int, ...], timeout_us: int, rounds: int = 1
) -> tuple[list[str], list[Row]]:
    """Every cell for one model: the verdict lines and one row per cell (over the rounds)."""
    spec, model_dir = ctx.model(subject.model)
    sizes = tuple(s for s in (1, 2, 4, 8, 16, 32) if s <= subject.max_batch_size)
    raw = raw_sweep(ctx, spec, model_dir, subject.fmt, sizes)
    raw_best = raw_row(ctx, 5, spec, subject.fmt, raw).rps
    raw_cores = _cores_at_best(raw)
    raw_b1_p50 = raw[1]["p50_ms"]
    if subject.parallel_raw:
        par = raw_sweep(ctx, spec, model_dir, subject.fmt, sizes, parallel=True)
        par_best = raw_row(ctx, 5, spec, subject.fmt, par, parallel=True).rps
        if par_best > raw_best:
            raw_best, raw_cores = par_best, _cores_at_best(par)
    bundle = ctx.bundle(spec, model_dir, subject.fmt)
    name = f"{spec.name}-{subject.fmt}"
    _, x32 = sample_input(spec)
    expected = raw_expected(subject.fmt, model_dir, x32, ctx.threads)
    payload = v2_binary(name, _input_name(bundle), x32, "output_0")
    runs: dict[tuple[str, int], list[Row]] = {}
    floor: dict[int, Floor] = {}
    # Rounds interleave the settings (every setting once, then again): load from elsewhere on a
    # shared machine then falls on all settings alike instead of on whichever ran at the time.
    for n in range(rounds):
        for label, cfg, threads in settings(subject, timeout_us, ctx.threads):
            tag = f"s5-{spec.name}-{label.replace(' ', '').replace('--', '')}-r{n + 1}"
            with edgekit_server([bundle], batching=cfg, threads=threads, log_dir=ctx.log_dir, label=tag) as srv:
                if label == "adaptive" and n == 0:
                    floor = transport_floor(ctx, srv, payload, concurrency, spec.describe())
                for c in concurrency:
                    row = load_row(
                        ctx,
                        srv,
                        payload,
                        expected,
                        scenario=5,
                        who=f"edgekit {label}",
                        spec=spec,
                        fmt=subject.fmt,
                        concurrency=c,
                        batching=cfg.describe(),
                    )
                    row.threads = threads
                    runs.setdefault((label, c), []).append(row)
    cells = {key: median_row(rows) for key, rows in runs.items()}
    lines = verdicts(spec.describe(), cells, concurrency, raw_b1_p50, raw_best, subject, floor, raw_cores)
    return lines, list(cells.values())


def median_row(rows: list[Row]) -> Row:
    """One cell over its rounds: the median req/s and the median p50 (each over the rounds), the
    rest from the round of median req/s; the note lists every round."""
    if len(rows) == 1:
        return rows[0]
    by_rps = sorted(rows, key=lambda r: r.rps)
    mid = by_rps[(len(rows) - 1) // 2]
    p50s = sorted(r.p50_ms for r in rows if r.p50_ms is not None)
    p50 = statistics.median(p50s) if p50s else None
    rounds = " ".join(f"{r.rps:,.0f}/{r.p50_ms:.2f}" for r in rows if r.p50_ms is not None)
    return replace(mid, rps=statistics.median(r.rps for r in rows), p50_ms=p50, note=f"rounds req/s/p50 ms: {rounds}")


def _cores_at_best(sweep: dict[int, dict]) -> float:
    """Cores the raw engine used at its best batch size (at least 1: a one-thread engine's reading)."""
    best = max(sweep.values(), key=lambda s: s["rows_per_s"])
    return max(1.0, float(best["cpu_self"]))


@dataclass(frozen=True)
class Floor:
    """The transport alone: the same request body sent to a model that does not exist, so the
    server reads all of it and answers 404 without decoding it or running anything."""

    p50_ms: float
    core_ms_per_req: float  # CPU of the whole machine (server, wrk, kernel) per request


def transport_floor(
    ctx: Context, srv: Server, payload: Payload, concurrency: tuple[int, ...], model: str
) -> dict[int, Floor]:
    out: dict[int, Floor] = {}
    absent = payload.path.replace("/v2/models/", "/v2/models/absent-", 1)
    for c in sorted({1, 16} & set(concurrency)):
        r = run_wrk(
            srv.url(absent),
            payload.body,
            payload.headers,
            connections=c,
            duration_s=max(1.0, ctx.duration / 2),
            server_pid=srv.pid,
            work_dir=ctx.work_dir / "wrk",
        )
        rate = r.requests / r.duration_s if r.duration_s else 0.0
        cores = r.server_cores + r.wrk_cores + r.other_cores
        out[c] = Floor(r.p50_ms, 1e3 * cores / rate if rate else float("nan"))
        print(
            f"[5] transport floor {model} c={c}: {rate:,.0f} req/s "
            f"(404s after reading the {len(payload.body):,} B body), "
            f"p50 {r.p50_ms:.2f} ms, {out[c].core_ms_per_req:.3f} core-ms/req (server {r.server_cores:.2f} + wrk "
            f"{r.wrk_cores:.2f} + other {r.other_cores:.2f} cores)",
            flush=True,
        )
    return out


def verdicts(
    model: str,
    cells: dict[tuple[str, int], Row],
    concurrency: tuple[int, ...],
    raw_b1_p50: float,
    raw_best: float,
    subject: Subject,
    floor: dict[int, Floor],
    raw_cores: float,
) -> list[str]:
    lines = []
    for c in concurrency:
        fixed = [cells[f"fixed {us}", c] for us in (0, 1000, 2000)]
        best_rps = max(r.rps for r in fixed)
        best_p50 = min(r.p50_ms for r in fixed if r.p50_ms is not None)
        a = cells["adaptive", c]
        ok = a.rps >= 0.9 * best_rps and a.p50_ms is not None and a.p50_ms <= 1.1 * best_p50
        lines.append(
            f"{model} c={c}: adaptive {a.rps:,.0f}/s p50 {a.p50_ms:.2f} ms; best fixed {best_rps:,.0f}/s, "
            f"p50 {best_p50:.2f} ms -> {'PASS' if ok else 'FAIL'} (within 10 %)"
        )
    if 1 in concurrency:
        a = cells["adaptive", 1]
        over = (a.p50_ms or 0.0) - raw_b1_p50
        lines.append(
            f"{model} c=1: adaptive p50 {a.p50_ms:.2f} ms - raw batch-1 p50 {raw_b1_p50:.2f} ms = {over:.2f} ms "
            f"-> {'PASS' if over <= 0.3 else 'FAIL'} (at most 0.3 ms)"
        )
        if 1 in floor:
            own = over - floor[1].p50_ms
            lines.append(
                f"{model} c=1: of those {over:.2f} ms, the transport floor (the same body answered 404 unread) "
                f"is {floor[1].p50_ms:.2f} ms p50, leaving {own:.2f} ms for decoding, batching and encoding"
            )
    if subject.parallel_raw and 16 in concurrency:
        best = max((r for (_, c), r in cells.items() if c == 16), key=lambda r: r.rps)
        share = best.rps / raw_best
        lines.append(
            f"{model} c=16: best edgekit row ({best.who}) {best.rps:,.0f}/s = {share:.0%} of the better raw "
            f"configuration {raw_best:,.0f} rows/s -> {'PASS' if share >= 0.95 else 'FAIL'} (at least 95 %)"
        )
        if 16 in floor:
            # what a server that only read each body could reach: the cores the raw engine used,
            # shared between its cost per row and the transport's cost per request
            ceiling = raw_cores / (raw_cores / raw_best + floor[16].core_ms_per_req / 1e3)
            lines.append(
                f"{model} c=16: the transport floor costs {floor[16].core_ms_per_req:.3f} core-ms per request "
                f"(raw engine: {1e3 * raw_cores / raw_best:.2f} core-ms per row on {raw_cores:.2f} cores), so a "
                f"server that only read the bodies could reach {ceiling:,.0f} rows/s = {ceiling / raw_best:.0%} of "
                f"raw; the best edgekit row is {best.rps / ceiling:.0%} of that ceiling"
            )
    return lines


def table(rows: list[Row], rounds: int) -> str:
    head = "| model | setting | connections | req/s | p50 ms | p99 ms | rows/batch | err/non-2xx | CPU srv/wrk/other |"
    out = [head + (" rounds (req/s / p50 ms) |" if rounds > 1 else ""), "|---" * (9 + (rounds > 1)) + "|"]
    for r in rows:
        if r.concurrency is None:
            continue
        p50 = "-" if r.p50_ms is None else f"{r.p50_ms:.2f}"
        p99 = "-" if r.p99_ms is None else f"{r.p99_ms:.2f}"
        out.append(
            f"| {r.model} | {r.who.removeprefix('edgekit ')} | {r.concurrency} | {r.rps:,.0f} | {p50} | {p99} "
            f"| {r.rows_per_batch} | {r.errors} | {r.cpu} |" + (f" {r.note.split(': ', 1)[-1]} |" if rounds > 1 else "")
        )
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=[s.model for s in SUBJECTS], help="only this model (repeatable)")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 10; smoke 0.5)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load per cell (default 2; smoke 0)")
    p.add_argument(
        "--timeout", type=int, default=2000, help="adaptive's batch_timeout_micros (the most a request waits)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engine threads (default: cores)")
    p.add_argument("--smoke", action="store_true", help="small models, 1 and 16 connections, 0.5 s per cell")
    p.add_argument(
        "--connections",
        type=lambda v: tuple(int(c) for c in v.split(",")),
        help="comma-separated concurrencies (default 1,2,4,8,16,32,64; smoke 1,16)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every setting this many times, interleaved; a cell is the median (default 1)",
    )
    p.add_argument("--out", type=Path, help="write the Markdown table and verdicts to this file (default: print)")
    args = p.parse_args(argv)
    args.argv = argv
    args.mlserver_venv = None
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    ctx = Context(
        args=args,
        smoke=args.smoke,
        duration=args.duration or (0.5 if args.smoke else 10.0),
        warmup=args.warmup if args.warmup is not None else (0.0 if args.smoke else 2.0),
        threads=args.threads,
        raw_budget=0.2 if args.smoke else 2.0,
        log_dir=RESULTS / "logs" / f"sweep-{stamp}",
        work_dir=RESULTS / "work",
        mlserver_venv=None,
        mlserver_version=None,
    )
    subjects = [s for s in SUBJECTS if not args.model or s.model in args.model]
    if args.smoke and not args.model:
        subjects = [s for s in subjects if s.model != "mlp-big"]  # the smoke MobileNetV2 stands for both
    concurrency = args.connections or (SMOKE_CONCURRENCY if args.smoke else CONCURRENCY)
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    lines: list[str] = []
    cells: list[Row] = []
    for subject in subjects:
        print(f"# {subject.model} ({subject.fmt}, max batch {subject.max_batch_size})", flush=True)
        verdict_lines, rows = sweep_subject(ctx, subject, concurrency, args.timeout, args.rounds)
        lines += verdict_lines
        cells += rows
    took = time.perf_counter() - started
    report = "\n".join(
        [
            f"`python bench/sweep.py {' '.join(args.argv)}`".replace(" `", "`"),
            "",
            *environment(ctx),
            "",
            *(
                [f"- {args.rounds} rounds, the settings interleaved; a cell's req/s and p50: medians of its rounds"]
                if args.rounds > 1
                else []
            ),
            "",
            table(cells, args.rounds),
            "",
            *[f"- {line}" for line in lines],
            "",
            f"Took {took:.0f} s.",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw_json = RESULTS / f"sweep-{stamp}.json"
    raw_json.write_text(json.dumps([asdict(r) for r in ctx.rows], indent=1))
    if args.out:
        args.out.write_text(report + "\n")
    print(report)
    print(f"# rows as JSON: {raw_json}; server logs: {ctx.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
