"""`edgekit convert`: a thin click layer over ``pipeline.run`` (registered through the
``edgekit.commands`` entry point, so the toolkit runs without TensorFlow)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from types import TracebackType

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgekit.cli._output import console, emit_json, json_option_help
from edgekit.profiles import resolve_profiles
from edgekit_converters import budgets
from edgekit_converters.calibration import IMAGE_RANGES
from edgekit_converters.isolation import DEFAULT_STEP_TIMEOUT_S
from edgekit_converters.pipeline import Options, Reporter, run
from edgekit_converters.report import render


def _stderr_console() -> Console:
    """A console on a private copy of fd 2: conversions silence fd 2 (TensorFlow's C++ logs), and the
    progress display must keep drawing meanwhile."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return console  # not a real terminal stream (tests): nothing to protect
    return Console(file=os.fdopen(os.dup(fd), "w", buffering=1), highlight=False)


class _RichReporter(Reporter):
    def __init__(self, out: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[profile]}[/bold]"),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} profiles"),
            TimeElapsedColumn(),
            console=out,
            transient=True,
        )
        self._task = self._progress.add_task("starting", total=1, profile="")

    def __enter__(self) -> _RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._progress.stop()

    def start(self, total: int) -> None:
        self._progress.update(self._task, total=total)

    def step(self, profile: str | None, text: str) -> None:
        self._progress.update(self._task, description=text, profile=profile or "source")

    def done(self, profile: str) -> None:
        self._progress.advance(self._task)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--profile",
    "-p",
    "profiles",
    multiple=True,
    required=True,
    help="device profile name or .toml file (repeatable; 'all' = every bundled profile)",
)
@click.option(
    "--output",
    "-o",
    "output_dir",
    type=click.Path(path_type=Path),
    default=Path("out"),
    show_default=True,
    help="folder for the bundles (NAME-PROFILE.ekb)",
)
@click.option("--name", default=None, help="model name in the manifest (default: the model file's name)")
@click.option(
    "--version",
    "model_version",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="integer version in the manifest (the device keeps versions side by side)",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help=".npy (one input), .npz (arrays named like the inputs) or a folder of images",
)
@click.option(
    "--validation",
    type=click.Path(path_type=Path),
    default=None,
    help=".npy or .npz (optional 'labels' array for task accuracy); default: 20% held out of --calibration",
)
@click.option(
    "--synthetic-calibration",
    is_flag=True,
    help="calibrate on random data when you have none (the bundle is flagged: accuracy untrustworthy)",
)
@click.option(
    "--calibration-samples",
    type=click.IntRange(min=1),
    default=None,
    help="override the profiles' calibration_samples",
)
@click.option(
    "--image-range",
    type=click.Choice(sorted(IMAGE_RANGES)),
    default="0,1",
    show_default=True,
    help="value range the model expects images in; with an image folder (and no --normalize) the bundle "
    "records the scaling as preprocessing, so clients send pixels 0-255",
)
@click.option(
    "--latency-seconds",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="time budget per batch size for the host latency measurement",
)
@click.option(
    "--step-timeout",
    "step_timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=1),
    default=DEFAULT_STEP_TIMEOUT_S,
    show_default=True,
    help="time limit of each engine step (TFLite conversion, tf2onnx, ONNX quantization, validation), each run in "
    "a separate process: a step that crashes or runs longer fails its profile, the others still convert",
)
@click.option(
    "--normalize",
    metavar="MEAN,STD",
    default=None,
    help="the runtime feeds (x - MEAN) / STD to the model, clients send raw values; each a number or "
    "per-channel numbers joined by ':' (e.g. 127.5,127.5 or 0.485:0.456:0.406,0.229:0.224:0.225); "
    "--calibration/--validation data are raw and normalised the same way",
)
@click.option(
    "--normalize-input", metavar="NAME", default=None, help="input --normalize applies to (default: the only one)"
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    default=None,
    help="text file, one label per line: replies gain top_k_indices/_scores/_labels",
)
@click.option(
    "--top-k",
    type=int,
    default=None,
    help="how many top classes replies carry with --labels (default 5, at most the label count)",
)
@click.option(
    "--labels-output", metavar="NAME", default=None, help="output --labels applies to (default: the only one)"
)
@click.option(
    "--quantization",
    metavar="MODE|auto",
    default=None,
    help="auto: per profile, try its conversion.allowed_quantizations smallest first (keeping the most damaged "
    "layers in float where the mode allows) and keep the first within every budget; a mode: use it for every "
    "profile instead of its conversion.quantization",
)
@click.option(
    "--strict/--no-strict", default=True, help="--no-strict: report failed budgets as warnings, write the bundle"
)
@click.option("--json", "as_json", is_flag=True, help=json_option_help)
def convert(  # noqa: PLR0917 - click passes every option as an argument
    model: Path,
    profiles: tuple[str, ...],
    output_dir: Path,
    name: str | None,
    model_version: int,
    calibration: Path | None,
    validation: Path | None,
    synthetic_calibration: bool,
    calibration_samples: int | None,
    image_range: str,
    latency_seconds: float,
    step_timeout: float,
    normalize: str | None,
    normalize_input: str | None,
    labels: Path | None,
    top_k: int | None,
    labels_output: str | None,
    quantization: str | None,
    strict: bool,
    as_json: bool,
) -> None:
    """Convert MODEL (.keras, SavedModel folder or .onnx) for device profiles: quantize, export,
    validate on the device's runtime, check budgets and write one bundle per profile."""
    loaded = resolve_profiles(profiles)
    options = Options(
        output_dir=output_dir,
        name=name,
        version=model_version,
        calibration=calibration,
        validation=validation,
        synthetic_calibration=synthetic_calibration,
        strict=strict,
        calibration_samples=calibration_samples,
        image_range=image_range,
        latency_seconds=latency_seconds,
        step_timeout_s=step_timeout,
        normalize=normalize,
        normalize_input=normalize_input,
        labels=labels,
        top_k=top_k,
        labels_output=labels_output,
        quantization=quantization,
    )
    out = _stderr_console()
    # The live display only on a terminal: redirected to a file or a pipe it would leave a blank
    # line (its last frame, erased) before every message that follows, the error line included.
    progress = _RichReporter(out) if out.is_terminal else contextlib.nullcontext(Reporter())
    with progress as reporter:
        report = run(model, loaded, options, reporter)
    if as_json:
        emit_json(report.as_dict())
    else:
        render(report, console)
    report.raise_failures()
    if strict:
        budgets.enforce(report.budget_failures)
