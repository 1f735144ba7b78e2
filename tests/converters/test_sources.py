"""Other sources and data: multi-input Keras, SavedModel, ONNX from onnx.helper, recurrent layers,
calibration from .npz and image folders, held-out and synthetic validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from edgekit.profiles import load_profile
from edgekit_converters.pipeline import Options, run
from edgekit_runtime.backends import load_backend
from edgekit_runtime.bundle import read_bundle
from tests.converters import models
from tests.converters.conftest import FAST

pytestmark = pytest.mark.slow
Invoke = Callable[..., Result]


def _report(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return {p["profile"]: p for p in json.loads(result.stdout)["profiles"]}


def test_multi_input_model(cli_invoke: Invoke, work: Path, tmp_path: Path) -> None:
    model = models.multi_input(work / "multi.keras")
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, a=rng.random((100, 8), dtype=np.float32), b=rng.random((100, 4), dtype=np.float32))
    out = tmp_path / "out"
    r = cli_invoke(
        "convert", model, "-p", "raspberrypi", "-p", "x86-server", "-p", "cortex-m", "--calibration", calib,
        "-o", out, "--json", "--no-strict", *FAST,
    )  # fmt: skip
    by = _report(r)
    for name in ("raspberrypi", "x86-server", "cortex-m"):
        m = by[name]["metrics"]
        assert m["data"].startswith("held-out 20% of")  # no --validation: held out of the calibration data
        assert m["samples"] == 20
        assert m["cosine_similarity"] > 0.98
        assert m["top1_agreement"] is not None
        bundle = read_bundle(by[name]["bundle"])
        assert sorted(s.name for s in bundle.manifest.inputs) == ["a", "b"]
        assert sorted(s.name for s in bundle.manifest.outputs) == ["output_0", "output_1"]
        assert set(bundle.golden_inputs) == {"a", "b"}
    assert read_bundle(by["cortex-m"]["bundle"]).manifest.inputs[0].shape[0] == 1


def test_multi_input_calibration_missing_an_input(cli_invoke: Invoke, work: Path, tmp_path: Path) -> None:
    model = models.multi_input(work / "multi2.keras")
    calib = tmp_path / "calib.npz"
    np.savez(calib, a=np.zeros((10, 8), dtype=np.float32))
    r = cli_invoke("convert", model, "-p", "raspberrypi", "--calibration", calib, "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "has no array for input(s) 'b'" in r.output
    assert "b: float32[-1, 4]" in r.output


def test_onnx_source_not_from_tensorflow(
    cli_invoke: Invoke, work: Path, digits: Any, digits_files: dict[str, Path]
) -> None:
    x_train, y_train, _, _ = digits
    model = models.onnx_mlp(work / "mlp.onnx", x_train, y_train)
    out = work / "onnx-out"
    r = cli_invoke(
        "convert", model, "-p", "x86-server", "-p", "jetson-orin", "--calibration", digits_files["calibration_npz"],
        "--validation", digits_files["validation_npz"], "-o", out, "--json", *FAST,
    )  # fmt: skip
    by = _report(r)
    for name in ("x86-server", "jetson-orin"):
        m = by[name]["metrics"]
        assert m["accuracy_source"] > 90
        assert m["accuracy_drop_points"] <= 1.0
        manifest = read_bundle(by[name]["bundle"]).manifest
        assert manifest.source is not None and manifest.source.format == "onnx"
        assert [s.name for s in manifest.inputs] == ["x"]
    assert "QuantizeLinear" in by["x86-server"]["constraints"]["ops"]


def test_onnx_source_to_a_tflite_profile(cli_invoke: Invoke, work: Path, digits: Any, tmp_path: Path) -> None:
    model = models.onnx_mlp(work / "mlp2.onnx", digits[0], digits[1])
    r = cli_invoke("convert", model, "-p", "generic-cpu", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "choose an ONNX profile" in r.output


def test_saved_model_source(digits_model: Path, digits_files: dict[str, Path], tmp_path: Path) -> None:
    import keras

    saved = tmp_path / "digits_saved"
    keras.saving.load_model(digits_model).export(str(saved), verbose=False)
    report = run(
        saved,
        [load_profile("generic-cpu"), load_profile("coral-edgetpu")],
        Options(
            output_dir=tmp_path / "out",
            calibration=digits_files["calibration_npy"],
            validation=digits_files["validation_npz"],
            latency_seconds=0.05,
        ),
    )
    by = {r.profile: r for r in report.results}
    assert report.source["format"] == "saved_model"
    assert by["generic-cpu"].metrics["accuracy_drop_points"] == pytest.approx(0.0, abs=0.3)
    assert by["coral-edgetpu"].metrics["accuracy_drop_points"] <= 1.0
    assert by["coral-edgetpu"].bundle is not None
    assert read_bundle(by["coral-edgetpu"].bundle).manifest.inputs[0].shape == [1, 64]


def test_recurrent_model_gets_a_static_batch(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 3), name="seq"), keras.layers.LSTM(8), keras.layers.Dense(2)])
    model.save(tmp_path / "lstm.keras")
    report = run(
        tmp_path / "lstm.keras", [load_profile("generic-cpu")], Options(output_dir=tmp_path, latency_seconds=0.05)
    )
    (result,) = report.results
    assert any("static batch of 1" in n for n in result.notes)
    assert result.metrics["max_abs_error"] < 1e-4
    assert result.metrics["trustworthy"] is False  # synthetic validation: flagged


def test_image_folder_calibration(cli_invoke: Invoke, work: Path, digits: Any, tmp_path: Path) -> None:
    from PIL import Image

    x_train, y_train, _, _ = digits
    model = models.digits_cnn(work / "cnn.keras", x_train, y_train)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(30):  # 16x16: resized to the model's 8x8 on reading
        pixels = (x_train[i].reshape(8, 8) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(images / f"{i:03d}.png")
    (images / "notes.txt").write_text("not an image: skipped")
    r = cli_invoke(
        "convert", model, "-p", "raspberrypi", "--calibration", images, "-o", tmp_path / "o", "--json", *FAST
    )
    by = _report(r)
    m = by["raspberrypi"]["metrics"]
    assert m["data"] == f"held-out 20% of {images}"
    assert m["samples"] == 6
    assert m["cosine_similarity"] > 0.98
    manifest = read_bundle(by["raspberrypi"]["bundle"]).manifest
    assert manifest.calibration == {"data": str(images), "samples": 24, "synthetic": False, "trustworthy": True}
    # Images are read as pixels 0-255 (as the device's `score` reads them); the default
    # --image-range 0,1 becomes the bundle's preprocessing, so the device scales them the same way.
    assert manifest.preprocessing is not None
    assert (manifest.preprocessing.mean, manifest.preprocessing.std) == ([0.0], [255.0])
    from edgekit.cli import cli

    out = tmp_path / "scores.npz"
    scored = CliRunner().invoke(cli, ["score", str(by["raspberrypi"]["bundle"]), str(images), "-o", str(out), "-q"])
    assert scored.exit_code == 0, scored.output
    with np.load(out) as z:
        predicted = np.argmax(next(v for k, v in z.items() if k != "filenames"), axis=1)
    assert np.mean(predicted == y_train[:30]) >= 0.7


def test_image_folder_for_a_model_without_image_input(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    r = cli_invoke("convert", digits_model, "-p", "raspberrypi", "--calibration", tmp_path, "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "an image folder needs a model with one image input" in r.output


def test_synthetic_calibration_is_flagged(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli_invoke("convert", digits_model, "-p", "raspberrypi", "--synthetic-calibration", "-o", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "NOT trustworthy" in r.output
    assert "synthetic!" in r.output
    manifest = read_bundle(out / "digits-raspberrypi.ekb").manifest
    assert manifest.calibration["synthetic"] is True
    assert manifest.calibration["trustworthy"] is False
    assert manifest.validation["trustworthy"] is False
    assert manifest.validation["data"] == "synthetic"


def test_table_report_and_default_output(
    cli_invoke: Invoke, digits_model: Path, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = cli_invoke(
        "convert", digits_model, "-p", "generic-cpu", "--validation", digits_files["validation_npz"], "-o", out,
        "--name", "hand-digits", "--version", "3", *FAST,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for text in ("generic-cpu: tflite float32", "accuracy drop (points)", "top-1 agreement", "SQNR (dB)", "ok"):
        assert text in r.output
    bundle = read_bundle(out / "hand-digits-generic-cpu.ekb")
    assert (bundle.manifest.name, bundle.manifest.version) == ("hand-digits", 3)
    backend = load_backend("tflite", bundle.model)
    assert backend.signature.inputs[0].shape == [-1, 64]
