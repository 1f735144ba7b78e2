"""Conversion benchmark: MobileNetV2 and the digits example through every bundled device profile.

    python bench/convert.py            # full run, writes the "Convert" section of docs/benchmarks.md
    python bench/convert.py --smoke    # digits only, 2 profiles, writes nothing

Budget failures are reported, never fatal (``--no-strict`` semantics); a profile whose constraints
the model cannot meet (e.g. MobileNetV2 on a microcontroller) is a row saying why. Latency is
measured on this host with the profile's runtime settings (threads, delegates / providers, with
CPU fallback), not on the target device. Timings are never a pass/fail gate.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
DIGITS = ROOT / "examples" / "digits"
TARGETS = (
    "int8 MobileNetV2 <= 0.30x float32 size; digits int8 top-1 drop <= 1.0 point; "
    "float16 <= 0.52x; one MobileNetV2 profile converted in < 60 s"
)


@dataclass
class Row:
    model: str
    profile: str
    mode: str
    size_bytes: int | None = None
    ratio: float | None = None
    conversion_s: float | None = None
    p50_ms: float | None = None
    drop: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    budgets: str = ""
    error: str = ""  # the whole message of a profile that did not convert
    error_kind: str = ""  # its error class (ConversionError, UnsupportedOpError, EngineCrashError, ...)
    notes: tuple[str, ...] = ()


def _mobilenet(path: Path) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)).save(path)
    return path


def bench_model(name: str, model: Path, profiles: list[str], options_kw: dict[str, object]) -> list[Row]:
    from edgekit.errors import EdgekitError
    from edgekit.profiles import load_profile
    from edgekit_converters import calibration
    from edgekit_converters.isolation import EngineProcess, Step
    from edgekit_converters.pipeline import Options, Reporter, convert_profile
    from edgekit_converters.sources import load_source

    loaded = [load_profile(p) for p in profiles]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp, EngineProcess(Path(tmp)) as engine:
        workdir = Path(tmp)
        engine.start(tensorflow=True)  # its import overlaps with the source's loading, as in `edgekit convert`
        options = Options(output_dir=workdir / "out", strict=False, **options_kw)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        source = load_source(model, workdir)
        print(f"  {name}: loaded and exported to SavedModel in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        plan = calibration.plan(
            source.inputs,
            calibration=options.calibration,
            validation=options.validation,
            synthetic_calibration=options.synthetic_calibration,
            needs_calibration=True,
            calibration_samples=options.calibration_samples or 200,
        )
        reference = source.predict(plan.validation.inputs)
        float32: dict[str, int] = {}
        for profile in loaded:
            c = profile.conversion
            row = Row(name, profile.name, f"{c.format} {c.quantization}")
            sub = workdir / profile.name
            sub.mkdir()
            try:
                result, _ = convert_profile(
                    source,
                    profile,
                    plan=plan,
                    reference=reference,
                    options=options,
                    workdir=sub,
                    reporter=Reporter(),
                    engine=engine,
                )
            except EdgekitError as e:
                row.budgets = "not converted: " + e.message.split("; ")[0].removeprefix(f"profile {profile.name}: ")
                row.error, row.error_kind = e.message, type(e).__name__
                rows.append(row)
                print(f"  {name} {profile.name}: {row.budgets}", file=sys.stderr)
                continue
            if c.format == "onnx" and "onnx" not in float32:
                steps = engine.for_profile(profile.name, "onnx float32")
                export = Step(f"tf2onnx export (opset {c.opset})", "another conversion.opset")
                float32["onnx"] = source.onnx_model(c.opset, engine=steps, step=export).stat().st_size
            if c.format == "tflite" and c.quantization == "float32":
                float32["tflite"] = result.size_bytes
            m = result.metrics
            row.size_bytes = result.size_bytes
            row.conversion_s = result.conversion_s
            row.p50_ms = m.get("latency_p50_ms_b1")
            row.drop = m.get("accuracy_drop_points")
            row.agreement = m.get("top1_agreement")
            row.cosine = m.get("cosine_similarity")
            row.notes = tuple(result.notes)
            failed = [
                f"{f.budget} {f.value:.3g} > {f.limit:g}" if f.value is not None else f.budget
                for f in result.failed_budgets
            ]
            row.budgets = "ok" if not failed else "FAILED " + "; ".join(failed)
            rows.append(row)
            print(f"  {name} {profile.name}: {row.size_bytes} B in {row.conversion_s:.1f} s", file=sys.stderr)
        for row in rows:
            fmt = row.mode.split()[0]
            if row.size_bytes and fmt in float32:
                row.ratio = row.size_bytes / float32[fmt]
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| model | profile | format / mode | size | size vs float32 | conversion s | p50 ms (batch 1) "
        "| accuracy drop (points) | top-1 agreement | budgets |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        size = "-" if r.size_bytes is None else f"{r.size_bytes / 1e6:.3f} MB"
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}x"
        lines.append(
            f"| {r.model} | {r.profile} | {r.mode} | {size} | {ratio} | {_fmt(r.conversion_s, '.1f')} "
            f"| {_fmt(r.p50_ms, '.3f')} | {_fmt(r.drop, '+.2f')} | {_fmt(r.agreement, '.4f')} | {r.budgets} |"
        )
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> str:
    from importlib.metadata import version

    libs = ", ".join(f"{d} {version(d)}" for d in ("tensorflow", "tf2onnx", "onnxruntime", "ai-edge-litert"))
    return "\n".join(
        [
            f"- host: {platform.machine()}, {os.cpu_count()} logical cores ({platform.processor() or 'cpu'}), "
            f"Python {platform.python_version()}; {libs}",
            "- a 2-core VM shared with other tenants: latency and conversion times are noisy",
            "- latency: host p50 at batch 1 with each profile's runtime settings (delegates / execution "
            "providers the host lacks fall back to the CPU), not the target device",
            f"- MobileNetV2: keras.applications, weights=None, 224x224x3; synthetic calibration "
            f"({args.mobilenet_samples} samples) and synthetic validation (32 samples): agreement only, no accuracy",
            "- digits: examples/digits (calibration.npy, 200 samples; validation.npz, 360 labelled samples)",
            "- size ratio: against the float32 model of the same format (TFLite generic-cpu / tf2onnx output)",
            "- conversion s: the profile's conversion step only; loading and the Keras -> SavedModel export are "
            "shared and excluded; the first ONNX profile of a model (alphabetically jetson-orin) also pays for "
            "tf2onnx (SavedModel -> ONNX), which later ONNX profiles reuse",
            "- MobileNetV2 has random weights: its top-1 agreement on synthetic inputs says little (near-uniform "
            "scores); the digits rows carry the accuracy evidence",
            "- budgets: --no-strict semantics (reported, not fatal)",
            f"- targets: {TARGETS}",
        ]
    )


def write_doc(text: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    section = "## Convert\n\n" + text.strip() + "\n"
    current = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Convert\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: section + "\n", current, count=1)
    else:
        updated = current.rstrip() + "\n\n" + section
    DOC.write_text(updated.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="digits only, 2 profiles; writes nothing")
    parser.add_argument("--mobilenet-samples", type=int, default=100, help="synthetic calibration samples")
    parser.add_argument("--latency-seconds", type=float, default=1.0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    from edgekit.profiles import bundled_profiles

    profiles = ["generic-cpu", "raspberrypi"] if args.smoke else list(bundled_profiles())
    print("settings:\n" + settings(args), flush=True)
    started = time.perf_counter()
    rows = bench_model(
        "digits",
        DIGITS / "model.keras",
        profiles,
        {
            "calibration": DIGITS / "calibration.npy",
            "validation": DIGITS / "validation.npz",
            "latency_seconds": args.latency_seconds,
        },
    )
    if not args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            model = _mobilenet(Path(tmp) / "mobilenet_v2.keras")
            rows += bench_model(
                "MobileNetV2",
                model,
                profiles,
                {
                    "synthetic_calibration": True,
                    "calibration_samples": args.mobilenet_samples,
                    "latency_seconds": args.latency_seconds,
                },
            )
    result = table(rows)
    print()
    print(result)
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    if not (args.smoke or args.no_write):
        cmd = "python bench/convert.py"
        write_doc(f"`{cmd}` ({time.strftime('%Y-%m-%d')}, {total:.0f} s in total)\n\n{settings(args)}\n\n{result}\n")
        print(f"wrote the Convert section of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
