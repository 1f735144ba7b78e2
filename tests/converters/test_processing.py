"""`--normalize` and `--labels`: the manifest's pre/post-processing, raw data in, top-k labels out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result

from edgekit.errors import InvalidInputError, NotFoundError
from edgekit_converters import processing
from edgekit_converters.calibration import Dataset
from edgekit_runtime.bundle import Preprocessing
from edgekit_runtime.tensors import TensorSpec
from tests.converters.conftest import FAST, no_output_folder, one_line

Invoke = Callable[..., Result]
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SCALE = 16.0  # the raw digits are 0..16; the model was trained on pixels / 16


# -- parsing and checks on their own (no model) -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mean", "std"),
    [
        ("127.5,127.5", [127.5], [127.5]),
        (" 0 , 16 ", [0.0], [16.0]),
        ("0.485:0.456:0.406,0.229:0.224:0.225", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ("-1:0:1,2", [-1.0, 0.0, 1.0], [2.0]),
        ("0.5,1e-3:2:3", [0.5], [0.001, 2.0, 3.0]),
    ],
)
def test_parse_normalize(text: str, mean: list[float], std: list[float]) -> None:
    n = processing.parse_normalize(text)
    assert (n.mean, n.std) == (mean, std)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.5", "expected MEAN,STD"),
        ("1,2,3", "expected MEAN,STD"),
        (",1", "expected MEAN,STD"),
        ("abc,1", "mean 'abc' is not a number"),
        ("0,1:x:3", "std 'x' is not a number"),
        ("0:,1", "mean '' is not a number"),
        ("nan,1", "mean 'nan' is not a finite number"),
        ("0,0", "std must be positive"),
        ("0,1:0:1", "std must be positive"),
        ("0,-2", "std must be positive"),
        ("1:2,3:4:5", "mean has 2 channels but std has 3"),
    ],
)
def test_parse_normalize_errors(text: str, expected: str) -> None:
    with pytest.raises(InvalidInputError, match=expected):
        processing.parse_normalize(text)


def test_read_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffcat\r\n  dog \r\nbird\n\n\n".encode())
    assert processing.read_labels(path) == ["cat", "dog", "bird"]
    path.write_text("cat\n\ndog\n")
    with pytest.raises(InvalidInputError, match="line 2 is empty"):
        processing.read_labels(path)
    path.write_text("\n \n")
    with pytest.raises(InvalidInputError, match="holds no labels"):
        processing.read_labels(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidInputError, match="not UTF-8 text"):
        processing.read_labels(path)
    with pytest.raises(NotFoundError, match="no such file"):
        processing.read_labels(tmp_path / "nope.txt")
    with pytest.raises(InvalidInputError, match="is a folder"):
        processing.read_labels(tmp_path)


def test_preprocessing_picks_and_checks_the_input() -> None:
    image = TensorSpec(name="image", dtype="float32", shape=[-1, 8, 8, 3])
    ids = TensorSpec(name="ids", dtype="int32", shape=[-1, 4])
    rgb = processing.parse_normalize("0.5:0.4:0.3,0.2:0.2:0.2")
    pre = processing.preprocessing(rgb, [image], None)
    assert (pre.input, pre.mean, pre.std) == ("image", [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    with pytest.raises(InvalidInputError, match="the model has 2 inputs \\(image, ids\\); choose one with"):
        processing.preprocessing(rgb, [image, ids], None)
    assert processing.preprocessing(rgb, [image, ids], "image").input == "image"
    with pytest.raises(InvalidInputError, match="no input of that name; its inputs are image, ids"):
        processing.preprocessing(rgb, [image, ids], "pixels")
    with pytest.raises(InvalidInputError, match="input 'ids' is int32; normalised values need a float input"):
        processing.preprocessing(processing.parse_normalize("0,2"), [image, ids], "ids")
    gray = TensorSpec(name="image", dtype="float32", shape=[-1, 8, 8, 1])
    with pytest.raises(InvalidInputError, match="3 per-channel values, but input 'image' has shape \\[-1, 8, 8, 1\\]"):
        processing.preprocessing(rgb, [gray], None)


def test_normalize_matches_the_runtime() -> None:
    raw = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    pre = Preprocessing(input="x", mean=[1.0, 2.0, 3.0], std=[2.0])
    data = processing.normalize(Dataset({"x": raw}, "test"), pre)
    np.testing.assert_allclose(data.inputs["x"], (raw - np.asarray([1, 2, 3])) / 2)
    synthetic = Dataset({"x": raw}, "synthetic", synthetic=True)
    assert processing.normalize(synthetic, pre) is synthetic  # random data is already in the model's space


def test_postprocessing_checks_labels_against_the_output() -> None:
    outputs = {"scores": np.zeros((4, 3)), "value": np.zeros((4, 1)), "map": np.zeros((4, 2, 3))}
    post = processing.postprocessing(["a", "b", "c"], None, outputs, "scores", Path("l.txt"))
    assert (post.output, post.top_k, post.labels) == ("scores", 3, ["a", "b", "c"])  # default 5, capped at 3
    assert processing.postprocessing(["a", "b", "c"], 2, outputs, "scores", Path("l.txt")).top_k == 2
    with pytest.raises(InvalidInputError, match="the model has 3 outputs \\(map, scores, value\\); choose one with"):
        processing.postprocessing(["a", "b", "c"], None, outputs, None, Path("l.txt"))
    with pytest.raises(InvalidInputError, match="--top-k 4 is more than the 3 labels"):
        processing.postprocessing(["a", "b", "c"], 4, outputs, "scores", Path("l.txt"))
    with pytest.raises(InvalidInputError, match="3 labels, but output 'value' has 1 values in its last dimension"):
        processing.postprocessing(["a", "b", "c"], None, outputs, "value", Path("l.txt"))
    with pytest.raises(InvalidInputError, match="it has 6 values per sample"):
        processing.postprocessing(["a", "b", "c"], None, outputs, "map", Path("l.txt"))


# -- real conversions -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def raw_digits(work: Path, digits: Any) -> dict[str, Path]:
    """The digits as a client has them (0..16), and a labels file."""
    x_train, _, x_test, y_test = digits
    files = {
        "calibration": work / "raw_calibration.npy",
        "validation": work / "raw_validation.npz",
        "labels": work / "labels.txt",
    }
    np.save(files["calibration"], x_train[:200] * SCALE)
    np.savez(files["validation"], pixels=x_test * SCALE, labels=y_test)
    files["labels"].write_text("\n".join(LABELS) + "\n")
    return files


@pytest.mark.slow
def test_normalized_bundle_with_labels_serves_raw_inputs(
    cli_invoke: Invoke, digits_model: Path, digits: Any, raw_digits: dict[str, Path], tmp_path: Path
) -> None:
    import keras

    from edgekit_runtime import Runtime
    from edgekit_runtime.bundle import read_bundle

    out = tmp_path / "out"
    # raspberrypi: int8, calibrated - the raw calibration data must be normalised before calibrating
    r = cli_invoke(
        "convert", digits_model, "--profile", "raspberrypi", "-o", out, "--name", "digits",
        "--calibration", raw_digits["calibration"], "--validation", raw_digits["validation"],
        "--normalize", f"0,{SCALE:g}", "--labels", raw_digits["labels"], "--top-k", "3", "--json", *FAST,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["source"]["preprocessing"] == {"input": "pixels", "mean": [0.0], "std": [SCALE]}
    assert report["source"]["postprocessing"]["top_k"] == 3
    metrics = report["profiles"][0]["metrics"]
    assert metrics["accuracy_converted"] > 90  # validated on normalised data: the model's accuracy holds
    assert metrics["top1_agreement"] >= 0.97

    path = out / "digits-raspberrypi.ekb"
    bundle = read_bundle(path)
    m = bundle.manifest
    assert m.preprocessing is not None
    assert (m.preprocessing.input, m.preprocessing.mean, m.preprocessing.std) == ("pixels", [0.0], [SCALE])
    assert m.postprocessing is not None
    assert (m.postprocessing.output, m.postprocessing.top_k, m.postprocessing.labels) == ("output_0", 3, LABELS)
    # golden inputs are what the engine takes (the smoke test skips preprocessing): normalised
    x_test = digits[2]
    np.testing.assert_allclose(bundle.golden_inputs["pixels"], x_test[: m.golden.count] if m.golden else [])

    raw = x_test * SCALE
    source = keras.saving.load_model(digits_model, compile=False)
    expected = np.argmax(source.predict(raw / SCALE, verbose=0), axis=1)
    with Runtime() as rt:
        rt.load(path)
        parts = [rt.predict("digits", {"pixels": raw[i : i + 8]}) for i in range(0, len(raw), 8)]
    got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert got["top_k_labels"].shape == (len(raw), 3)
    assert got["top_k_indices"][:, 0].tolist() == [LABELS.index(label) for label in got["top_k_labels"][:, 0]]
    agreement = np.mean(got["top_k_labels"][:, 0] == np.asarray(LABELS)[expected])
    assert agreement >= 0.97, agreement
    assert np.all(np.diff(got["top_k_scores"], axis=1) <= 0)  # best first


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--normalize", "abc,1"], 2, "--normalize 'abc,1': mean 'abc' is not a number"),
        (["--normalize", "0,0"], 2, "--normalize '0,0': std must be positive"),
        (["--normalize", "16"], 2, "--normalize '16': expected MEAN,STD"),
        (["--normalize-input", "pixels"], 2, "--normalize-input needs --normalize MEAN,STD"),
        (["--labels", "{tmp}/missing.txt"], 3, "labels file {tmp}/missing.txt: no such file"),
        (["--labels", "{tmp}/empty.txt"], 2, "labels file {tmp}/empty.txt: holds no labels"),
        (["--labels", "{tmp}/ten.txt", "--top-k", "11"], 2, "--top-k 11 is more than the 10 labels"),
        (["--labels", "{tmp}/ten.txt", "--top-k", "0"], 2, "--top-k 0: must be at least 1"),
        (["--top-k", "3"], 2, "--top-k needs --labels FILE"),
    ],
)
def test_bad_values_before_any_work(
    cli_invoke: Invoke, tmp_path: Path, args: list[str], code: int, expected: str
) -> None:
    """Checked before the model is even loaded (the model path does not need to exist)."""
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "ten.txt").write_text("\n".join(LABELS))
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    r = cli_invoke("convert", tmp_path / "never-read.keras", "--profile", "generic-cpu", "-o", out, *args)
    assert r.exit_code == code, r.output
    assert expected.format(tmp=tmp_path) in r.output
    one_line(r)
    no_output_folder(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--normalize", "0:0:0,1:1:1"],
            "--normalize: 3 per-channel values, but input 'pixels' has shape [-1, 64] (64 channels in its last",
        ),
        (["--normalize", "0,16", "--normalize-input", "image"], "--normalize-input 'image': the model has no input"),
        (["--labels", "{tmp}/three.txt"], "three.txt: 3 labels, but output 'output_0' has 10 values in its last"),
        (["--labels", "{tmp}/ten.txt", "--labels-output", "probs"], "--labels-output 'probs': the model has no output"),
    ],
)
def test_bad_values_against_the_model(
    cli_invoke: Invoke, digits_model: Path, raw_digits: dict[str, Path], tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "ten.txt").write_text("\n".join(LABELS))
    out = tmp_path / "out"
    r = cli_invoke(
        "convert", digits_model, "--profile", "generic-cpu", "-o", out, "--validation", raw_digits["validation"],
        *[a.format(tmp=tmp_path) for a in args], *FAST,
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert expected.format(tmp=tmp_path) in r.output
    one_line(r)
    no_output_folder(out)
