"""Benchmark models: build them from Keras, convert to float TFLite and ONNX, wrap them into bundles.

Run as a script it builds model files (this is the only place TensorFlow is imported, so the
benchmark process itself stays free of TensorFlow's memory and threads):

    python bench/_models.py OUT_DIR NAME [NAME ...]

Imported, it gives ``ensure_models`` (build what is missing, in a subprocess) and ``make_bundle``.
Built files are cached under ``OUT_DIR/NAME/`` keyed by the model's spec, so reruns start at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Bump when the way models are built changes, to invalidate caches.
_BUILD_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: an MLP (``layers`` = widths, input first) or a MobileNetV2."""

    name: str
    kind: str  # "mlp" or "mobilenet_v2"
    layers: tuple[int, ...] = ()
    image_size: int = 224
    alpha: float = 1.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "mlp":
            return (self.layers[0],)
        return (self.image_size, self.image_size, 3)

    def describe(self) -> str:
        if self.kind == "mlp":
            return "MLP " + "-".join(str(n) for n in self.layers)
        extra = "" if self.alpha == 1.0 else f" alpha={self.alpha}"
        return f"MobileNetV2{extra} {self.image_size}x{self.image_size}x3"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mlp-big", "mlp", (512, 2048, 2048, 2048, 10)),
        ModelSpec("mlp-small", "mlp", (64, 256, 256, 10)),
        ModelSpec("mobilenet-v2", "mobilenet_v2", image_size=224),
        # --smoke: the same shapes of model, small enough to build and run in seconds.
        ModelSpec("mlp-big-smoke", "mlp", (128, 512, 512, 512, 10)),
        ModelSpec("mobilenet-v2-smoke", "mobilenet_v2", image_size=96, alpha=0.35),
    )
}


def _spec_key(spec: ModelSpec) -> str:
    return json.dumps({"build": _BUILD_VERSION, **asdict(spec)}, sort_keys=True)


def _is_built(out: Path, spec: ModelSpec) -> bool:
    d = out / spec.name
    key = d / "spec.json"
    return (
        key.exists()
        and key.read_text() == _spec_key(spec)
        and (d / "model.tflite").exists()
        and (d / "model.onnx").exists()
    )


def ensure_models(out: Path, names: list[str]) -> dict[str, Path]:
    """Build the models not yet cached under ``out`` (in a TensorFlow subprocess); their folders by name."""
    missing = [n for n in names if not _is_built(out, MODELS[n])]
    if missing:
        print(f"# building models {', '.join(missing)} (TensorFlow, tf2onnx; cached in {out})", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), *missing], check=True)
        print(f"# models built in {time.perf_counter() - t0:.0f} s", flush=True)
    return {n: out / n for n in names}


# --- building (subprocess, imports TensorFlow) -------------------------------------------------------


def _keras_model(spec: ModelSpec):  # -> keras.Model (keras is imported lazily)
    import keras

    keras.utils.set_random_seed(0)
    if spec.kind == "mlp":
        inputs = keras.Input(shape=spec.input_shape, name="x")
        h = inputs
        for width in spec.layers[1:-1]:
            h = keras.layers.Dense(width, activation="relu")(h)
        outputs = keras.layers.Dense(spec.layers[-1])(h)
        return keras.Model(inputs, outputs, name=spec.name.replace("-", "_"))
    return keras.applications.MobileNetV2(weights=None, input_shape=spec.input_shape, alpha=spec.alpha, classes=1000)


def _build(out: Path, spec: ModelSpec) -> Callable[[], None]:
    """Build the Keras model and its TFLite file; start tf2onnx and return a function that waits for it.

    tf2onnx runs in its own process, so the next model builds while this one converts.
    """
    import shutil
    import tempfile

    import tensorflow as tf

    d = out / spec.name
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = _keras_model(spec)
    tmp = Path(tempfile.mkdtemp(prefix="edgekit-bench-"))
    saved = tmp / "saved_model"
    # Keras 3: from_keras_model fails (keras#18430); export a SavedModel and convert that.
    model.export(str(saved), verbose=False)
    tflite = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
    (d / "model.tflite").write_bytes(tflite)
    onnx_tmp = d / "model.onnx.part"
    log = tmp / "tf2onnx.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tf2onnx.convert",
                "--saved-model",
                str(saved),
                "--output",
                str(onnx_tmp),
                "--opset",
                "17",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )

    def finish() -> None:
        try:
            if proc.wait() != 0:
                msg = f"tf2onnx failed for {spec.name}:\n{log.read_text(errors='replace')[-3000:]}"
                raise RuntimeError(msg)
            onnx_tmp.replace(d / "model.onnx")
            (d / "spec.json").write_text(_spec_key(spec))
            print(f"#   {spec.name}: {spec.describe()} built in {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return finish


# --- bundles (benchmark process; no TensorFlow) --------------------------------------------------------


def make_bundle(model_dir: Path, spec: ModelSpec, fmt: str, *, threads: int) -> Path:
    """Wrap ``model_dir/model.{fmt}`` into an ``.ekb`` bundle named ``NAME-FMT`` with golden samples."""
    from edgekit_runtime.backends import load_backend
    from edgekit_runtime.bundle import (
        MODEL_FILES,
        Bundle,
        GoldenInfo,
        Manifest,
        ProfileRef,
        RuntimeSettings,
        sha256_bytes,
    )
    from edgekit_runtime.latency import sample_inputs

    name = f"{spec.name}-{fmt}"
    path = model_dir / f"{name}.ekb"
    model = (model_dir / MODEL_FILES[fmt]).read_bytes()
    settings = RuntimeSettings(threads=threads)
    backend = load_backend(fmt, model, settings)
    golden_in = sample_inputs(backend, 2, seed=1)
    golden_out = backend.run(golden_in)
    backend.close()
    manifest = Manifest(
        name=name,
        version=1,
        format=fmt,  # type: ignore[arg-type]
        quantization="float32",
        model_file=MODEL_FILES[fmt],
        model_sha256=sha256_bytes(model),
        model_size_bytes=len(model),
        inputs=backend.signature.inputs,
        outputs=backend.signature.outputs,
        profile=ProfileRef(name="bench", runtime=settings),
        golden=GoldenInfo(count=2, atol=1e-3, rtol=1e-3),
        converter={"tool": "bench/_models.py"},
    )
    golden_in = {k: np.asarray(v) for k, v in golden_in.items()}
    Bundle(manifest, model, golden_in, golden_out).write(path)
    return path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out = Path(argv[0])
    previous: Callable[[], None] | None = None
    for name in argv[1:]:
        finish = _build(out, MODELS[name])  # overlaps the previous model's tf2onnx run
        if previous is not None:
            previous()
        previous = finish
    if previous is not None:
        previous()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
