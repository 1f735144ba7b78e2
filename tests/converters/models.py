"""Small real models for the converter tests, each built in seconds (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def train_digits(path: Path, x: np.ndarray, y: np.ndarray, *, activation: str = "relu", epochs: int = 30) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,), name="pixels"),
            keras.layers.Dense(64, activation=activation),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    model.save(path)
    return path


def digits_cnn(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An image model: 8x8x1 digits through a small conv net (for image-folder calibration)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="image"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x.reshape(-1, 8, 8, 1), y, epochs=5, batch_size=32, verbose=0)
    model.save(path)
    return path


def multi_input(path: Path) -> Path:
    """Two named inputs (features 'a' [8], 'b' [4]) and two outputs (class scores, a regression value)."""
    import keras

    keras.utils.set_random_seed(0)
    a = keras.Input((8,), name="a")
    b = keras.Input((4,), name="b")
    x = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(a), b])
    scores = keras.layers.Dense(3, activation="softmax", name="scores")(x)
    value = keras.layers.Dense(1, name="value")(x)
    keras.Model([a, b], [scores, value]).save(path)
    return path


def onnx_mlp(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An ONNX model written with onnx.helper (MatMul+Add+Relu, MatMul+Add+Softmax), not from TensorFlow.
    Weights come from a scikit-learn MLP trained on the digits, so its accuracy is real."""
    import warnings

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 300 iterations are plenty for ~97 %
        mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0).fit(x, y)
    w1, w2 = (w.astype(np.float32) for w in mlp.coefs_)
    b1, b2 = (b.astype(np.float32) for b in mlp.intercepts_)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_profile(path: Path, base: str, **conversion: object) -> Path:
    """A user profile file: a bundled profile with some [conversion] keys replaced (no budgets)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    from edgekit.profiles import bundled_profiles

    data = tomllib.loads(bundled_profiles()[base].read_text())
    data["name"] = path.stem
    data["conversion"].update(conversion)
    data.pop("budgets", None)
    path.write_text(_toml(data))
    return path


def _toml(data: dict[str, object], prefix: str = "") -> str:
    scalars = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(scalars) + "\n"
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            out += f"\n[{name}]\n" + _toml(v, name + ".").lstrip("\n")
    return out


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(i) for i in v) + "]"
    return repr(v)


def text_classifier(path: Path) -> tuple[Path, np.ndarray]:
    """Embedding + LSTM over int32 token ids (16 tokens, vocabulary 50, 2 classes) and 64 token rows.
    TensorFlow 2.21's int8 calibrator segfaults on it (calibrator.py, _feed_tensors)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,), dtype="int32", name="tokens"),
            keras.layers.Embedding(50, 8),
            keras.layers.LSTM(8),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    tokens = np.random.default_rng(0).integers(0, 50, (64, 16)).astype(np.int32)
    model.fit(tokens, (tokens[:, 0] > 25).astype(np.int64), epochs=1, verbose=0)
    model.save(path)
    return path, tokens
