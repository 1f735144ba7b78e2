"""Accuracy-aware quantization: ``edgekit convert --quantization auto``.

Per profile, the modes of ``conversion.allowed_quantizations`` are tried in the profile's order
(smallest / fastest first, safest last). Each try is a whole conversion, validated on the device's
runtime backend against the source, with the profile's budgets. The first try within every budget
wins. When a mode with float fallback (TFLite int8 / int16x8, ONNX static-int8) fails only on
accuracy, its most damaged layers are kept in float - ranked by their own quantization error
(TensorFlow's QuantizationDebugger, ONNX Runtime's qdq_loss_debug) - 1, 2, 4 then 8 of them, before
the next mode is tried. Every try is in the report and the manifest, with why the winner won.

Accuracy is the profile's ``max_accuracy_drop_points`` on labelled validation data; without labels
the top-1 disagreement with the source (an upper bound of the accuracy drop) stands in for it, and
for outputs that are not class scores the cosine similarity (``min_cosine_similarity``, or 0.99).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgekit.errors import EdgekitError, InvalidInputError
from edgekit.profiles import _NEEDS_CALIBRATION, FLOAT_FALLBACK_MODES, MODES, Profile
from edgekit_converters import to_onnx, to_tflite
from edgekit_converters.sources import Source
from edgekit_runtime.bundle import Bundle

AUTO = "auto"
DEFAULT_MIN_COSINE = 0.99  # outputs that are not class scores, when the profile sets no cosine budget
FALLBACK_STEPS = (1, 2, 4, 8)  # layers kept in float, in turn
_ACCURACY = {"max_accuracy_drop_points", "min_top1_agreement", "min_cosine_similarity"}


def apply_option(value: str | None, profiles: list[Profile]) -> list[Profile]:
    """The profiles as ``--quantization`` makes them, checked before any work: unchanged for none or
    auto (the search applies its modes itself), else each with that mode, which must be one of its
    format's and possible for it (e.g. not float16 for a profile with int8 I/O)."""
    if value is None or value == AUTO:
        return profiles
    for p in profiles:
        modes = MODES[p.conversion.format]
        if value not in modes:
            msg = (
                f"--quantization {value}: not a {p.conversion.format} mode (profile {p.name}); "
                f"use auto or one of {', '.join(modes)}"
            )
            raise InvalidInputError(msg)
    return [with_mode(p, value) for p in profiles]


def needs_calibration(profile: Profile, value: str | None) -> bool:
    """Whether the run must have calibration data for ``profile`` (as apply_option left it; auto skips
    the modes it lacks data for)."""
    return value != AUTO and profile.conversion.needs_calibration


def _only_accuracy(failed: list[str]) -> bool:
    """Whether every failed budget of a try is an accuracy one (keeping layers in float may help)."""
    return all(f.split()[0] in _ACCURACY or f.startswith("cosine") for f in failed)


def with_mode(profile: Profile, mode: str, float_layers: list[str] | None = None) -> Profile:
    """The profile with another ``conversion.quantization`` (and float layers), validated as a file is."""
    data = profile.model_dump()
    data["conversion"]["quantization"] = mode
    data["conversion"]["float_layers"] = list(float_layers or [])
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        reason = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        msg = f"--quantization {mode} is not possible for profile {profile.name}: {reason}"
        raise InvalidInputError(msg) from e


def _judge(result: Any, profile: Profile, labelled: bool) -> tuple[list[str], float | None, str]:
    """Failed budgets (as text), the accuracy figure used and what it is."""
    failed = [
        f"{c.budget} {c.value:.4g} {'>' if c.budget.startswith('max') else '<'} {c.limit:g}"
        for c in result.failed_budgets
        if c.value is not None
    ]
    m = result.metrics
    limit = profile.budgets.max_accuracy_drop_points
    if labelled and m.get("accuracy_drop_points") is not None:
        return failed, m["accuracy_drop_points"], "accuracy drop (points)"
    if m.get("top1_agreement") is not None:
        drop = (1 - m["top1_agreement"]) * 100
        if limit is not None and drop > limit:
            failed.append(f"max_accuracy_drop_points {drop:.4g} > {limit:g} (as top-1 disagreement, no labels)")
        return failed, drop, "top-1 disagreement (points)"
    cosine = m.get("cosine_similarity")
    floor = profile.budgets.min_cosine_similarity
    if cosine is not None and floor is None and cosine < DEFAULT_MIN_COSINE:
        failed.append(f"cosine_similarity {cosine:.4g} < {DEFAULT_MIN_COSINE} (auto's floor for non-class outputs)")
    return failed, cosine, "cosine similarity"


def _entry(mode: str, layers: list[str], **kw: Any) -> dict[str, Any]:
    return {"mode": mode, "float_layers": layers, **kw}


