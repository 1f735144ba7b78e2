"""Bad input gets one clear line, the right exit code, and leaves nothing behind."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from edgekit.errors import UnsupportedOpError
from edgekit.profiles import load_profile
from edgekit_converters.pipeline import Options, Reporter, run
from tests.converters import models
from tests.converters.conftest import FAST, no_output_folder, one_line

pytestmark = pytest.mark.slow
Invoke = Callable[..., Result]


def _nothing_left(folder: Path) -> None:
    assert list(folder.iterdir()) == []


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at an empty folder so a test can prove no temporary files are left."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_missing_model_file(cli_invoke: Invoke, tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"
    r = cli_invoke("convert", tmp_path / "nope.keras", "--profile", "generic-cpu", "-o", out)
    assert r.exit_code == 3
    assert "nope.keras: no such file or directory" in r.output
    one_line(r)
    no_output_folder(tmp_path / "out")  # nor the parent it had to create


def test_failed_run_keeps_a_folder_it_did_not_create(cli_invoke: Invoke, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    r = cli_invoke("convert", tmp_path / "nope.keras", "--profile", "generic-cpu", "-o", out)
    assert r.exit_code == 3
    assert out.is_dir()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("model.keras", b"this is not a model", "not a Keras 3 .keras archive"),
        ("weights.bin", b"\x00\x01\x02 random bytes", "not a model edgekit can read"),
        ("model.onnx", b"not protobuf at all \xff\xfe", "not a valid ONNX model"),
    ],
)
def test_file_that_is_not_a_model(cli_invoke: Invoke, tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    r = cli_invoke("convert", path, "--profile", "x86-server", "--synthetic-calibration", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert expected in r.output
    one_line(r)
    no_output_folder(tmp_path / "out")


def test_directory_that_is_not_a_saved_model(cli_invoke: Invoke, tmp_path: Path) -> None:
    r = cli_invoke("convert", tmp_path, "--profile", "generic-cpu", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "without saved_model.pb is not a SavedModel" in r.output


def test_truncated_onnx(cli_invoke: Invoke, tmp_path: Path, digits: Any, private_tmp: Path) -> None:
    good = models.onnx_mlp(tmp_path / "good.onnx", digits[0], digits[1])
    data = good.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    r = cli_invoke("convert", bad, "--profile", "jetson-orin", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "truncated.onnx: not a valid ONNX model (truncated or corrupted?)" in r.output
    one_line(r)
    no_output_folder(tmp_path / "out")
    _nothing_left(private_tmp)


def test_unknown_profile(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    r = cli_invoke("convert", digits_model, "--profile", "raspberry", "-o", tmp_path)
    assert r.exit_code == 10
    assert "unknown profile 'raspberry'" in r.output
    assert "raspberrypi" in r.output  # the list of bundled profiles helps the user fix it
    one_line(r)


def test_bad_profile_file_names_key_and_file(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    path = models.write_profile(tmp_path / "mine.toml", "raspberrypi")
    path.write_text(path.read_text().replace("[conversion]\n", "[conversion]\nquantisation = 'int8'\n"))
    r = cli_invoke("convert", digits_model, "--profile", path, "-o", tmp_path / "out")
    assert r.exit_code == 10
    assert str(path) in r.output
    assert "conversion.quantisation" in r.output
    assert "unknown key" in r.output
    one_line(r)


def test_impossible_profile_combination(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    path = models.write_profile(tmp_path / "mixed.toml", "raspberrypi", input_dtype="uint8")
    r = cli_invoke("convert", digits_model, "--profile", path, "-o", tmp_path / "out")
    assert r.exit_code == 10
    assert "need conversion.quantization = 'int8-only'" in r.output
    assert str(path) in r.output


def test_calibration_of_wrong_shape(
    cli_invoke: Invoke, digits_model: Path, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    r = cli_invoke(
        "convert", digits_model, "--profile", "raspberrypi", "--calibration", digits_files["wrong_shape"],
        "-o", tmp_path / "out",
    )  # fmt: skip
    assert r.exit_code == 2
    assert "input 'pixels' has shape [20, 32]; expected [-1, 64]" in r.output
    one_line(r)
    no_output_folder(tmp_path / "out")


def test_calibration_of_wrong_dtype(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "strings.npy"
    np.save(path, np.array([["a"] * 64] * 4))
    r = cli_invoke("convert", digits_model, "--profile", "raspberrypi", "--calibration", path, "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "input 'pixels' has dtype <U1; expected numbers (float32), shape [-1, 64]" in r.output


def test_calibration_with_infinite_values(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    """TensorFlow 2.21's int8 calibrator segfaults on -inf (tensorflow#120295): refused before any work."""
    import numpy as np

    data = np.random.default_rng(0).uniform(0, 1, (20, 64)).astype(np.float32)
    data[3, 5] = -np.inf
    path = tmp_path / "inf.npy"
    np.save(path, data)
    r = cli_invoke("convert", digits_model, "--profile", "raspberrypi", "--calibration", path, "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "input 'pixels' holds NaN or infinite values (first at index [3, 5]); remove or replace them" in r.output
    one_line(r)
    no_output_folder(tmp_path / "o")


def test_mode_needing_calibration_without_it(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    r = cli_invoke("convert", digits_model, "--profile", "raspberrypi", "--profile", "generic-cpu", "-o", tmp_path)
    assert r.exit_code == 2
    assert "profile(s) raspberrypi needs calibration data" in r.output
    assert "--synthetic-calibration" in r.output
    one_line(r)


def test_op_the_target_cannot_run(
    cli_invoke: Invoke, work: Path, digits: Any, digits_files: dict[str, Path], tmp_path: Path, private_tmp: Path
) -> None:
    # ELU is a fine TFLite op, but not one the Edge TPU compiler maps
    model = models.train_digits(work / "elu.keras", digits[0], digits[1], activation="elu", epochs=2)
    out = tmp_path / "out"
    r = cli_invoke(
        "convert", model, "--profile", "coral-edgetpu", "--calibration", digits_files["calibration_npy"], "-o", out
    )
    assert r.exit_code == 12, r.output
    assert "op ELU cannot run on profile coral-edgetpu" in r.output
    one_line(r)
    no_output_folder(out)
    _nothing_left(private_tmp)


def test_op_without_a_kernel_in_the_mode(tmp_path: Path) -> None:
    """An op the integer-only converter has no kernel for is named by the converter's error."""
    import keras

    x = keras.Input((4,), name="x")
    keras.Model(x, keras.layers.Lambda(keras.ops.erf)(x)).export(str(tmp_path / "sm"), verbose=False)
    with pytest.raises(UnsupportedOpError) as err:
        run(
            tmp_path / "sm",
            [load_profile("cortex-m")],
            Options(output_dir=tmp_path / "out", synthetic_calibration=True),
        )
    assert "op ERF cannot run on profile cortex-m" in str(err.value)
    no_output_folder(tmp_path / "out")


def test_unwritable_output_folder(cli_invoke: Invoke, digits_model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = cli_invoke("convert", digits_model, "--profile", "generic-cpu", "-o", blocker / "out")
    assert r.exit_code == 2
    assert f"cannot write to output folder {blocker / 'out'}" in r.output
    assert "choose a folder you can write to" in r.output
    one_line(r)


def test_budget_failure_names_budget_value_and_limit(
    cli_invoke: Invoke, digits_model: Path, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    path = models.write_profile(tmp_path / "tiny.toml", "generic-cpu")
    path.write_text(path.read_text() + "\n[budgets]\nmax_model_size_mb = 0.001\n")
    out = tmp_path / "out"
    args = [
        "convert",
        digits_model,
        "--profile",
        path,
        "--validation",
        digits_files["validation_npz"],
        "-o",
        out,
        *FAST,
    ]
    r = cli_invoke(*args)
    assert r.exit_code == 13
    assert "tiny: max_model_size_mb = 0.001 MB: measured 0.0" in r.output
    assert "--no-strict" in r.output
    assert "FAILED" in r.output  # the report table is shown before the error
    no_output_folder(out)
    r = cli_invoke(*args, "--no-strict")
    assert r.exit_code == 0
    assert "warning:" in r.output
    assert [p.name for p in out.iterdir()] == ["digits-tiny.ekb"]


class _Interrupt(Reporter):
    def step(self, profile: str | None, text: str) -> None:
        if text == "writing the bundle":
            raise KeyboardInterrupt


def test_interrupted_run_leaves_nothing(digits_model: Path, tmp_path: Path, private_tmp: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(digits_model, [load_profile("generic-cpu")], Options(output_dir=out, latency_seconds=0.05), _Interrupt())
    no_output_folder(out)
    _nothing_left(private_tmp)
