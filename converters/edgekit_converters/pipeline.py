"""One conversion run: load the source once, then per profile convert -> check -> validate -> budgets
-> write the bundle. Transport-free: the CLI and the benchmark drive it the same way.

Everything intermediate (SavedModel exports, ONNX files) lives in one temporary directory that is
removed however the run ends; bundles are written atomically by ``Bundle.write``.
"""

from __future__ import annotations

import contextlib
import platform
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgekit.errors import InvalidInputError
from edgekit.profiles import Profile
from edgekit_converters import auto, budgets, calibration, constraints, processing, to_onnx, to_tflite
from edgekit_converters.errors import EngineCrashError
from edgekit_converters.isolation import DEFAULT_STEP_TIMEOUT_S, EngineProcess, Step
from edgekit_converters.sources import Source, load_source
from edgekit_converters.validation import validate
from edgekit_runtime.bundle import (
    MODEL_FILES,
    Bundle,
    GoldenInfo,
    Manifest,
    Postprocessing,
    Preprocessing,
    ProfileRef,
    SourceInfo,
    sha256_bytes,
)

_VERSIONED = ("edgekit-ml-converters", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy")


@dataclass(frozen=True)
class Options:
    output_dir: Path
    name: str | None = None
    version: int = 1
    calibration: Path | None = None
    validation: Path | None = None
    synthetic_calibration: bool = False
    strict: bool = True
    calibration_samples: int | None = None
    image_range: str = "0,1"
    latency_seconds: float = 1.0
    # manifest pre/post-processing (see processing.py): "MEAN,STD", e.g. "127.5,127.5" or "0.5:0.4:0.3,0.2:0.2:0.2"
    normalize: str | None = None
    normalize_input: str | None = None
    labels: Path | None = None
    top_k: int | None = None  # default processing.DEFAULT_TOP_K (at most the label count)
    labels_output: str | None = None
    # time limit of each engine step in its worker process (isolation.py)
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    # None: each profile's conversion.quantization; a mode: that mode for every profile; "auto": the
    # accuracy-aware search over each profile's conversion.allowed_quantizations (auto.py)
    quantization: str | None = None


class Reporter:
    """Progress hooks; the default does nothing. The CLI shows them as a rich progress display."""

    def start(self, total: int) -> None:
        """``total`` profiles will be converted."""

    def step(self, profile: str | None, text: str) -> None:
        """A new step started (``profile`` is None while loading the source)."""

    def done(self, profile: str) -> None:
        """A profile is finished."""


@dataclass
class ProfileResult:
    profile: str
    format: str
    quantization: str
    size_bytes: int
    conversion_s: float
    metrics: dict[str, Any]
    checks: list[budgets.BudgetCheck]
    facts: dict[str, Any]
    notes: list[str]
    bundle: Path | None = None
    search: dict[str, Any] | None = None  # --quantization auto: every try and why the winner won

    @property
    def failed_budgets(self) -> list[budgets.BudgetCheck]:
        return budgets.failures(self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "format": self.format,
            "quantization": self.quantization,
            "bundle": str(self.bundle) if self.bundle else None,
            "size_bytes": self.size_bytes,
            "conversion_s": round(self.conversion_s, 3),
            "metrics": self.metrics,
            "budgets": [c.as_dict() for c in self.checks],
            "budgets_ok": not self.failed_budgets,
            "constraints": self.facts,
            "notes": self.notes,
            "quantization_search": self.search,
        }


@dataclass(frozen=True)
class ProfileFailure:
    """A profile whose engine crashed: no bundle, the run's other profiles went on."""

    profile: str
    format: str
    quantization: str
    error: EngineCrashError

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "format": self.format,
            "quantization": self.quantization,
            "error": self.error.message,
            "exit_code": self.error.exit_code,
        }


