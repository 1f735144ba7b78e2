"""pytest plugin of scripts/mutation: the runtime tests' models from a cache, without TensorFlow.

mutmut runs a fresh pytest session per mutant, and each session builds the test models again:
Keras export plus three TFLite conversions cost seconds, more than the tests a mutant selects.
``python scripts/mutation_models.py build DIR`` (with the real TensorFlow) writes the models once:
the TFLite files the tests' ``models.to_tflite`` makes and the MLPs' weights. Loaded with
``-p mutation_models`` and ``EDGEKIT_MUTATION_MODELS=DIR``, this plugin answers
``models.keras_mlp`` with the same MLP computed in NumPy and ``models.to_tflite`` with the cached
files. Any other model falls through to the real functions. Never used by the normal test run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

# (seed, fixed_batch, int8) of every TFLite file tests/runtime/conftest.py builds
VARIANTS = [(0, None, False), (0, 1, False), (0, None, True), (1, None, False)]


def _name(seed: int, fixed_batch: int | None, int8: bool) -> str:
    return f"mlp-seed{seed}-fixed{fixed_batch or 0}-{'int8' if int8 else 'float'}.tflite"


class NumpyMLP:
    """models.keras_mlp's network (Dense 8 relu -> Dense 3) with its weights, in NumPy."""

    def __init__(self, seed: int, weights: dict[str, np.ndarray]) -> None:
        self.seed = seed
        self.w = weights

    def __call__(self, x: Any) -> np.ndarray:
        h = np.maximum(np.asarray(x, np.float32) @ self.w["k1"] + self.w["b1"], 0)
        return (h @ self.w["k2"] + self.w["b2"]).astype(np.float32)


def build(cache: Path) -> None:
    from tests.runtime import models

    cache.mkdir(parents=True, exist_ok=True)
    keras_models = {seed: models.keras_mlp(seed=seed) for seed in (0, 1)}
    for seed, m in keras_models.items():
        k1, b1, k2, b2 = (np.asarray(w) for w in m.get_weights())
        np.savez(cache / f"weights-seed{seed}.npz", k1=k1, b1=b1, k2=k2, b2=b2)
    for seed, fixed_batch, int8 in VARIANTS:
        data = models.to_tflite(
            keras_models[seed], cache / "work" / _name(seed, fixed_batch, int8), fixed_batch=fixed_batch, int8=int8
        )
        (cache / _name(seed, fixed_batch, int8)).write_bytes(data)


def pytest_configure(config: Any) -> None:
    cache_dir = os.environ.get("EDGEKIT_MUTATION_MODELS")
    if not cache_dir:
        return
    cache = Path(cache_dir)
    from tests.runtime import models

    real_keras_mlp, real_to_tflite = models.keras_mlp, models.to_tflite

    def keras_mlp(seed: int = 0) -> Any:
        weights = cache / f"weights-seed{seed}.npz"
        if not weights.exists():
            return real_keras_mlp(seed)
        with np.load(weights) as z:
            return NumpyMLP(seed, {k: z[k] for k in z.files})

    def to_tflite(model: Any, workdir: Path, *, fixed_batch: int | None = None, int8: bool = False) -> bytes:
        if isinstance(model, NumpyMLP):
            cached = cache / _name(model.seed, fixed_batch, int8)
            if cached.exists():
                return cached.read_bytes()
            model = real_keras_mlp(model.seed)
        return real_to_tflite(model, workdir, fixed_batch=fixed_batch, int8=int8)

    models.keras_mlp = keras_mlp
    models.to_tflite = to_tflite


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit("usage: python scripts/mutation_models.py build CACHE_DIR")
    build(Path(sys.argv[2]))
