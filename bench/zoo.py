"""The compatibility matrix: every zoo model (bench/_zoo.py) converted for every bundled profile.

    python bench/zoo.py                  # all models x all profiles, writes docs/compatibility.md
    python bench/zoo.py --smoke          # digits and lstm_tokens for generic-cpu and raspberrypi (auto:
                                         # raspberrypi); writes nothing
    python bench/zoo.py --models lstm_tokens,transformer --profiles raspberrypi

Each cell is one `edgekit convert` of that model for that profile (the pipeline, with
``--no-strict`` semantics so budgets are reported rather than fatal), validated on the device's
runtime backend on the model's validation data: converted or not (with the reason, in the engine's
words and ours), size against the float32 model of the same format, top-1 agreement (classifiers)
or cosine similarity (other outputs), accuracy drop where the data has labels, and host latency at
batch 1. Timings are this host's, never a pass/fail gate.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _zoo import BUILDERS
from convert import Row, bench_model

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "compatibility.md"
FAMILIES = {
    "digits": "MLP (examples/digits)",
    "mobilenet_v2": "image CNN (MobileNetV2 0.35, 96x96, untrained)",
    "lstm_tokens": "recurrent: Embedding + LSTM on int32 token ids",
    "gru_tokens": "recurrent: Embedding + GRU on int32 token ids",
    "lstm_float": "recurrent: LSTM on float sequences",
    "gru_float": "recurrent: GRU on float sequences",
    "transformer": "attention: MultiHeadAttention + LayerNormalization encoder",
    "kws_conv1d": "1-D audio: Conv1D keyword spotting on log-mel features",
    "ds_cnn": "depthwise + separable convolutions, BatchNorm, Dropout",
    "two_heads": "two inputs, two heads (classes + regression)",
    "detector": "detection-style head (boxes [N,16,4] + scores [N,16,3])",
    "torch_mlp": "PyTorch MLP, torch.onnx.export (dynamo, external data)",
    "torch_cnn_nchw": "PyTorch NCHW CNN with BatchNorm, torch.onnx.export",
}


def build(models_dir: Path, names: list[str]) -> dict[str, tuple[Path, Path, Path]]:
    """Build the models that are missing (in a subprocess: TensorFlow's and PyTorch's training stays
    out of this process) and return name -> (model, calibration, validation)."""
    missing = [n for n in names if not (models_dir / n / "validation.npz").is_file()]
    if missing:
        subprocess.run([sys.executable, str(Path(__file__).parent / "_zoo.py"), str(models_dir), *missing], check=True)
    out = {}
    for n in names:
        folder = models_dir / n
        model = folder / ("model.onnx" if (folder / "model.onnx").is_file() else "model.keras")
        out[n] = (model, folder / "calibration.npz", folder / "validation.npz")
    return out


# Notes every cell of a profile gets on this host (no GPU, no Edge TPU): said once in the settings.
_HOST_NOTES = ("not available on this device",)
# What a refusal means, by the words of its error: a limit of the engine or the target, or work left.
WHY = [
    (
        "produces TFLite, which edgekit converts from Keras or SavedModel sources",
        "work left: ONNX to TFLite. onnx2tf 1.29, the tool for it, pins TensorFlow 2.19, NumPy 1.26 and onnx "
        "1.19, which cannot install beside this stack (TensorFlow 2.21, NumPy 2); export TFLite from the "
        "framework instead",
    ),
    (
        "cannot run on profile coral-edgetpu (not in its constraints.allowed_ops)",
        "target limit: the Edge TPU compiler has no mapping for these ops (coral.ai's supported-operations "
        "list) and would run them, and everything after them, on the host CPU. For LSTMs, work left: the "
        "fused UNIDIRECTIONAL_SEQUENCE_LSTM op the Edge TPU runs, which Keras 3 does not export",
    ),
    (
        "cannot run on profile cortex-m (not in its constraints.allowed_ops)",
        "profile limit: the ops are outside the cortex-m profile's op list (the CMSIS-NN-accelerated int8 "
        "kernels); TFLite Micro has reference kernels for some of them, which a copy of the profile may allow",
    ),
    ("crashed (SIGSEGV)", "engine limit: the engine crashed (contained); the footnote quotes where"),
]


def _why(error: str) -> str:
    return next((why for pattern, why in WHY if pattern in error), "see the error")


def _cell(r: Row, footnotes: list[str]) -> str:
    if r.size_bytes is None:
        footnotes.append(f"**{r.model} × {r.profile}** ({r.mode}, {r.error_kind}): {r.error}. *{_why(r.error)}.*")
        short = r.budgets.removeprefix("not converted: ")
        return f"✗ {short[:90]}{'…' if len(short) > 90 else ''} [{len(footnotes)}]"
    parts = [f"{r.ratio:.2f}x" if r.ratio is not None else f"{r.size_bytes / 1e3:.0f} kB"]
    if r.agreement is not None:
        parts.append(f"top-1 {r.agreement:.3f}")
    elif r.cosine is not None:
        parts.append(f"cos {r.cosine:.4f}")
    if r.drop is not None:
        parts.append(f"drop {r.drop:+.1f}")
    if r.p50_ms is not None:
        parts.append(f"{r.p50_ms:.2f} ms")
    mark = "✓"
    if r.budgets != "ok":
        mark = "✓ (over budget)"
        footnotes.append(f"**{r.model} × {r.profile}** ({r.mode}): converted, {r.budgets}")
        parts.append(f"[{len(footnotes)}]")
    notes = [n for n in r.notes if not any(h in n for h in _HOST_NOTES)]
    if notes:
        footnotes.append(f"**{r.model} × {r.profile}** ({r.mode}): " + " · ".join(notes))
        parts.append(f"[{len(footnotes)}]")
    return f"{mark} " + " · ".join(parts)


def matrix(rows: list[Row], models: list[str], profiles: list[str]) -> str:
    by = {(r.model, r.profile): r for r in rows}
    modes = {r.profile: r.mode for r in rows}
    footnotes: list[str] = []
    head = "| model | " + " | ".join(f"{p}<br>{modes.get(p, '')}" for p in profiles) + " |"
    lines = [head, "|---|" + "---|" * len(profiles)]
    for m in models:
        cells = [_cell(by[(m, p)], footnotes) if (m, p) in by else "-" for p in profiles]
        lines.append(f"| **{m}**<br>{FAMILIES.get(m, '')} | " + " | ".join(cells) + " |")
    converted = sum(1 for r in rows if r.size_bytes is not None)
    lines += ["", f"{converted} of {len(rows)} cells converted.", ""]
    lines += [f"{i}. {text}" for i, text in enumerate(footnotes, 1)]
    return "\n".join(lines)


def auto_choice(name: str, model: Path, cal: Path, val: Path, profiles: list[str], latency_s: float) -> list[str]:
    """`edgekit convert --quantization auto` for ``profiles``: one table row per profile."""
    from edgekit.errors import EdgekitError
    from edgekit.profiles import load_profile
    from edgekit_converters.pipeline import Options, run

    rows = []
    for profile in profiles:
        with tempfile.TemporaryDirectory(prefix="edgekit-zoo-auto-") as tmp:
            options = Options(
                output_dir=Path(tmp) / "out",
                calibration=cal,
                validation=val,
                latency_seconds=latency_s,
                strict=False,
                quantization="auto",
            )
            try:
                report = run(model, [load_profile(profile)], options)
            except EdgekitError as e:
                rows.append(f"| {name} | {profile} | not converted: {e.message.split('; ')[0]} | - | - | - |")
                continue
        if not report.results:
            rows.append(f"| {name} | {profile} | not converted: {report.failed[0].error.message[:120]} | - | - | - |")
            continue
        r = report.results[0]
        assert r.search is not None
        tries = r.search["tries"]
        chosen = next(t for t in tries if t.get("chosen"))
        path = " → ".join(
            t["mode"]
            + (f"+{len(t['float_layers'])}f" if t["float_layers"] else "")
            + (" ✓" if t.get("chosen") else " ✗")
            for t in tries
        )
        acc = f"{chosen['accuracy_kind']} {chosen['accuracy']:.2f}" if chosen.get("accuracy") is not None else "-"
        layers = len(chosen["float_layers"])
        rows.append(
            f"| {name} | {profile} | {chosen['mode']}{f' ({layers} layers in float)' if layers else ''} "
            f"| {path} | {acc} | {chosen['size_bytes'] / 1e3:.1f} kB |"
        )
    return rows


def settings(args: argparse.Namespace) -> str:
    from importlib.metadata import PackageNotFoundError, version

    libs = []
    for d in ("tensorflow", "tf2onnx", "onnxruntime", "ai-edge-litert", "torch"):
        try:
            libs.append(f"{d} {version(d)}")
        except PackageNotFoundError:
            continue
    return "\n".join(
        [
            f"- host: {platform.machine()}, {os.cpu_count()} logical cores, Python {platform.python_version()}; "
            + ", ".join(libs),
            "- a 2-core VM shared with other tenants: latencies are noisy, and the host's, not the device's",
            "- each model: calibration.npz (up to 200 training samples) and validation.npz (up to 300 held-out "
            "samples, with labels where the task has classes), made by bench/_zoo.py",
            "- cell: size vs the float32 model of the same format (TFLite generic-cpu / the float32 ONNX) · "
            "top-1 agreement with the source (classifiers) or mean cosine similarity (other first outputs) · "
            "accuracy drop in points (labelled data) · host p50 latency at batch 1 on the profile's runtime",
            "- ✓ (over budget): converted and validated, but a profile budget failed (the CLI refuses to write "
            "the bundle unless --no-strict); ✗: not converted, the footnote quotes the whole error",
            f"- latency budget per batch size: {args.latency_seconds} s",
            "- no GPU and no Edge TPU here: the android-arm64, coral-edgetpu and jetson-orin cells ran on the CPU "
            "(delegate / execution provider fallback); their latencies are not the device's",
        ]
    )


def main() -> None:
    from edgekit.profiles import bundled_profiles

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="digits and lstm_tokens, two profiles; writes nothing")
    ap.add_argument("--models", default=",".join(BUILDERS))
    ap.add_argument("--profiles", default=",".join(bundled_profiles()))
    ap.add_argument("--models-dir", type=Path, help="where built models are cached (default: a temporary folder)")
    ap.add_argument("--latency-seconds", type=float, default=0.5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--auto-profiles", default="raspberrypi,x86-server", help="profiles for the --quantization auto table"
    )
    args = ap.parse_args()
    models = ["digits", "lstm_tokens"] if args.smoke else args.models.split(",")
    profiles = ["generic-cpu", "raspberrypi"] if args.smoke else args.profiles.split(",")
    if args.smoke:
        args.auto_profiles = "raspberrypi"
    unknown = [m for m in models if m not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    print("settings:\n" + settings(args), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-zoo-") as tmp:
        built = build(args.models_dir or Path(tmp), models)
        rows: list[Row] = []
        auto_rows: list[str] = []
        for name in models:
            model, cal, val = built[name]
            rows += bench_model(
                name,
                model,
                profiles,
                {"calibration": cal, "validation": val, "latency_seconds": args.latency_seconds},
            )
            auto_profiles = [p for p in args.auto_profiles.split(",") if p]
            if model.suffix == ".onnx":
                auto_profiles = [p for p in auto_profiles if p in ("x86-server", "jetson-orin")]
            auto_rows += auto_choice(name, model, cal, val, auto_profiles, args.latency_seconds)
    result = matrix(rows, models, profiles)
    if auto_rows:
        result += (
            "\n\n## `--quantization auto`\n\nEach row is `edgekit convert --quantization auto` for that profile: the "
            "tries in order (`+Nf`: N layers kept in float; ✓ chosen, ✗ over budget or not converted), the "
            "winner, its accuracy figure (drop in points with labels; top-1 disagreement or cosine without) and "
            "size.\n\n| model | profile | chosen | tries | accuracy | size |\n|---|---|---|---|---|---|\n"
            + "\n".join(auto_rows)
        )
    total = time.perf_counter() - started
    print("\n" + result + f"\n\ntotal {total:.0f} s")
    if not (args.smoke or args.no_write):
        DOC.write_text(
            "# Compatibility: which models convert for which profile\n\n"
            "Made by `python bench/zoo.py` "
            f"({time.strftime('%Y-%m-%d')}, {total:.0f} s); do not edit by hand. "
            "What each family is and how it was trained: bench/_zoo.py. How conversion works: "
            "[converting.md](converting.md).\n\n" + settings(args) + "\n\n" + result + "\n"
        )
        print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
