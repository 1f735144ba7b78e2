"""Source -> ONNX file in one of the four ONNX modes of a profile.

float32 (tf2onnx's SavedModel path, or the ONNX source as is), float16
(onnxconverter_common, float I/O kept), dynamic-int8 (``quantize_dynamic``) and static-int8
(``quant_pre_process`` then ``quantize_static``: QDQ, S8S8, per-channel and the calibration method
from the profile), as https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html
recommends.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import ConversionError
from edgekit.profiles import Profile
from edgekit_converters.calibration import Dataset, batches
from edgekit_converters.isolation import EngineSteps, Step
from edgekit_converters.sources import Source

_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our samples (one sample per call)."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._it: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


def _static_int8(base: Path, out: Path, profile: Profile, calibration: Dataset) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    c = profile.conversion
    base, out = base.resolve(), out.resolve()
    pre = out.with_name(out.stem + "_pre.onnx")
    # ORT's symbolic shape inference writes sym_shape_infer_temp.onnx into the working directory:
    # run it in the conversion's own temporary folder, never the user's.
    cwd = Path.cwd()
    os.chdir(out.parent)
    try:
        try:
            quant_pre_process(str(base), str(pre), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs; ORT allows skipping it
            quant_pre_process(str(base), str(pre), skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    reader = _Reader(batches(calibration, c.calibration_samples))
    quantize_static(
        str(pre),
        str(out),
        reader,  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=c.per_channel,
        calibrate_method=getattr(CalibrationMethod, _METHODS[c.calibration_method]),
        extra_options={"CalibTensorRangeSymmetric": False},
    )


def quantize(base: Path, out: Path, profile: Profile, calibration: Dataset | None) -> None:
    """Write the float32 ONNX model ``base`` in the profile's mode to ``out`` (runs in the engine
    worker: ONNX Runtime's quantizer can crash natively)."""
    import onnx

    c = profile.conversion
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # onnxconverter_common warns about values clipped to the float16 range: reported below as
            # accuracy, which is what matters.
            warnings.simplefilter("ignore")
            if c.quantization == "float16":
                from onnxconverter_common import float16

                model = float16.convert_float_to_float16(onnx.load(str(base)), keep_io_types=True)
                onnx.save(model, str(out))
            elif c.quantization == "dynamic-int8":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(base), str(out), weight_type=QuantType.QInt8, per_channel=c.per_channel)
            elif c.quantization == "static-int8":
                if calibration is None:  # the pipeline checks this first; a guard for direct callers
                    msg = f"profile {profile.name}: static-int8 needs calibration data"
                    raise ConversionError(msg)
                _static_int8(base, out, profile, calibration)
            else:  # pragma: no cover - profiles are validated against ONNX_MODES
                msg = f"unknown ONNX mode {c.quantization!r}"
                raise ConversionError(msg)
    except ConversionError:
        raise
    except Exception as e:  # onnx / onnxruntime raise untyped errors
        msg = f"ONNX {c.quantization} conversion for profile {profile.name} failed: {_first_line(e)}"
        raise ConversionError(msg) from e


def _instead(mode: str) -> str:
    others = " or ".join(f'"{m}"' for m in ("dynamic-int8", "float16", "float32") if m != mode)
    return f"a copy of the profile with conversion.quantization = {others}"


def convert(
    source: Source, profile: Profile, calibration: Dataset | None, workdir: Path, engine: EngineSteps
) -> tuple[bytes, list[str]]:
    """The ONNX model bytes for ``profile`` and notes about the conversion."""
    c = profile.conversion
    export = Step(
        f"tf2onnx export (opset {c.opset})",
        "another conversion.opset" + ("" if c.static_batch else ", or conversion.static_batch = 1"),
    )
    base = source.onnx_model(c.opset, c.static_batch, engine=engine, step=export)
    if c.quantization == "float32":
        return base.read_bytes(), []
    out = workdir / f"{profile.name}.onnx"
    engine.call(
        Step(f"ONNX {c.quantization} conversion", _instead(c.quantization)), quantize, base, out, profile, calibration
    )
    return out.read_bytes(), []