def search(source: Source, profile: Profile, **kwargs: Any) -> tuple[Any, Bundle]:
    """The winning conversion for ``profile`` and its bundle (not written), with every try recorded in
    ``result.search`` and the manifest. If no try is within budget, the try with the fewest failed
    budgets (then the best accuracy) is returned with its failures, so a strict run refuses it."""
    from edgekit_converters.pipeline import convert_profile

    plan = kwargs["plan"]
    workdir: Path = kwargs["workdir"]
    labelled = plan.validation.labels is not None
    tries: list[dict[str, Any]] = []
    done: list[tuple[dict[str, Any], Any, Bundle]] = []
    last_error: EdgekitError | None = None

    def attempt(mode: str, layers: list[str]) -> tuple[dict[str, Any], Any, Bundle] | None:
        nonlocal last_error
        folder = workdir / f"try{len(tries)}"
        folder.mkdir()
        try:
            candidate = with_mode(profile, mode, layers)
            result, bundle = convert_profile(source, candidate, **{**kwargs, "workdir": folder})
        except EdgekitError as e:
            last_error = e
            tries.append(_entry(mode, layers, converted=False, error=e.message, verdict="not converted"))
            return None
        failed, accuracy, kind = _judge(result, profile, labelled)
        entry = _entry(
            mode,
            layers,
            converted=True,
            size_bytes=result.size_bytes,
            latency_p50_ms_b1=result.metrics.get("latency_p50_ms_b1"),
            accuracy=None if accuracy is None else round(float(accuracy), 4),
            accuracy_kind=kind,
            failed=failed,
            verdict="within budgets" if not failed else "over budget: " + "; ".join(failed),
        )
        tries.append(entry)
        done.append((entry, result, bundle))
        return entry, result, bundle

    winner = None
    for mode in profile.conversion.auto_modes:
        if mode in _NEEDS_CALIBRATION and plan.calibration is None:
            tries.append(_entry(mode, [], converted=False, verdict="skipped: needs --calibration data"))
            continue
        got = attempt(mode, [])
        if got is None:
            continue
        if not got[0]["failed"]:
            winner = got
            break
        if mode in FLOAT_FALLBACK_MODES and _only_accuracy(got[0]["failed"]):
            winner = _fallback(source, profile, mode, kwargs, attempt, tries)
            if winner is not None:
                break
    if winner is None:
        if not done:
            assert last_error is not None  # every mode was tried or skipped
            if all(t["verdict"].startswith("skipped") for t in tries):
                msg = f"profile {profile.name}: --quantization auto has no mode to try without --calibration data"
                raise InvalidInputError(msg)
            raise last_error
        winner = min(done, key=lambda d: (len(d[0]["failed"]), -(d[0]["accuracy"] or 0)))
    entry, result, bundle = winner
    entry["chosen"] = True
    reason = _reason(entry, tries)
    result.search = {
        "tries": tries,
        "chosen": {"mode": entry["mode"], "float_layers": entry["float_layers"]},
        "reason": reason,
    }
    result.notes.append("--quantization auto: " + reason)
    bundle.manifest.validation["quantization_search"] = result.search
    if entry["float_layers"]:
        bundle.manifest.calibration["float_layers_reason"] = (
            "--quantization auto: the layers with the largest quantization error, kept in float to meet the "
            "accuracy budget"
        )
    return result, bundle


def _fallback(  # noqa: PLR0917 - one private call site
    source: Source, profile: Profile, mode: str, kwargs: dict[str, Any], attempt: Any, tries: list[dict[str, Any]]
) -> Any:
    """Keep the most damaged layers of ``mode`` in float, 1, 2, 4, 8 of them; the first within budget."""
    candidate = with_mode(profile, mode)
    calib = kwargs["plan"].calibration
    steps = kwargs["engine"].for_profile(profile.name, f"{candidate.conversion.format} {mode}")
    try:
        if candidate.conversion.format == "tflite":
            ranking = to_tflite.sensitivity(source, candidate, calib, steps)
        else:
            ranking = to_onnx.sensitivity(source, candidate, calib, kwargs["workdir"], steps)
    except EdgekitError as e:
        tries.append(_entry(mode, [], converted=False, verdict=f"per-layer errors not measured: {e.message}"))
        return None
    groups = list(dict.fromkeys(name for name, _, _ in ranking))  # ONNX: "conv,relu" kept together
    for k in FALLBACK_STEPS:
        if k > len(groups) or (k > 1 and k // 2 >= len(groups)):
            break
        layers = [n for group in groups[:k] for n in group.split(",")]
        got = attempt(mode, layers)
        if got is None:
            return None
        if not got[0]["failed"]:
            return got
        if not _only_accuracy(got[0]["failed"]):
            return None  # keeping layers in float now breaks size or latency: more would not help
    return None


def _describe(entry: dict[str, Any]) -> str:
    layers: list[str] = entry["float_layers"]
    mode: str = entry["mode"]
    return mode + (f" with {len(layers)} layer(s) in float" if layers else "")


def _reason(entry: dict[str, Any], tries: list[dict[str, Any]]) -> str:
    earlier = tries[: tries.index(entry)]
    why = "the first try within every budget" if not entry["failed"] else "no try was within budget; the closest"
    text = f"chose {_describe(entry)}: {why}"
    if entry.get("accuracy") is not None:
        text += f" ({entry['accuracy_kind']} {entry['accuracy']:g}, {entry['size_bytes'] / 1e6:.3f} MB)"
    if earlier:
        text += "; before it: " + "; ".join(f"{_describe(t)} {t['verdict']}" for t in earlier)
    return text
