"""SavedModel -> TFLite flatbuffer in one of the six TFLite modes of a profile.

Modes (https://ai.google.dev/edge/litert/models/post_training_quantization):
float32, float16 (weights), dynamic (int8 weights, float activations), int8 (full integer with
float fallback), int8-only (TFLITE_BUILTINS_INT8, int8/uint8 I/O), int16x8 (int16 activations).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import ConversionError, UnsupportedOpError
from edgekit.profiles import Profile
from edgekit_converters._native import captured_stderr, tensorflow
from edgekit_converters.calibration import Dataset, batches
from edgekit_converters.isolation import EngineSteps, Step
from edgekit_converters.sources import Source

# The converter's ways of saying "this op has no kernel in the op set you asked for".
_UNSUPPORTED = (
    re.compile(r"Quantization not yet supported for op: '([\w.]+)'"),
    re.compile(r"'(?:tf|tfl)\.(\w+)' op is neither a custom op nor a flex op"),
    re.compile(r"failed to legalize operation '(?:tf|tfl)\.(\w+)'"),
)
_NEEDS_STATIC = ("TensorListReserve", "element_shape to be static")


class _NeedsStaticBatchError(ConversionError):
    """Recurrent layers with a dynamic batch do not lower to TFLite; a fixed batch does."""


def _representative(data: Dataset, limit: int) -> Any:
    feeds = batches(data, limit)

    def gen() -> Iterator[dict[str, Any]]:
        yield from feeds

    return gen


def _configure(tf: Any, conv: Any, profile: Profile, calibration: Dataset | None) -> None:
    c = profile.conversion
    mode = c.quantization
    if mode == "float32":
        return
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
        return
    if mode == "dynamic":
        return
    if calibration is None:  # checked by the pipeline before any work; a guard for direct callers
        msg = f"profile {profile.name}: mode {mode} needs calibration data"
        raise ConversionError(msg)
    conv.representative_dataset = _representative(calibration, c.calibration_samples)
    if not c.per_channel:
        conv._experimental_disable_per_channel = True
    if mode == "int8-only":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = getattr(tf, c.input_dtype)
        conv.inference_output_type = getattr(tf, c.output_dtype)
    elif mode == "int16x8":
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,  # float fallback for ops without a 16x8 kernel
        ]


def convert_saved_model(saved: Path, profile: Profile, calibration: Dataset | None, *, dynamic_batch: bool) -> bytes:
    """The flatbuffer of the SavedModel at ``saved`` (runs in the engine worker: it can crash natively)."""
    tf = tensorflow()
    with captured_stderr() as cap:
        try:
            conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            _configure(tf, conv, profile, calibration)
            result: bytes = conv.convert()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - the converter raises ConverterError, ValueError, RuntimeError...
            failure = e
        else:
            return result
    text = f"{failure} {cap.text}"
    if dynamic_batch and any(s in text for s in _NEEDS_STATIC):
        raise _NeedsStaticBatchError(cap.errors()) from failure
    for pattern in _UNSUPPORTED:
        if m := pattern.search(text):
            op = m.group(1).upper()
            msg = (
                f"op {op} cannot run on profile {profile.name} "
                f"({profile.conversion.format} {profile.conversion.quantization}): the converter has no kernel for it "
                "in this mode; replace that layer or choose another profile"
            )
            raise UnsupportedOpError(msg) from failure
    detail = cap.errors() or str(failure).strip().splitlines()[0][:300]
    msg = f"TFLite conversion for profile {profile.name} ({profile.conversion.quantization}) failed: {detail}"
    raise ConversionError(msg) from failure


def _step(profile: Profile, static_batch: int | None) -> Step:
    c = profile.conversion
    mode = c.quantization
    name = "TFLite conversion" + (f" with {mode} calibration" if c.needs_calibration else "")
    if static_batch is not None:
        name += f" (static batch of {static_batch})"
    others = " or ".join(f'"{m}"' for m in ("dynamic", "float16") if m != mode)
    instead = f"a copy of the profile with conversion.quantization = {others} (no calibration)"
    if static_batch is None:
        instead += ", or conversion.static_batch = 1 (a static input signature)"
    return Step(name, instead)


def _convert_once(
    source: Source, profile: Profile, calibration: Dataset | None, static_batch: int | None, engine: EngineSteps
) -> bytes:
    saved = source.saved_model(static_batch)
    step = _step(profile, static_batch)
    return engine.call(step, convert_saved_model, saved, profile, calibration, dynamic_batch=static_batch is None)


def convert(
    source: Source, profile: Profile, calibration: Dataset | None, engine: EngineSteps
) -> tuple[bytes, list[str]]:
    """The flatbuffer and notes. A model that only converts with a static batch (LSTM/GRU) is retried
    with batch 1, and the note says so."""
    static = profile.conversion.static_batch
    try:
        return _convert_once(source, profile, calibration, static, engine), []
    except _NeedsStaticBatchError:
        pass
    note = "converted with a static batch of 1: this model (recurrent layers?) does not convert with a dynamic batch"
    return _convert_once(source, profile, calibration, 1, engine), [note]
