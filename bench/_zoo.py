"""The model zoo: one small, really trained model per family users bring to `edgekit convert`.

Each builder trains in seconds on data made here (scikit-learn's bundled digits, or a synthetic
task a model has to learn: keyword tokens in a sentence, tone frequencies, square shapes) and
writes, under ``OUT/NAME/``: the model file, ``calibration.npz`` (named like the inputs) and
``validation.npz`` (inputs plus integer ``labels`` where the task has classes). bench/zoo.py
converts them for every profile; tests/converters/test_zoo.py converts each family for one int8
and one float profile.

    python bench/_zoo.py OUT NAME [NAME ...]     # build (TensorFlow / PyTorch imported here only)
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VOCAB = 200
SEQ = 24
KEYWORDS = 5  # keyword tokens per class
CLASSES = 4


@dataclass(frozen=True)
class Built:
    name: str
    family: str
    model: Path
    calibration: Path
    validation: Path
    note: str = ""


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    cut = int(n * 0.75)
    return idx[:cut], idx[cut:]


def _save(
    out: Path,
    name: str,
    family: str,
    model: Path,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    note: str = "",
) -> Built:
    train, test = _split(next(iter(inputs.values())).shape[0], 1)
    np.savez(out / "calibration.npz", **{k: v[train][:200] for k, v in inputs.items()})
    val = {k: v[test][:300] for k, v in inputs.items()}
    if labels is not None:
        val["labels"] = labels[test][:300]
    np.savez(out / "validation.npz", **val)
    return Built(name, family, model, out / "calibration.npz", out / "validation.npz", note)


# --- data ---------------------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, pixels in [0, 1] (1797 images, no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def token_sentences(n: int = 2400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int32 token ids [n, SEQ]: filler words with three keywords of the sentence's class, and a
    zero-padded tail (token 0) of random length."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.integers(1 + CLASSES * KEYWORDS, VOCAB, (n, SEQ))
    for i in range(n):
        length = rng.integers(SEQ // 2, SEQ + 1)
        pos = rng.choice(length, 3, replace=False)
        x[i, pos] = 1 + y[i] * KEYWORDS + rng.integers(0, KEYWORDS, 3)
        x[i, length:] = 0
    return x.astype(np.int32), y.astype(np.int64)


def sensor_sequences(n: int = 2000, steps: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, steps, 3]: an accelerometer-like signal whose frequency is the class, with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    t = np.arange(steps) / steps
    freq = (1.0 + y * 1.5)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 3))
    x = np.sin(2 * np.pi * freq * t[None, :, None] + phase) + rng.normal(0, 0.3, (n, steps, 3))
    return x.astype(np.float32), y.astype(np.int64)


def audio_features(n: int = 2000, frames: int = 49, bins: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keyword-spotting input as a KWS model sees it: log-mel-like frames [n, 49, 10] (1 s of audio
    in 20 ms hops). Each of six "words" is an energy track through the bins: low, high, rising,
    falling, two bursts, or silence, at a random onset and loudness, over background noise."""
    rng = np.random.default_rng(seed)
    words = 6
    y = rng.integers(0, words, n)
    x = rng.normal(-4.0, 0.5, (n, frames, bins))
    for i in range(n):
        start = rng.integers(0, frames // 3)
        length = rng.integers(frames // 3, frames // 2)
        f = np.arange(length) / max(length - 1, 1)
        track = {
            0: np.full(length, 1.5),
            1: np.full(length, bins - 2.5),
            2: 1 + f * (bins - 3),
            3: bins - 2 - f * (bins - 3),
            4: np.where((f < 0.3) | (f > 0.7), 4.0, -9.0),
            5: np.full(length, -9.0),
        }[int(y[i])]
        loud = rng.uniform(2.0, 4.0)
        for j, centre in enumerate(track):
            if centre >= 0:
                x[i, start + j] += loud * np.exp(-0.5 * (np.arange(bins) - centre) ** 2)
    return x.astype(np.float32), y.astype(np.int64)


def squares(n: int = 1600, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [n, size, size, 1] holding one shape (filled square, hollow square or cross: the class)
    at a random place and size; returns the images, boxes [n, 4] (y1, x1, y2, x2 in [0, 1]) and classes."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, (n, size, size, 1)).astype(np.float32)
    boxes = np.zeros((n, 4), np.float32)
    y = rng.integers(0, 3, n)
    for i in range(n):
        s = int(rng.integers(8, 15))
        r, c = (int(v) for v in rng.integers(0, size - s, 2))
        patch = np.zeros((s, s), np.float32)
        if y[i] == 0:
            patch[:] = 1
        elif y[i] == 1:
            patch[[0, 1, -2, -1], :] = 1
            patch[:, [0, 1, -2, -1]] = 1
        else:
            patch[s // 2 - 1 : s // 2 + 1, :] = 1
            patch[:, s // 2 - 1 : s // 2 + 1] = 1
        x[i, r : r + s, c : c + s, 0] = np.maximum(x[i, r : r + s, c : c + s, 0], patch)
        boxes[i] = (r / size, c / size, (r + s) / size, (c + s) / size)
    return x, boxes, y.astype(np.int64)


# --- Keras builders -----------------------------------------------------------------------------


def _fit(model, x, y, *, epochs: int, loss, batch_size: int = 32) -> None:
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)


def _recurrent(out: Path, name: str, layer: str, *, tokens: bool) -> Built:
    """A recurrent classifier: Embedding + LSTM/GRU on token ids, or LSTM/GRU on float sequences."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = token_sentences() if tokens else sensor_sequences()
    input_name = "tokens" if tokens else "signal"
    inp = keras.Input(x.shape[1:], dtype="int32" if tokens else "float32", name=input_name)
    h = keras.layers.Embedding(VOCAB, 16)(inp) if tokens else inp
    h = (keras.layers.LSTM if layer == "lstm" else keras.layers.GRU)(32 if tokens else 24)(h)
    scores = keras.layers.Dense(CLASSES, activation="softmax")(h)
    model = keras.Model(inp, scores, name=name)
    _fit(model, x, y, epochs=6 if tokens else 8, loss="sparse_categorical_crossentropy")
    model.save(out / "model.keras")
    return _save(out, name, "recurrent", out / "model.keras", {input_name: x}, y)


def lstm_tokens(out: Path) -> Built:
    """Embedding + LSTM text classifier on int32 token ids [N, 24]."""
    return _recurrent(out, "lstm_tokens", "lstm", tokens=True)


def gru_tokens(out: Path) -> Built:
    """Embedding + GRU text classifier on int32 token ids [N, 24]."""
    return _recurrent(out, "gru_tokens", "gru", tokens=True)


def lstm_float(out: Path) -> Built:
    """LSTM on float sensor sequences [N, 32, 3]."""
    return _recurrent(out, "lstm_float", "lstm", tokens=False)


def gru_float(out: Path) -> Built:
    """GRU on float sensor sequences [N, 32, 3]."""
    return _recurrent(out, "gru_float", "gru", tokens=False)


def transformer(out: Path) -> Built:
    """A one-block Transformer encoder (MultiHeadAttention, LayerNormalization, feed-forward) on token ids."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = token_sentences()
    tokens = keras.Input((SEQ,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB, 32)(tokens)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    f = keras.layers.Dense(64, activation="relu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(32)(f))
    h = keras.layers.GlobalAveragePooling1D()(h)
    scores = keras.layers.Dense(CLASSES, activation="softmax")(h)
    model = keras.Model(tokens, scores, name="transformer")
    _fit(model, x, y, epochs=6, loss="sparse_categorical_crossentropy")
    model.save(out / "model.keras")
    return _save(out, "transformer", "attention", out / "model.keras", {"tokens": x}, y)


def kws_conv1d(out: Path) -> Built:
    """Conv1D keyword spotting on log-mel-like audio features [N, 49, 10]."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = audio_features()
    feats = keras.Input(x.shape[1:], name="mfcc")
    h = feats
    for width in (16, 32):
        h = keras.layers.Conv1D(width, 3, padding="same")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    scores = keras.layers.Dense(6, activation="softmax")(h)
    model = keras.Model(feats, scores, name="kws_conv1d")
    _fit(model, x, y, epochs=8, loss="sparse_categorical_crossentropy")
    model.save(out / "model.keras")
    return _save(out, "kws_conv1d", "1-D audio", out / "model.keras", {"mfcc": x}, y)


def ds_cnn(out: Path) -> Built:
    """Depthwise and separable convolutions with BatchNorm and Dropout on the 8x8 digits."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = digits()
    x = x.reshape(-1, 8, 8, 1)
    image = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(image)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.SeparableConv2D(32, 3, padding="same", use_bias=False)(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(0.2)(h)
    scores = keras.layers.Dense(10, activation="softmax")(h)
    model = keras.Model(image, scores, name="ds_cnn")
    _fit(model, x, y, epochs=25, loss="sparse_categorical_crossentropy")
    model.save(out / "model.keras")
    return _save(out, "ds_cnn", "depthwise/separable", out / "model.keras", {"image": x}, y)


def two_heads(out: Path) -> Built:
    """Two inputs (digit pixels, four sensor values) and two heads: the digit's class and a
    regression value (the ink, mean pixel, plus half the first sensor value)."""
    import keras

    keras.utils.set_random_seed(0)
    x, y = digits()
    meta = np.random.default_rng(2).normal(0, 1, (x.shape[0], 4)).astype(np.float32)
    target = (x.mean(axis=1) + 0.5 * meta[:, 0]).astype(np.float32)[:, None]
    pixels = keras.Input((64,), name="pixels")
    extra = keras.Input((4,), name="meta")
    h = keras.layers.Dense(64, activation="relu")(pixels)
    j = keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu")(extra)])
    scores = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    value = keras.layers.Dense(1, name="ink")(keras.layers.Dense(16, activation="relu")(j))
    model = keras.Model([pixels, extra], [scores, value], name="two_heads")
    model.compile(optimizer="adam", loss=["sparse_categorical_crossentropy", "mse"])
    model.fit([x, meta], [y, target], epochs=30, batch_size=32, verbose=0)
    model.save(out / "model.keras")
    return _save(out, "two_heads", "multi-input/output", out / "model.keras", {"pixels": x, "meta": meta}, y)


def detector(out: Path) -> Built:
    """A detection-style head on 32x32 images: a conv backbone, then per cell of a 4x4 grid a box
    (sigmoid y1, x1, y2, x2) and three class scores (sigmoid), as SSD-style heads lay them out:
    boxes [N, 16, 4] and scores [N, 16, 3]."""
    import keras

    keras.utils.set_random_seed(0)
    x, boxes, y = squares()
    cells = 4
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    cell = (np.minimum((centre * cells).astype(int), cells - 1) * [cells, 1]).sum(axis=1)
    score_t = np.zeros((len(x), cells * cells, 3), np.float32)
    score_t[np.arange(len(x)), cell, y] = 1
    box_t = np.repeat(boxes[:, None, :], cells * cells, axis=1)
    image = keras.Input((32, 32, 1), name="image")
    h = image
    for width in (16, 32, 32):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    b = keras.layers.Reshape((cells * cells, 4), name="boxes")(keras.layers.Conv2D(4, 1, activation="sigmoid")(h))
    s = keras.layers.Reshape((cells * cells, 3), name="scores")(keras.layers.Conv2D(3, 1, activation="sigmoid")(h))
    model = keras.Model(image, [b, s], name="detector")
    model.compile(optimizer="adam", loss=["mse", "binary_crossentropy"])
    model.fit(x, [box_t, score_t], epochs=12, batch_size=32, verbose=0)
    model.save(out / "model.keras")
    return _save(out, "detector", "detection", out / "model.keras", {"image": x}, None)


def digits_mlp(out: Path) -> Built:
    """The bundled example's classifier (examples/digits/make.py), trained the same way."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
    from make import build  # type: ignore[import-not-found]

    model, _, _, _, _ = build()
    model.save(out / "model.keras")
    x, y = digits()
    return _save(out, "digits", "MLP", out / "model.keras", {"pixels": x}, y)


def mobilenet_v2(out: Path) -> Built:
    """MobileNetV2 (weights=None: no download) at 96x96, alpha 0.35; untrained, so compared by cosine."""
    import keras

    keras.utils.set_random_seed(0)
    keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35).save(out / "model.keras")
    x = np.random.default_rng(0).uniform(0, 1, (260, 96, 96, 3)).astype(np.float32)
    return _save(
        out,
        "mobilenet_v2",
        "image CNN",
        out / "model.keras",
        {"input_layer": x},
        None,
        "untrained weights and random images: fidelity only",
    )


# --- PyTorch builders (ONNX exported by torch.onnx.export) --------------------------------------


def _torch_export(model, example, path: Path, input_name: str) -> None:
    """torch.onnx.export as PyTorch 2.13 does it by default: the torch.export-based (dynamo) exporter,
    opset 18, the weights in an external ``model.onnx.data`` file, a dynamic batch dimension."""
    import torch

    model.eval()
    with warnings.catch_warnings():
        # torch.export's own deprecation warnings inside the exporter (pytest turns warnings into errors)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["scores"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )


def _torch_train(model, x, y, epochs: int) -> None:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()


def torch_mlp(out: Path) -> Built:
    """A PyTorch MLP on the digits, exported to ONNX (ONNX profiles only)."""
    import torch

    torch.manual_seed(0)
    x, y = digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    _torch_train(model, x, y, epochs=30)
    _torch_export(torch.nn.Sequential(model, torch.nn.Softmax(dim=1)), torch.from_numpy(x[:2]), out / "model.onnx", "x")
    return _save(out, "torch_mlp", "PyTorch ONNX", out / "model.onnx", {"x": x}, y)


def torch_cnn_nchw(out: Path) -> Built:
    """A PyTorch CNN on NCHW digits [N, 1, 8, 8] with BatchNorm, exported to ONNX."""
    import torch

    torch.manual_seed(0)
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=16),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    _torch_train(model, x, y, epochs=20)
    _torch_export(nn.Sequential(model, nn.Softmax(dim=1)), torch.from_numpy(x[:2]), out / "model.onnx", "image")
    return _save(out, "torch_cnn_nchw", "PyTorch ONNX", out / "model.onnx", {"image": x}, y)


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "digits": digits_mlp,
    "mobilenet_v2": mobilenet_v2,
    "lstm_tokens": lstm_tokens,
    "gru_tokens": gru_tokens,
    "lstm_float": lstm_float,
    "gru_float": gru_float,
    "transformer": transformer,
    "kws_conv1d": kws_conv1d,
    "ds_cnn": ds_cnn,
    "two_heads": two_heads,
    "detector": detector,
    "torch_mlp": torch_mlp,
    "torch_cnn_nchw": torch_cnn_nchw,
}


def build(out: Path, name: str) -> Built:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](folder)


def main(argv: list[str]) -> int:
    out, names = Path(argv[0]), argv[1:] or list(BUILDERS)
    for name in names:
        b = build(out, name)
        print(f"{b.name}: {b.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
