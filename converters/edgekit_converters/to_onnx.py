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
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import ConversionError
from edgekit.profiles import Profile
from edgekit_converters.calibration import Dataset, batches
from edgekit_converters.isolation import EngineSteps, Step
from edgekit_converters.sources import Source

_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}
_FUSED = {"Conv", "MatMul", "Gemm", "ConvTranspose"}
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


def _static_int8(base: Path, out: Path, profile: Profile, calibration: Dataset) -> Path:
    """quant_pre_process, then quantize_static with the profile's settings (``conversion.float_layers``
    as nodes_to_exclude); returns the pre-processed float model the node names refer to."""
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
        nodes_to_exclude=list(c.float_layers),
        extra_options={"CalibTensorRangeSymmetric": False},
    )
    return pre


def layer_errors(
    base: Path, workdir: Path, profile: Profile, calibration: Dataset, samples: int = 32
) -> list[tuple[str, str, float]]:
    """Each quantized node's own quantization error, worst first: (node name, op type, SQNR in dB of
    its output before and after QuantizeLinear/DequantizeLinear), from ONNX Runtime's qdq_loss_debug on
    ``samples`` calibration samples. A low SQNR marks a node whose int8 form loses its signal: the
    nodes to keep in float (nodes_to_exclude). Runs in the engine worker."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    qdq = workdir / "sensitivity_qdq.onnx"
    pre = _static_int8(base, qdq, profile, calibration)
    aug_float, aug_qdq = workdir / "sensitivity_float_aug.onnx", workdir / "sensitivity_qdq_aug.onnx"
    modify_model_output_intermediate_tensors(str(pre), str(aug_float))
    modify_model_output_intermediate_tensors(str(qdq), str(aug_qdq))
    feeds = batches(calibration, samples)
    float_acts = collect_activations(str(aug_float), feeds)  # type: ignore[arg-type]  # it iterates the reader
    qdq_acts = collect_activations(str(aug_qdq), feeds)  # type: ignore[arg-type]
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    producers = {out: node for node in onnx.load(str(pre)).graph.node for out in node.output}
    rows = []
    for tensor, err in errors.items():
        node = producers.get(tensor)
        value = float(err.get("qdq_err", float("nan")))
        if node is None or not node.name or value != value:  # noqa: PLR0124 - NaN check
            continue
        names = [node.name]
        # The quantizer fuses Conv/MatMul/Gemm with the activation after it (one QDQ pair on the
        # activation's output): keeping the activation in float means keeping the pair.
        before = producers.get(node.input[0]) if node.input else None
        if node.op_type in _ACTIVATIONS and before is not None and before.op_type in _FUSED and before.name:
            names.insert(0, before.name)
        rows.append((",".join(names), node.op_type, value))
    return sorted(rows, key=lambda r: r[2])


_NODE_IN_ERROR = re.compile(r"of node \(([^)]+)\)")


def _op_types(graph: Any) -> dict[str, str]:
    """Node name -> op type over a graph and its subgraphs (Loop / If / Scan bodies)."""
    out: dict[str, str] = {}
    for node in graph.node:
        out[node.name] = node.op_type
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out.update(_op_types(sub))
    return out


def _float16(base: Path, out: Path) -> list[str]:
    """onnxconverter_common's float16 conversion (float I/O kept). Where it leaves a type ONNX Runtime
    refuses (seen on tf2onnx's Less nodes of Keras Embedding and recurrent loops: "Type (tensor(float16))
    of output arg ... does not match expected type (tensor(float))"), that op type is kept in float32
    and the conversion redone; returns the op types kept in float32."""
    import onnx
    import onnxruntime as ort
    from onnxconverter_common import float16

    source = onnx.load(str(base))
    types = _op_types(source.graph)
    kept: list[str] = []
    for _ in range(8):
        model = float16.convert_float_to_float16(
            onnx.load(str(base)), keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *kept]
        )
        data = model.SerializeToString()
        try:
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as e:
            m = _NODE_IN_ERROR.search(str(e))
            op = types.get(m.group(1)) if m else None
            if op is None or op in kept:
                raise
            kept.append(op)
            continue
        out.write_bytes(data)
        return kept
    msg = f"float16 conversion still refused by ONNX Runtime with {', '.join(kept)} kept in float32"
    raise ConversionError(msg)


def quantize(base: Path, out: Path, profile: Profile, calibration: Dataset | None) -> list[str]:
    """Write the float32 ONNX model ``base`` in the profile's mode to ``out`` (runs in the engine
    worker: ONNX Runtime's quantizer can crash natively); returns notes on what stayed in float32."""
    c = profile.conversion
    notes: list[str] = []
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # onnxconverter_common warns about values clipped to the float16 range: reported below as
            # accuracy, which is what matters.
            warnings.simplefilter("ignore")
            if c.quantization == "float16":
                if kept := _float16(base, out):
                    notes.append(
                        f"kept in float32: op type(s) {', '.join(kept)} (their float16 form is a type ONNX Runtime "
                        "refuses to load)"
                    )
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
    return notes


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
    step = Step(f"ONNX {c.quantization} conversion", _instead(c.quantization))
    notes = engine.call(step, quantize, base, out, profile, calibration)
    return out.read_bytes(), notes


def sensitivity(
    source: Source, profile: Profile, calibration: Dataset, workdir: Path, engine: EngineSteps
) -> list[tuple[str, str, float]]:
    """layer_errors for the float ONNX model the conversion quantizes."""
    c = profile.conversion
    export = Step(f"tf2onnx export (opset {c.opset})", "another conversion.opset")
    base = source.onnx_model(c.opset, c.static_batch, engine=engine, step=export)
    folder = workdir / "sensitivity"
    folder.mkdir(exist_ok=True)
    step = Step("per-node quantization error (qdq_loss_debug)", "a mode without calibration")
    result: list[tuple[str, str, float]] = engine.call(step, layer_errors, base, folder, profile, calibration)
    return result
