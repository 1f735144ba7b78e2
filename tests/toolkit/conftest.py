"""Bundles for the `inspect` / `bench` tests, made by `edgekit convert` from small real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit.profiles import load_profile
from edgekit_converters.pipeline import Options, run
from tests.converters import models


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("toolkit")
    x_train, y_train, x_test, y_test = models.digits_data()
    np.save(work / "calib.npy", x_train[:100])
    np.savez(work / "val.npz", pixels=x_test, labels=y_test)
    onnx_model = models.onnx_mlp(work / "mlp.onnx", x_train, y_train)
    keras_model = models.train_digits(work / "digits.keras", x_train, y_train, epochs=10)
    options = Options(
        output_dir=work / "out",
        calibration=work / "calib.npy",
        validation=work / "val.npz",
        strict=False,
        latency_seconds=0.05,
    )
    a = run(onnx_model, [load_profile("x86-server")], options).results[0]
    b = run(keras_model, [load_profile("cortex-m")], options).results[0]
    assert a.bundle is not None and b.bundle is not None
    return {"onnx": a.bundle, "int8": b.bundle}
