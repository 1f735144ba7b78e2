"""SavedModel -> TFLite flatbuffer in one of the six TFLite modes of a profile.

Modes (https://ai.google.dev/edge/litert/models/post_training_quantization):
float32, float16 (weights), dynamic (int8 weights, float activations), int8 (full integer with
float fallback), int8-only (TFLITE_BUILTINS_INT8, int8/uint8 I/O), int16x8 (int16 activations).
"""

from __future__ import annotations

import csv
import io
import math
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
    """The flatbuffer of the SavedModel at ``saved`` (runs in the engine worker: it can crash natively).
    ``conversion.float_layers`` are kept in float with TensorFlow's selective quantization
    (QuantizationDebugger's denylisted_nodes)."""
    tf = tensorflow()
    c = profile.conversion
    with captured_stderr() as cap:
        try:
            conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            _configure(tf, conv, profile, calibration)
            if c.float_layers and calibration is not None:
                options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(c.float_layers))
                debugger = _debugger(tf, conv, calibration, 16, options)
                result: bytes = debugger.get_nondebug_quantized_model()
            else:
                result = conv.convert()
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - the converter raises ConverterError, ValueError, RuntimeError...
            failure = e
        else:
            return result
    text = f"{failure} {cap.text}"
    if any(s in text for s in _NEEDS_STATIC):
        if dynamic_batch:
            raise _NeedsStaticBatchError(cap.errors()) from failure
        msg = (
            f"TFLite conversion for profile {profile.name}: the model's recurrent layers do not lower to TFLite "
            "even with a static batch (TensorListReserve without a static element shape); convert the .keras "
            "file instead, whose LSTM/GRU layers edgekit can rebuild and unroll"
        )
        raise ConversionError(msg) from failure
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


def _debugger(tf: Any, conv: Any, calibration: Dataset, samples: int, options: Any = None) -> Any:
    """A QuantizationDebugger over ``samples`` calibration samples. Its debug_dataset yields lists in
    the order of the quantized interpreter's inputs (not dicts, as the converter's does): the order is
    read off that interpreter once the debugger made it (inputs are named serving_default_NAME:0)."""
    feeds = batches(calibration, samples)
    order: list[str] = []

    def gen() -> Iterator[list[Any]]:
        for feed in feeds:
            yield [feed[name] for name in order]

    debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=gen, debug_options=options)
    for detail in debugger._quant_interpreter.get_input_details():
        name = detail["name"].removeprefix("serving_default_").rsplit(":", 1)[0]
        if name not in feeds[0]:
            if len(feeds[0]) != 1:  # several inputs: guessing would feed one input another's data
                msg = (
                    f"cannot tell which input the quantized model's {detail['name']!r} is (inputs: {sorted(feeds[0])})"
                )
                raise ConversionError(msg)
            name = next(iter(feeds[0]))
        order.append(name)
    return debugger


def layer_errors(
    saved: Path, profile: Profile, calibration: Dataset, samples: int = 32
) -> list[tuple[str, str, float]]:
    """Each quantized layer's own quantization error, worst first: (tensor name, op, RMSE / scale), from
    TensorFlow's QuantizationDebugger on ``samples`` calibration samples. An RMSE of a large part of a
    quantization step means that layer's int8 form loses what its float form carries; those are the
    layers to keep in float. Runs in the engine worker."""
    tf = tensorflow()
    with captured_stderr():
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        _configure(tf, conv, profile, calibration)
        debugger = _debugger(tf, conv, calibration, samples)
        debugger.run()
        buf = io.StringIO()
        debugger.layer_statistics_dump(buf)
    rows = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        scale = float(row["scale"] or 0)
        mse = float(row["mean_squared_error"] or 0)
        if scale > 0 and math.isfinite(mse):
            rows.append((row["tensor_name"], row["op_name"], math.sqrt(mse) / scale))
    return sorted(rows, key=lambda r: -r[2])


def sensitivity(
    source: Source, profile: Profile, calibration: Dataset, engine: EngineSteps
) -> list[tuple[str, str, float]]:
    """layer_errors for the SavedModel the conversion uses (the same static batch / unrolling)."""
    unroll = _unrolls(source, profile, calibration)
    static = profile.conversion.static_batch or (1 if source.recurrent_layers and not unroll else None)
    saved = source.saved_model(static, unroll=unroll)
    step = Step("per-layer quantization error (QuantizationDebugger)", "a mode without calibration")
    result: list[tuple[str, str, float]] = engine.call(step, layer_errors, saved, profile, calibration)
    return result


def _unrolls(source: Source, profile: Profile, calibration: Dataset | None) -> bool:
    """Whether the conversion unrolls the source's recurrent layers: a calibrated mode, calibration data,
    conversion.unroll_recurrent, and Keras recurrent layers."""
    c = profile.conversion
    return bool(calibration is not None and c.needs_calibration and c.unroll_recurrent and source.recurrent_layers)


def _step(profile: Profile, static_batch: int | None, *, unrolled: bool = False) -> Step:
    c = profile.conversion
    mode = c.quantization
    name = "TFLite conversion" + (f" with {mode} calibration" if c.needs_calibration else "")
    if static_batch is not None:
        name += f" (static batch of {static_batch}" + (", recurrent layers unrolled)" if unrolled else ")")
    others = " or ".join(f'"{m}"' for m in ("dynamic", "float16") if m != mode)
    instead = f"a copy of the profile with conversion.quantization = {others} (no calibration)"
    if static_batch is None:
        instead += ", or conversion.static_batch = 1 (a static input signature)"
    if c.needs_calibration and not unrolled:
        instead += (
            "; for LSTM/GRU models, convert the .keras file with conversion.unroll_recurrent = true (the default): "
            "edgekit unrolls them to calibrate"
        )
    return Step(name, instead)


def _convert_once(
    source: Source,
    profile: Profile,
    calibration: Dataset | None,
    static_batch: int | None,
    engine: EngineSteps,
    *,
    unroll: bool = False,
) -> bytes:
    saved = source.saved_model(static_batch, unroll=unroll)
    step = _step(profile, static_batch, unrolled=unroll)
    return engine.call(step, convert_saved_model, saved, profile, calibration, dynamic_batch=static_batch is None)


def convert(
    source: Source, profile: Profile, calibration: Dataset | None, engine: EngineSteps
) -> tuple[bytes, list[str]]:
    """The flatbuffer and notes. A model that only converts with a static batch (LSTM/GRU) is retried
    with batch 1, and the note says so. A Keras model with recurrent layers is calibrated with
    those layers unrolled (TensorFlow 2.21's calibrator crashes on the while loop they export to)."""
    static = profile.conversion.static_batch
    notes: list[str] = []
    unroll = _unrolls(source, profile, calibration)
    if unroll:
        layers = ", ".join(source.recurrent_layers)
        notes.append(
            f"recurrent layers {layers} unrolled over their time steps for {profile.conversion.quantization} "
            "calibration (same weights, same outputs checked): TensorFlow's calibrator crashes (SIGSEGV) on "
            "the while loop they export to. The unrolled graph has one copy of the cell's ops per time step, so "
            'the file can be larger than the float model\'s; conversion.quantization = "dynamic" keeps the loop '
            "and int8 weights"
        )
    try:
        return _convert_once(source, profile, calibration, static, engine, unroll=unroll), notes
    except _NeedsStaticBatchError:
        pass
    notes.append(
        "converted with a static batch of 1: this model (recurrent layers?) does not convert with a dynamic batch"
    )
    return _convert_once(source, profile, calibration, 1, engine, unroll=unroll), notes
