"""Small real models for the runtime tests, built with Keras -> TFLite and onnx.helper, wrapped as bundles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.backends import load_backend
from edgekit_runtime.bundle import (
    GOLDEN_INPUTS,
    GOLDEN_OUTPUTS,
    MODEL_FILES,
    BatchingSettings,
    Bundle,
    GoldenInfo,
    Manifest,
    Postprocessing,
    ProfileRef,
    RuntimeSettings,
    sha256_bytes,
)


def make_bundle(
    path: Path,
    *,
    name: str,
    version: int,
    fmt: str,
    model: bytes,
    golden_in: dict[str, np.ndarray] | None = None,
    golden_out: dict[str, np.ndarray] | None = None,
    atol: float = 1e-4,
    batching: dict[str, Any] | None = None,
    threads: int = 1,
    quantization: str = "none",
    postprocessing: Postprocessing | None = None,
) -> Path:
    backend = load_backend(fmt, model)
    golden = None
    if golden_in is not None:
        if golden_out is None:
            golden_out = backend.run(golden_in)
        golden = GoldenInfo(
            inputs=GOLDEN_INPUTS, outputs=GOLDEN_OUTPUTS, count=len(next(iter(golden_in.values()))), atol=atol
        )
    manifest = Manifest(
        name=name,
        version=version,
        format=fmt,  # type: ignore[arg-type]
        quantization=quantization,
        model_file=MODEL_FILES[fmt],
        model_sha256=sha256_bytes(model),
        model_size_bytes=len(model),
        inputs=backend.signature.inputs,
        outputs=backend.signature.outputs,
        profile=ProfileRef(
            name="test", runtime=RuntimeSettings(threads=threads, batching=BatchingSettings(**(batching or {})))
        ),
        golden=golden,
        postprocessing=postprocessing,
        created="2026-01-01T00:00:00Z",
    )
    Bundle(manifest, model, golden_in or {}, golden_out or {}).write(path)
    return path


def keras_mlp(seed: int = 0) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=(4,), name="x")
    h = keras.layers.Dense(8, activation="relu")(inp)
    out = keras.layers.Dense(3, name="y")(h)
    return keras.Model(inp, out)


def to_tflite(model: Any, workdir: Path, *, fixed_batch: int | None = None, int8: bool = False) -> bytes:
    import tensorflow as tf

    kwargs: dict[str, Any] = {}
    if fixed_batch is not None:
        kwargs["input_signature"] = [tf.TensorSpec([fixed_batch, 4], tf.float32, name="x")]
    model.export(str(workdir), verbose=False, **kwargs)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(workdir))
    if int8:
        rng = np.random.default_rng(0)

        def rep() -> Any:
            for _ in range(50):
                yield [rng.normal(size=(1, 4)).astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return bytes(conv.convert())


def onnx_softmax(w: np.ndarray, *, x: str = "x", out: str = "probs") -> bytes:
    """``x``: float32[-1, rows of w] -> ``out`` = softmax(x w), [-1, columns of w]: a classifier
    built with onnx.helper (no TensorFlow)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "w"], ["logits"]), helper.make_node("Softmax", ["logits"], [out])],
        "softmax",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def onnx_two_in_two_out() -> bytes:
    """a, b: float32[-1, 3] -> sum = a + b, prod = a * b."""
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3])
    p = helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["prod"])],
        "g",
        [a, b],
        [s, p],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_identity_of(elem_type: str, dims: list[int | str]) -> bytes:
    """x -> y = x, both of ONNX element type ``elem_type`` (``"STRING"``, ``"FLOAT"``...) and shape
    ``dims`` (a name is a dynamic dimension): strings, or a dynamic dimension after the batch one."""
    import onnx
    from onnx import TensorProto, helper

    elem = getattr(TensorProto, elem_type)
    x = helper.make_tensor_value_info("x", elem, dims)
    y = helper.make_tensor_value_info("y", elem, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnx_via_tf2onnx(model: Any, workdir: Path) -> bytes:
    """The SavedModel path of tf2onnx (the one that works on TF >= 2.16)."""
    saved = workdir / "saved"
    model.export(str(saved), verbose=False)
    out = workdir / "model.onnx"
    subprocess.run(
        [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved), "--output", str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()
