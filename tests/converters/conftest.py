"""Session fixtures: real models trained or written once, and one conversion run per mode.

The expensive part - converting the digits model for every bundled profile and every remaining
mode - runs once (`all_modes`), and the mode tests read its JSON report and bundles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from tests.converters import models

# Fast latency measurement in tests: numbers are reported, never asserted on time.
FAST = ["--latency-seconds", "0.05"]


def one_line(result: Result) -> None:
    """An error is shown as one line, never a traceback."""
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def no_output_folder(out: Path) -> None:
    """A run that wrote no bundle leaves no output folder behind (tests pass folders that do not exist yet)."""
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def invoke(*args: str | Path) -> Result:
    from edgekit.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def cli_invoke() -> Callable[..., Result]:
    return invoke


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return models.digits_data()


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converters")


@pytest.fixture(scope="session")
def digits_model(work: Path, digits: Any) -> Path:
    x_train, y_train, _, _ = digits
    return models.train_digits(work / "digits.keras", x_train, y_train)


@pytest.fixture(scope="session")
def digits_files(work: Path, digits: Any) -> dict[str, Path]:
    x_train, _, x_test, y_test = digits
    files = {
        "calibration_npy": work / "calibration.npy",
        "calibration_npz": work / "calibration.npz",
        "validation_npz": work / "validation.npz",
        "wrong_shape": work / "wrong_shape.npy",
    }
    np.save(files["calibration_npy"], x_train[:200])
    np.savez(files["calibration_npz"], pixels=x_train[:200])
    np.savez(files["validation_npz"], pixels=x_test, labels=y_test)
    np.save(files["wrong_shape"], x_train[:20, :32])
    return files


@pytest.fixture(scope="session")
def mode_profiles(work: Path) -> dict[str, Path]:
    """User profile files for the modes no bundled profile uses."""
    folder = work / "profiles"
    folder.mkdir()
    return {
        "tflite-dynamic": models.write_profile(folder / "tflite-dynamic.toml", "generic-cpu", quantization="dynamic"),
        "tflite-int16x8": models.write_profile(folder / "tflite-int16x8.toml", "generic-cpu", quantization="int16x8"),
        "onnx-float32": models.write_profile(folder / "onnx-float32.toml", "x86-server", quantization="float32"),
        "onnx-dynamic": models.write_profile(folder / "onnx-dynamic.toml", "x86-server", quantization="dynamic-int8"),
    }


@pytest.fixture(scope="session")
def all_modes(
    work: Path, digits_model: Path, digits_files: dict[str, Path], mode_profiles: dict[str, Path]
) -> dict[str, Any]:
    """The digits model through every bundled profile and every other mode, in one `edgekit convert`."""
    out = work / "bundles"
    extra: list[str] = []
    for path in mode_profiles.values():
        extra += ["--profile", str(path)]
    result = invoke(
        "convert", digits_model, "--profile", "all", *extra, "-o", out, "--name", "digits",
        "--calibration", digits_files["calibration_npy"], "--validation", digits_files["validation_npz"],
        "--no-strict", "--json", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return {"report": report, "by_profile": {p["profile"]: p for p in report["profiles"]}, "out": out}