@dataclass
class Report:
    source: dict[str, Any]
    data_notes: list[str]
    strict: bool
    results: list[ProfileResult] = field(default_factory=list)
    failed: list[ProfileFailure] = field(default_factory=list)

    @property
    def budget_failures(self) -> dict[str, list[budgets.BudgetCheck]]:
        return {r.profile: r.failed_budgets for r in self.results if r.failed_budgets}

    def raise_failures(self) -> None:
        """The crashed profiles as one EngineCrashError (after the report of the others was shown)."""
        if len(self.failed) == 1:
            raise self.failed[0].error
        if self.failed:
            raise EngineCrashError(" | ".join(f.error.message for f in self.failed))

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "data_notes": self.data_notes,
            "strict": self.strict,
            "ok": not self.failed and not (self.strict and self.budget_failures),
            "profiles": [r.as_dict() for r in self.results],
            "failed": [f.as_dict() for f in self.failed],
        }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def output_dir(path: Path) -> Iterator[Path]:
    """Create ``path`` if needed and prove a file can be written there, before any slow work; when the
    block ends, the folders it created are removed again if nothing was written into them."""
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            msg = f"cannot write to output folder {path}: {e.strerror or e}; choose a folder you can write to with -o"
            raise InvalidInputError(msg) from e
        yield path
    finally:
        for folder in created:
            try:
                folder.rmdir()  # only an empty folder: a written bundle (or anyone else's file) keeps it
            except OSError:
                break


def default_name(model: Path) -> str:
    """The model's file name, or its folder's name for generic names (``digits/model.keras`` -> digits)."""
    stem = model.name if model.is_dir() else model.stem
    if stem.lower() in {"model", "saved_model", "savedmodel"} and model.resolve().parent.name:
        stem = model.resolve().parent.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "model"
    return name[:100]


def _trim_to_batch(data: calibration.Dataset, batch: int | None) -> calibration.Dataset:
    if not batch or data.rows % batch == 0:
        return data
    return data.head(data.rows - data.rows % batch)


