"""The model to convert: detect its kind, load it, run it as the reference, export it for converters.

Three kinds are detected from the path: a Keras 3 ``.keras`` file, a TensorFlow SavedModel
directory and an ONNX file. Keras models go through ``model.export()`` to a SavedModel, because
``TFLiteConverter.from_keras_model`` and tf2onnx's ``from_keras`` are broken with Keras 3.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgekit.errors import ConversionError, InvalidInputError, NotFoundError
from edgekit_converters._native import captured_stderr, keras, tensorflow
from edgekit_converters.isolation import EngineSteps, Step
from edgekit_runtime.tensors import TensorSpec

SourceKind = Literal["keras", "saved_model", "onnx"]
_ONNX_SUFFIXES = {".onnx"}


def _onnx_external_files(path: Path) -> list[Path]:
    """The external data files an ONNX model names (torch.onnx.export writes ``model.onnx.data``)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a bad file is reported by the loader, with its message
        return []
    names = {
        entry.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return sorted(path.parent / n for n in names if (path.parent / n).is_file())


def _hash_path(path: Path) -> tuple[str, int]:
    """sha256 and size of a file (with an ONNX model's external data files), or of a directory's files
    in a stable order (SavedModel)."""
    h = hashlib.sha256()
    size = 0
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path, *(_onnx_external_files(path) if path.suffix.lower() in _ONNX_SUFFIXES else [])]
    for f in files:
        if path.is_dir() or f != path:
            h.update(str(f.relative_to(path if path.is_dir() else path.parent)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                size += len(block)
    return h.hexdigest(), size


def detect(path: Path) -> SourceKind:
    """What kind of model ``path`` is; NotFoundError / InvalidInputError say what is wrong."""
    if not path.exists():
        msg = f"{path}: no such file or directory; pass a .keras file, a SavedModel directory or an .onnx file"
        raise NotFoundError(msg)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        msg = f"{path}: a directory without saved_model.pb is not a SavedModel; pass a SavedModel directory"
        raise InvalidInputError(msg)
    if path.suffix.lower() in _ONNX_SUFFIXES:
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "config.json" in z.namelist():
                return "keras"
    head = path.read_bytes()[:64]
    if path.suffix.lower() == ".keras" or path.suffix.lower() in {".h5", ".hdf5"} or head.startswith(b"\x89HDF"):
        msg = (
            f"{path}: not a Keras 3 .keras archive (a zip with config.json); "
            "re-save the model with model.save('model.keras')"
        )
        raise InvalidInputError(msg)
    msg = f"{path}: not a model edgekit can read; pass a Keras .keras file, a SavedModel directory or an .onnx file"
    raise InvalidInputError(msg)


def _dim(d: Any) -> int:
    return int(d) if d is not None and int(d) >= 0 else -1


@dataclass
class Source:
    """A loaded source model. ``predict`` is the float reference the converted model is compared with."""

    path: Path
    kind: SourceKind
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    output_names: list[str]
    workdir: Path
    _keras_model: Any = None
    _onnx_session: Any = None
    _reference: Any = None
    _loaded: Any = None  # keeps the SavedModel's variables alive for _reference
    _saved_models: dict[tuple[int | None, bool], Path] = field(default_factory=dict)
    _onnx_files: dict[tuple[int, int | None], Path] = field(default_factory=dict)

    @property
    def is_tensorflow(self) -> bool:
        return self.kind != "onnx"

    @property
    def recurrent_layers(self) -> list[str]:
        """The Keras recurrent layers (LSTM, GRU, SimpleRNN, also inside Bidirectional), by name;
        empty for SavedModel and ONNX sources, whose layers are not known."""
        if self._keras_model is None:
            return []
        rnn = keras().layers.RNN
        found: list[str] = []

        def walk(layer: Any) -> None:
            if isinstance(layer, rnn):
                found.append(layer.name)
            for sub in getattr(layer, "layers", None) or []:
                walk(sub)
            for attr in ("forward_layer", "backward_layer"):  # Bidirectional
                if (inner := getattr(layer, attr, None)) is not None:
                    walk(inner)

        for layer in self._keras_model.layers:
            walk(layer)
        return found

    # --- reference predictions -------------------------------------------------------------

    def predict(self, feeds: dict[str, np.ndarray], batch_size: int = 64) -> dict[str, np.ndarray]:
        """The source model's float outputs, by output name, computed in chunks."""
        rows = next(iter(feeds.values())).shape[0]
        fixed = {s.shape[0] for s in self.inputs if s.shape and s.shape[0] > 0}
        if fixed:  # a source exported with a fixed batch runs in chunks of exactly that size
            batch_size = min(fixed)
        parts = [
            self._predict_batch({k: v[i : i + batch_size] for k, v in feeds.items()})
            for i in range(0, rows, batch_size)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _predict_batch(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {s.name: np.asarray(feeds[s.name]).astype(s.np_dtype, copy=False) for s in self.inputs}
        if self.kind == "onnx":
            outs = self._onnx_session.run(self.output_names, cast)
            return dict(zip(self.output_names, outs, strict=True))
        result = self._reference(**cast)
        return {k: np.asarray(v) for k, v in result.items()}

    # --- exports for the converters ---------------------------------------------------------

    def saved_model(self, static_batch: int | None = None, *, unroll: bool = False) -> Path:
        """A SavedModel of the source (batch dimension fixed to ``static_batch`` when given; with
        ``unroll``, the Keras recurrent layers unrolled over their time steps), cached."""
        key = (static_batch, unroll)
        if key in self._saved_models:
            return self._saved_models[key]
        if self.kind == "onnx":
            msg = "an ONNX model cannot be converted to TFLite here; pick an ONNX profile (e.g. x86-server)"
            raise ConversionError(msg)
        if unroll and self._keras_model is None:
            msg = f"{self.path}: only a Keras source's recurrent layers can be unrolled"
            raise ConversionError(msg)
        tf = tensorflow()
        out = self.workdir / f"saved_model_b{static_batch or 'dyn'}{'_unrolled' if unroll else ''}"
        with captured_stderr() as cap:
            try:
                if self.kind == "keras":
                    signature = None
                    if static_batch is not None:
                        signature = [self._keras_signature(static_batch)]
                    model = self._unrolled() if unroll else self._keras_model
                    model.export(str(out), verbose=False, input_signature=signature)
                elif static_batch is None:
                    return self.path
                else:
                    self._fixed_batch_saved_model(tf, static_batch, out)
            except ConversionError:
                raise
            except Exception as e:  # TF raises many unrelated types for an unexportable graph
                msg = f"cannot export {self.path} to a SavedModel: {e} {cap.errors()}".strip()
                raise ConversionError(msg) from e
        self._saved_models[key] = out
        return out

    def _unrolled(self) -> Any:
        """The Keras model again with ``unroll=True`` on every recurrent layer and the same weights:
        a plain graph of matrix products and activations instead of a while loop (TensorFlow 2.21's
        int8 calibrator crashes on the loop). Checked to give the source's outputs."""
        k = keras()
        model = self._keras_model

        def patch(node: Any) -> Any:
            if isinstance(node, dict):
                if node.get("class_name") in {"LSTM", "GRU", "SimpleRNN"} and isinstance(node.get("config"), dict):
                    node["config"]["unroll"] = True
                for v in node.values():
                    patch(v)
            elif isinstance(node, list):
                for v in node:
                    patch(v)
            return node

        try:
            clone = model.__class__.from_config(patch(model.get_config()))
            clone.set_weights(model.get_weights())
        except Exception as e:  # from_config raises ValueError / TypeError for what cannot be rebuilt
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            msg = (
                f"cannot unroll the recurrent layers of {self.path} (needed for calibration): {first}; "
                'give the sequence input a fixed length, or use conversion.quantization = "dynamic"'
            )
            raise ConversionError(msg) from e
        probe = {s.name: np.zeros([1, *[max(d, 1) for d in s.shape[1:]]], s.np_dtype) for s in self.inputs}
        args = [probe[t.name] for t in model.inputs] if len(model.inputs) > 1 else probe[model.inputs[0].name]
        a, b = k.tree.flatten(model(args)), k.tree.flatten(clone(args))
        if any(not np.allclose(np.asarray(x), np.asarray(y), atol=1e-4) for x, y in zip(a, b, strict=True)):
            msg = f"{self.path}: its recurrent layers unrolled do not give the source's outputs; not converted"
            raise ConversionError(msg)
        return clone

    def _keras_signature(self, batch: int) -> Any:
        k = keras()
        tf = tensorflow()
        model = self._keras_model
        struct = getattr(model, "_inputs_struct", None)
        if struct is None:
            struct = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return k.tree.map_structure(
            lambda t: tf.TensorSpec([batch, *t.shape[1:]], t.dtype, name=t.name),
            struct,
        )

    def _fixed_batch_saved_model(self, tf: Any, batch: int, out: Path) -> None:
        """Re-trace a SavedModel's serving signature with a fixed batch dimension."""
        loaded = tf.saved_model.load(str(self.path))
        fn = loaded.signatures["serving_default"]
        specs = {
            name: tf.TensorSpec([batch, *spec.shape[1:]], spec.dtype, name=name)
            for name, spec in fn.structured_input_signature[1].items()
        }
        module = tf.Module()
        module.loaded = loaded
        wrapped = tf.function(lambda **kw: fn(**kw))  # noqa: PLW0108 - a ConcreteFunction cannot be re-traced
        tf.saved_model.save(module, str(out), signatures={"serving_default": wrapped.get_concrete_function(**specs)})

    def onnx_model(self, opset: int, static_batch: int | None = None, *, engine: EngineSteps, step: Step) -> Path:
        """The source as a float32 ONNX file (tf2onnx's SavedModel path for TensorFlow sources, run as
        ``step`` of ``engine``: with its time limit, a crash reported as such), cached."""
        key = (opset, static_batch)
        if key in self._onnx_files:
            return self._onnx_files[key]
        out = self.workdir / f"source_opset{opset}_b{static_batch or 'dyn'}.onnx"
        if self.kind == "onnx":
            import onnx

            model = onnx.load(str(self.path))
            if static_batch is not None:
                for inp in model.graph.input:
                    dims = inp.type.tensor_type.shape.dim
                    if dims:
                        dims[0].ClearField("dim_param")
                        dims[0].dim_value = static_batch
            onnx.save(model, str(out))
        else:
            saved = self.saved_model(static_batch)
            cmd = [
                sys.executable,
                "-m",
                "tf2onnx.convert",
                "--saved-model",
                str(saved),
                "--signature_def",
                "serving_default",
                "--output",
                str(out),
                "--opset",
                str(opset),
            ]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            proc = engine.command(step, cmd, env)
            if proc.returncode != 0 or not out.is_file():
                lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()
                msg = f"tf2onnx could not convert {self.path} to ONNX (opset {opset}): " + " | ".join(lines[-3:])
                raise ConversionError(msg)
        self._onnx_files[key] = out
        return out


def load_source(path: Path, workdir: Path) -> Source:
    """Detect and load ``path``; errors name the file and say what to pass instead."""
    path = Path(path)
    kind = detect(path)
    sha, size = _hash_path(path)
    if kind == "onnx":
        return _load_onnx(path, sha, size, workdir)
    return _load_tensorflow(path, kind, sha, size, workdir)


def _load_onnx(path: Path, sha: str, size: int, workdir: Path) -> Source:
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, onnx ValidationError, ...
        msg = f"{path}: not a valid ONNX model (truncated or corrupted?): {str(e).splitlines()[0][:200]}"
        raise InvalidInputError(msg) from e
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own untyped exceptions
        msg = f"{path}: ONNX Runtime cannot load this model: {str(e).splitlines()[0][:300]}"
        raise InvalidInputError(msg) from e
    from edgekit_runtime.backends.onnxrt import _ORT_TYPES, _dims

    inputs = [
        TensorSpec(name=i.name, dtype=np.dtype(_ORT_TYPES.get(i.type, np.float32)).name, shape=_dims(i.shape))
        for i in session.get_inputs()
    ]
    outputs = [o.name for o in session.get_outputs()]
    return Source(path, "onnx", sha, size, inputs, outputs, workdir, _onnx_session=session)


def _load_tensorflow(path: Path, kind: SourceKind, sha: str, size: int, workdir: Path) -> Source:
    tf = tensorflow()
    keras_model = None
    with captured_stderr() as cap:
        try:
            if kind == "keras":
                keras_model = keras().saving.load_model(str(path), compile=False)
                export_dir = workdir / "saved_model_bdyn"
                keras_model.export(str(export_dir), verbose=False)
            else:
                export_dir = path
            loaded = tf.saved_model.load(str(export_dir))
        except Exception as e:  # Keras/TF raise many exception types for a bad file
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            msg = f"{path}: cannot load this {kind.replace('_', ' ')} model: {first} {cap.errors(1)}".strip()
            raise InvalidInputError(msg) from e
    if "serving_default" not in loaded.signatures:
        msg = f"{path}: the SavedModel has no 'serving_default' signature; export it with one"
        raise InvalidInputError(msg)
    fn = loaded.signatures["serving_default"]
    in_specs = fn.structured_input_signature[1]
    inputs = [
        TensorSpec(name=name, dtype=spec.dtype.name, shape=[_dim(d) for d in spec.shape])
        for name, spec in sorted(in_specs.items())
    ]
    if keras_model is not None:
        order = {t.name: i for i, t in enumerate(keras_model.inputs)}
        inputs.sort(key=lambda s: order.get(s.name, len(order)))
    outputs = sorted(fn.structured_outputs)
    source = Source(
        path, kind, sha, size, inputs, outputs, workdir, _keras_model=keras_model, _reference=fn, _loaded=loaded
    )
    source._saved_models[(None, False)] = export_dir
    return source
