"""Build the bundled example: a small digits classifier, calibration and validation data.

    python examples/digits/make.py

writes, next to this script:
  model.keras      a Keras 3 Dense classifier (64 pixels in [0, 1] -> 10 class probabilities)
  calibration.npy  200 training images (float32 [200, 64]) for int8 calibration
  validation.npz   held-out test images ("pixels") and their "labels"

Data: scikit-learn's bundled 8x8 digits (1797 images, no download). Deterministic (fixed seeds).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def build(epochs: int = 40, seed: int = 0) -> tuple[keras.Model, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train the classifier; returns the model and the (train, test) split."""
    keras.utils.set_random_seed(seed)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    model = keras.Sequential(
        [
            keras.Input((64,), name="pixels"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model, x_train, y_train, x_test, y_test


def main() -> None:
    model, x_train, _, x_test, y_test = build()
    _, acc = model.evaluate(x_test, y_test, verbose=0)
    model.save(HERE / "model.keras")
    np.save(HERE / "calibration.npy", x_train[:200])
    np.savez(HERE / "validation.npz", pixels=x_test, labels=y_test)
    print(f"test accuracy {acc:.3f}; wrote model.keras, calibration.npy, validation.npz to {HERE}")  # noqa: T201 - a script for people


if __name__ == "__main__":
    main()
