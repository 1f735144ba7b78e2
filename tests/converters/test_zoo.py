"""The model families users bring (bench/_zoo.py builds and trains them), each converted for one int8
and one float profile and validated on the device's runtime backend against the source; and
`--quantization auto` choosing a mode within budget, with every try in the report and the manifest.
bench/zoo.py runs the whole matrix (every family x every profile) into docs/compatibility.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from edgekit.profiles import load_profile
from edgekit_runtime.bundle import read_bundle
from tests.converters.conftest import FAST, invoke

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import _zoo  # noqa: E402 - bench/ is not a package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def _convert(zoo: Path, name: str, profiles: list[str], out: Path, *extra: str) -> dict[str, Any]:
    if name.startswith("torch_") and importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (pip install torch==2.13.0; the dev extra has it)")
    built = _zoo.build(zoo, name)
    args: list[str | Path] = ["convert", built.model, "--calibration", built.calibration]
    args += ["--validation", built.validation, "-o", out, "--json", "--no-strict", *FAST, *extra]
    for p in profiles:
        args += ["-p", p]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _faithful(p: dict[str, Any]) -> None:
    """Converted, validated, and close to the source on the validation data."""
    m = p["metrics"]
    assert p["bundle"] is not None and Path(p["bundle"]).is_file()
    assert m["samples"] > 0 and m["trustworthy"]
    if m.get("top1_agreement") is not None:
        assert m["top1_agreement"] >= 0.9, p
    else:
        assert m["cosine_similarity"] >= 0.99, p


FAMILIES = [
    # (zoo model, int8 profile, float profile)
    ("lstm_tokens", "raspberrypi", "generic-cpu"),
    ("gru_float", "raspberrypi", "android-arm64"),
    ("transformer", "raspberrypi", "jetson-orin"),
    ("kws_conv1d", "coral-edgetpu", "generic-cpu"),
    ("ds_cnn", "cortex-m", "android-arm64"),
    ("two_heads", "raspberrypi", "jetson-orin"),
    ("detector", "coral-edgetpu", "generic-cpu"),
    ("torch_mlp", "x86-server", "jetson-orin"),
]


def test_an_nchw_pytorch_cnn_converts_for_a_float_profile(zoo: Path, tmp_path: Path) -> None:
    """NCHW stays NCHW ([N, 1, 8, 8] in the bundle); its int8 conversion is the auto test below (plain
    static-int8 loses about 9 points on it, measured)."""
    report = _convert(zoo, "torch_cnn_nchw", ["jetson-orin"], tmp_path / "out")
    (p,) = report["profiles"]
    _faithful(p)
    assert report["source"]["inputs"][0]["shape"] == [-1, 1, 8, 8]
    # the weights live in model.onnx.data beside the model: the source's hash and size cover both
    files = [zoo / "torch_cnn_nchw" / "model.onnx", zoo / "torch_cnn_nchw" / "model.onnx.data"]
    assert report["source"]["size_bytes"] == sum(f.stat().st_size for f in files)


@pytest.mark.parametrize(("name", "int8", "floating"), FAMILIES)
def test_a_family_converts_for_an_int8_and_a_float_profile(
    zoo: Path, tmp_path: Path, name: str, int8: str, floating: str
) -> None:
    report = _convert(zoo, name, [int8, floating], tmp_path / "out")
    assert report["failed"] == []
    by = {p["profile"]: p for p in report["profiles"]}
    assert set(by) == {int8, floating}
    for p in by.values():
        _faithful(p)
    quantized = by[int8]
    assert quantized["quantization"] in {"int8", "int8-only", "static-int8"}
    manifest = read_bundle(Path(quantized["bundle"])).manifest
    assert manifest.calibration["samples"] > 0
    # what stayed in float is recorded: nothing on a full-integer target
    if load_profile(int8).constraints.full_integer:
        assert manifest.calibration.get("float_ops", {}) == {}
    assert quantized["constraints"]["float_ops"] == manifest.calibration.get("float_ops", {})


def test_recurrent_layers_are_unrolled_to_calibrate_and_the_manifest_says_so(zoo: Path, tmp_path: Path) -> None:
    report = _convert(zoo, "lstm_tokens", ["raspberrypi"], tmp_path / "out")
    (p,) = report["profiles"]
    assert any("unrolled over their time steps for int8 calibration" in n for n in p["notes"]), p["notes"]
    assert "WHILE" not in p["constraints"]["ops"]


def test_float16_onnx_keeps_the_casts_onnx_runtime_refuses_in_float32(zoo: Path, tmp_path: Path) -> None:
    """onnxconverter_common's float16 form of tf2onnx's Cast nodes (Keras Embedding) does not load in ONNX
    Runtime; edgekit keeps that op type in float32 and says so."""
    report = _convert(zoo, "lstm_tokens", ["jetson-orin"], tmp_path / "out")
    (p,) = report["profiles"]
    _faithful(p)
    assert any(n.startswith("kept in float32: op type(s) Cast") for n in p["notes"]), p["notes"]


def test_a_recurrent_model_on_the_edge_tpu_is_refused_with_the_ops_it_lacks(zoo: Path, tmp_path: Path) -> None:
    built = _zoo.build(zoo, "gru_float")
    out = tmp_path / "out"
    result = invoke("convert", built.model, "-p", "coral-edgetpu", "--calibration", built.calibration, "-o", out, *FAST)
    assert result.exit_code == 12, result.output
    assert "cannot run on profile coral-edgetpu (not in its constraints.allowed_ops)" in result.output
    assert not out.exists()


def test_auto_chooses_the_first_mode_within_budget_and_reports_every_try(zoo: Path, tmp_path: Path) -> None:
    report = _convert(zoo, "digits", ["raspberrypi"], tmp_path / "out", "--quantization", "auto")
    (p,) = report["profiles"]
    search = p["quantization_search"]
    tries = search["tries"]
    assert tries[0]["mode"] == "int8" and tries[0]["float_layers"] == []
    (chosen,) = [t for t in tries if t.get("chosen")]
    assert chosen is tries[-1]  # the search stops at the first try within budget
    assert chosen["failed"] == [] and chosen["verdict"] == "within budgets"
    limit = load_profile("raspberrypi").budgets.max_accuracy_drop_points
    assert limit is not None and chosen["accuracy"] <= limit
    assert all(t["failed"] for t in tries[:-1])  # every earlier try was over budget
    assert p["quantization"] == chosen["mode"]
    assert search["reason"].startswith(f"chose {chosen['mode']}")
    manifest = read_bundle(Path(p["bundle"])).manifest
    assert manifest.quantization == chosen["mode"]
    assert manifest.validation["quantization_search"]["tries"] == tries


def test_auto_keeps_the_damaged_layers_in_float_when_that_meets_the_budget(zoo: Path, tmp_path: Path) -> None:
    """The PyTorch NCHW CNN loses accuracy in plain static-int8 on ONNX Runtime; where that is so, auto
    ranks the nodes by their quantization error and keeps the worst in float before trying another mode."""
    report = _convert(zoo, "torch_cnn_nchw", ["x86-server"], tmp_path / "out", "--quantization", "auto")
    (p,) = report["profiles"]
    tries = p["quantization_search"]["tries"]
    (chosen,) = [t for t in tries if t.get("chosen")]
    assert chosen["failed"] == []
    first = tries[0]
    assert first["mode"] == "static-int8" and first["float_layers"] == []
    if first["failed"]:  # the plain mode broke the budget: the next tries keep layers in float
        assert tries[1]["mode"] == "static-int8" and tries[1]["float_layers"]
        manifest = read_bundle(Path(p["bundle"])).manifest
        if chosen["mode"] == "static-int8":
            assert manifest.calibration["float_layers"] == chosen["float_layers"]
            assert manifest.calibration["float_ops"]  # the float nodes are counted by op type
    else:
        assert chosen is first


def test_quantization_names_a_mode_of_the_profiles_format(tmp_path: Path) -> None:
    result = invoke(
        "convert", BENCH.parent / "examples" / "digits" / "model.keras", "-p", "raspberrypi",
        "--quantization", "static-int8", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--quantization static-int8: not a tflite mode (profile raspberrypi); use auto or one of" in result.output
    assert not (tmp_path / "out").exists()