def convert_profile(
    source: Source,
    profile: Profile,
    *,
    plan: calibration.DataPlan,
    reference: dict[str, Any],
    options: Options,
    workdir: Path,
    reporter: Reporter,
    engine: EngineProcess,
    preprocessing: Preprocessing | None = None,
    postprocessing: Postprocessing | None = None,
) -> tuple[ProfileResult, Bundle]:
    """Convert, check, validate and measure one profile; the bundle is returned, not yet written.
    The engine steps run in ``engine``'s worker: a crash there raises EngineCrashError."""
    c = profile.conversion
    if c.format == "tflite" and not source.is_tensorflow:
        msg = (
            f"profile {profile.name} produces TFLite, which edgekit converts from Keras or SavedModel sources; "
            f"{source.path} is ONNX: choose an ONNX profile (jetson-orin, x86-server) or convert the original model"
        )
        raise InvalidInputError(msg)
    if options.calibration_samples:
        profile = profile.model_copy(
            update={"conversion": c.model_copy(update={"calibration_samples": options.calibration_samples})}
        )
        c = profile.conversion
    calib = plan.calibration if c.needs_calibration else None
    steps = engine.for_profile(profile.name, f"{c.format} {c.quantization}")
    reporter.step(profile.name, f"converting to {c.format} {c.quantization}")
    t0 = time.perf_counter()
    if c.format == "tflite":
        model, notes = to_tflite.convert(source, profile, calib, steps)
    else:
        model, notes = to_onnx.convert(source, profile, calib, workdir, steps)
    conversion_s = time.perf_counter() - t0
    reporter.step(profile.name, "checking the target's constraints")
    facts = constraints.check(profile, c.format, model)
    reporter.step(profile.name, "validating on the device runtime")
    data = _trim_to_batch(plan.validation, c.static_batch)
    ref = {k: v[: data.rows] for k, v in reference.items()}
    runtime = "LiteRT" if c.format == "tflite" else "ONNX Runtime"
    check = Step(f"validation on {runtime}", "another conversion.quantization: the converted model crashes the runtime")
    val = steps.call(check, validate, c.format, model, profile, ref, data, latency_seconds=options.latency_seconds)
    notes += val.notes
    checks = budgets.check(profile.budgets, len(model), val.metrics)
    name = options.name or default_name(source.path)
    calib_info: dict[str, Any] = {}
    if calib is not None:
        calib_info = {
            "data": calib.origin,
            "samples": min(calib.rows, c.calibration_samples),
            "synthetic": calib.synthetic,
            "trustworthy": not calib.synthetic,
        }
        if c.format == "onnx":
            calib_info["method"] = c.calibration_method
        if facts.get("float_ops"):
            calib_info["float_ops"] = facts["float_ops"]
            calib_info["float_ops_reason"] = (
                "the converter's float fallback (no integer kernel for the op in this mode, or its input is not "
                "quantized)" + ("; and conversion.float_layers" if c.float_layers else "")
            )
        if c.float_layers:
            calib_info["float_layers"] = list(c.float_layers)
        if calib.synthetic:
            notes.append("calibrated on " + calibration.SYNTHETIC_NOTE)
    manifest = Manifest(
        name=name,
        version=options.version,
        format=c.format,
        quantization=c.quantization,
        model_file=MODEL_FILES[c.format],
        model_sha256=sha256_bytes(model),
        model_size_bytes=len(model),
        inputs=val.signature.inputs,
        outputs=val.signature.outputs,
        profile=ProfileRef(name=profile.name, runtime=profile.runtime),
        golden=GoldenInfo(count=next(iter(val.golden_inputs.values())).shape[0], atol=val.golden_atol),
        source=SourceInfo(
            path=source.path.name, format=source.kind, sha256=source.sha256, size_bytes=source.size_bytes
        ),
        calibration=calib_info,
        validation={**val.metrics, "budgets": [ch.as_dict() for ch in checks]},
        preprocessing=preprocessing,
        postprocessing=postprocessing,
        converter=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    bundle = Bundle(manifest, model, val.golden_inputs, val.golden_outputs)
    result = ProfileResult(
        profile.name, c.format, c.quantization, len(model), conversion_s, val.metrics, checks, facts, notes
    )
    return result, bundle


def _parse_processing(options: Options) -> tuple[processing.Normalization | None, list[str] | None]:
    """The --normalize / --labels values on their own, before any slow work."""
    if options.normalize is None and options.normalize_input is not None:
        msg = "--normalize-input needs --normalize MEAN,STD"
        raise InvalidInputError(msg)
    if options.labels is None and (options.top_k is not None or options.labels_output is not None):
        which = "--top-k" if options.top_k is not None else "--labels-output"
        msg = f"{which} needs --labels FILE (a text file with one label per line)"
        raise InvalidInputError(msg)
    if options.top_k is not None and options.top_k < 1:
        msg = f"--top-k {options.top_k}: must be at least 1"
        raise InvalidInputError(msg)
    norm = processing.parse_normalize(options.normalize) if options.normalize is not None else None
    labels = processing.read_labels(options.labels) if options.labels is not None else None
    if labels is not None and options.top_k is not None and options.top_k > len(labels):
        n = len(labels)
        msg = f"--top-k {options.top_k} is more than the {n} labels in {options.labels}; choose at most {n}"
        raise InvalidInputError(msg)
    return norm, labels


def _normalized_plan(plan: calibration.DataPlan, pre: Preprocessing) -> calibration.DataPlan:
    calib = processing.normalize(plan.calibration, pre) if plan.calibration is not None else None
    valid = processing.normalize(plan.validation, pre)
    mean, std = (":".join(f"{v:g}" for v in values) for values in (pre.mean, pre.std))
    note = (
        f"--normalize: calibration and validation data are raw; input {pre.input!r} is normalised as "
        f"(x - {mean}) / {std} before the models (golden inputs are stored normalised)"
    )
    return calibration.DataPlan(calib, valid, [*plan.notes, note])


def run(model: Path, profiles: list[Profile], options: Options, reporter: Reporter | None = None) -> Report:
    """Convert ``model`` for every profile. Bundles are written only for profiles within budget
    (or all with ``strict=False``); a profile whose engine crashed is in ``report.failed`` and the
    others still convert. The caller turns ``report.raise_failures`` and ``report.budget_failures``
    into errors."""
    reporter = reporter or Reporter()
    model = Path(model)
    out_dir = Path(options.output_dir)
    norm, labels = _parse_processing(options)
    profiles = auto.apply_option(options.quantization, profiles)
    needing = [p.name for p in profiles if auto.needs_calibration(p, options.quantization)]
    with (
        output_dir(out_dir),
        tempfile.TemporaryDirectory(prefix="edgekit-convert-") as tmp,
        EngineProcess(Path(tmp), timeout_s=options.step_timeout_s) as engine,
    ):
        reporter.start(len(profiles))
        workdir = Path(tmp)
        # TensorFlow's import in the worker overlaps with the source's loading here
        engine.start(tensorflow=any(p.conversion.format == "tflite" for p in profiles))
        reporter.step(None, f"loading {model}")
        source = load_source(model, workdir)
        pre = processing.preprocessing(norm, source.inputs, options.normalize_input) if norm is not None else None
        images = any(p is not None and Path(p).is_dir() for p in (options.calibration, options.validation))
        if pre is None and images and len(source.inputs) == 1 and options.image_range != "0,255":
            # Images arrive as pixels 0-255 (from a folder here, from cameras and `score` on the
            # device): the bundle scales them to the model's range itself, so both see the same.
            pre = calibration.image_preprocessing(options.image_range, source.inputs[0])
        samples = options.calibration_samples or max((p.conversion.calibration_samples for p in profiles), default=200)
        plan = calibration.plan(
            source.inputs,
            calibration=options.calibration,
            validation=options.validation,
            synthetic_calibration=options.synthetic_calibration,
            needs_calibration=bool(needing),
            calibration_samples=samples,
            needing="profile(s) " + ", ".join(needing),
        )
        if pre is not None:
            plan = _normalized_plan(plan, pre)
        reporter.step(None, "running the source model on the validation data")
        reference = source.predict(plan.validation.inputs)
        post = None
        if labels is not None and options.labels is not None:
            post = processing.postprocessing(labels, options.top_k, reference, options.labels_output, options.labels)
        report = Report(
            source={
                "path": str(model),
                "format": source.kind,
                "sha256": source.sha256,
                "size_bytes": source.size_bytes,
                "inputs": [s.model_dump() for s in source.inputs],
                "outputs": source.output_names,
                "validation_data": plan.validation.origin,
                "validation_samples": plan.validation.rows,
                "validation_labels": plan.validation.labels is not None,
                "calibration_data": plan.calibration.origin if plan.calibration else None,
                "preprocessing": pre.model_dump() if pre is not None else None,
                "postprocessing": post.model_dump() if post is not None else None,
            },
            data_notes=plan.notes,
            strict=options.strict,
        )
        for profile in profiles:
            profile_dir = workdir / profile.name
            profile_dir.mkdir()
            kwargs: dict[str, Any] = {
                "plan": plan,
                "reference": reference,
                "options": options,
                "workdir": profile_dir,
                "reporter": reporter,
                "engine": engine,
                "preprocessing": pre,
                "postprocessing": post,
            }
            try:
                if options.quantization == "auto":
                    result, bundle = auto.search(source, profile, **kwargs)
                else:
                    result, bundle = convert_profile(source, profile, **kwargs)
            except EngineCrashError as e:
                c = profile.conversion
                report.failed.append(ProfileFailure(profile.name, c.format, c.quantization, e))
                reporter.done(profile.name)
                continue
            if not (options.strict and result.failed_budgets):
                reporter.step(profile.name, "writing the bundle")
                target = out_dir / f"{bundle.manifest.name}-{profile.name}.ekb"
                result.bundle = bundle.write(target)
            report.results.append(result)
            reporter.done(profile.name)
    return report
