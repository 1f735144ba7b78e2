"""The driver of scripts/fuzz: build the models, serve them, run schemathesis rounds, count, judge."""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.runtime.conftest import Models, make_bundles  # the repository root is on the path now
from tests.runtime.fuzzing import identity_bundles, run_schemathesis
from tests.runtime.test_socket import free_port, wait_ready


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# beside the tests' FP32 and quantized INT8 models: one identity model per other kind of datatype
FUZZ_DATATYPES = ["BOOL", "UINT8", "INT16", "UINT64", "FP16", "FP64"]


def build(d: Path) -> list[Path]:
    """The runtime tests' float MLP, its int8 version, the two-input ONNX model and typed identities."""
    b = d / "bundles"
    b.mkdir()
    made = make_bundles(Models(d / "models"), b)
    return [made["mlp"], made["int8"], made["two"], *identity_bundles(b, FUZZ_DATATYPES)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=5.0, help="total fuzzing time (default 5)")
    ap.add_argument("--round-seconds", type=float, default=60.0, help="one schemathesis run, one seed (default 60)")
    ap.add_argument("--seed", type=int, help="seed of the first round (default: random); later rounds add 1")
    ap.add_argument("--keep", type=Path, help="keep the bundles, HAR logs and the server log in this folder")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgekit-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"building the models in {work} ...")
    sources = build(work)
    port = free_port()
    log = (work / "server.log").open("wb")
    serve = ["serve", *map(str, sources), "--port", str(port), "--poll-seconds", "0", "--log-level", "warning"]
    server = subprocess.Popen(
        [sys.executable, "-m", "edgekit_runtime", *serve],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    statuses: collections.Counter[int] = collections.Counter()
    problems: list[str] = []
    failed_rounds: list[int] = []
    seeds: list[int] = []
    try:
        wait_ready(server, port)
        base = f"http://127.0.0.1:{port}"
        say(f"serving {', '.join(p.stem for p in sources)} at {base}")
        end = time.monotonic() + args.minutes * 60
        while (left := end - time.monotonic()) > 1:
            seed = first + len(seeds)
            seeds.append(seed)
            budget = min(args.round_seconds, left)
            result = run_schemathesis(
                base, work / f"round-{seed}.har", seed=seed, max_time=budget, timeout=budget + 600
            )
            statuses.update(result.statuses)
            problems += result.problems
            if result.returncode != 0:
                failed_rounds.append(seed)
                (work / f"round-{seed}.out").write_text(result.output)
            if not args.keep:
                (work / f"round-{seed}.har").unlink()
            say(f"round seed {seed} ({budget:.0f} s): {result.summary()}; exit {result.returncode}")
            if server.poll() is not None:
                problems.append(f"the server exited with {server.returncode}")
                break
    finally:
        alive = server.poll() is None
        server.terminate()
        server.wait(30)
        log.close()
    tracebacks = (work / "server.log").read_text(errors="replace").count("Traceback")
    total = sum(statuses.values())
    say()
    say(f"seeds {seeds[0]}..{seeds[-1]} ({len(seeds)} rounds), {args.minutes:g} minutes" if seeds else "no round ran")
    say(f"requests tried: {total}")
    say("responses by status: " + ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())))
    say(f"5xx: {sum(n for code, n in statuses.items() if code >= 500)}; replies breaking the promise: {len(problems)}")
    say(f"server alive at the end: {alive}; tracebacks in its log: {tracebacks}")
    for p in problems[:20]:
        say(f"  {p}")
    for seed in failed_rounds:
        say(f"  schemathesis reported failures with seed {seed}: see {work / f'round-{seed}.out'}")
    return 1 if problems or failed_rounds or tracebacks or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
