"""`edgekit-runtime score` / `edgekit score` on every input format, and CLI errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit_runtime import Runtime
from edgekit_runtime.cli import cli
from tests.runtime import models

X = np.random.default_rng(5).normal(size=(37, 4)).astype(np.float32)


def expected(bundle: Path, feeds: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    with Runtime() as rt:
        rt.load(bundle)
        return rt.predict(name, feeds)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model of images: float32[-1, 8, 8, 3] -> the mean of each channel."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 8, 8, 3])
    out = helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["n", 3])
    node = helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2], keepdims=0)
    model = helper.make_model(helper.make_graph([node], "g", [inp], [out]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    d = tmp_path_factory.mktemp("img")
    return models.make_bundle(d / "img.ekb", name="img", version=1, fmt="onnx", model=model.SerializeToString())


def run(args: list[str]) -> object:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_score_npy_to_npy_and_csv(bundles: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "x.npy"
    np.save(src, X)
    want = expected(bundles["mlp"], {"x": X}, "mlp")["output_0"]
    r = run(["score", str(bundles["mlp"]), str(src), "-o", str(tmp_path / "y.npy"), "--max-batch-size", "4"])
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)
    r = run(["score", str(bundles["fixed1"]), str(src), "-o", str(tmp_path / "y.csv"), "-q"])
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    with (tmp_path / "y.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["output_0_0", "output_0_1", "output_0_2"]
    np.testing.assert_allclose(np.asarray(rows[1:], dtype=np.float32), want, atol=1e-5)


def test_score_csv_and_npz(bundles: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "x.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "d"])
        w.writerows(X.tolist())
    r = run(["score", str(bundles["int8"]), str(src), "-o", str(tmp_path / "y.npz")])
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    with np.load(tmp_path / "y.npz") as z:
        got = z["output_0"]
    np.testing.assert_array_equal(got, expected(bundles["int8"], {"x": X}, "int8")["output_0"])
    two = tmp_path / "two.npz"
    np.savez(two, a=X[:, :3], b=X[:, 1:])
    r = run(["score", str(bundles["two"]), str(two), "-o", str(tmp_path / "two-out.npz")])
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    with np.load(tmp_path / "two-out.npz") as z:
        np.testing.assert_allclose(z["prod"], X[:, :3] * X[:, 1:], rtol=1e-6)
    r = CliRunner().invoke(cli, ["score", str(bundles["two"]), str(two), "-o", str(tmp_path / "two.npy")])
    assert r.exit_code == 2
    assert "several outputs" in r.output


def test_score_folder_of_images(image_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    colors = [(255, 0, 0), (0, 128, 0), (10, 20, 30)]
    for i, c in enumerate(colors):
        Image.new("RGB", (16, 12), c).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("ignored")
    r = run(["score", str(image_bundle), str(folder), "-o", str(tmp_path / "out.csv")])
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    with (tmp_path / "out.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "mean_0", "mean_1", "mean_2"]
    assert [row[0] for row in rows[1:]] == ["img0.png", "img1.png", "img2.png"]
    np.testing.assert_allclose(np.asarray([row[1:] for row in rows[1:]], dtype=float), colors, atol=0.5)


def test_toolkit_score_is_the_same_command(bundles: dict[str, Path], tmp_path: Path) -> None:
    from edgekit.cli import cli as toolkit

    src = tmp_path / "x.npy"
    np.save(src, X)
    r = CliRunner().invoke(toolkit, ["score", str(bundles["mlp"]), str(src), "-o", str(tmp_path / "y.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "y.npy").shape == (37, 3)
    assert "serve" in CliRunner().invoke(toolkit, ["--help"]).output


def test_errors_are_one_line_with_exit_codes(bundles: dict[str, Path], tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["score", str(tmp_path / "missing.ekb"), str(tmp_path / "x.npy"), "-o", "y.npy"])
    assert r.exit_code == 3
    assert r.output.strip().startswith("Error:")
    assert len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((100, 5), np.float32))
    r = CliRunner().invoke(cli, ["score", str(bundles["mlp"]), str(bad), "-o", str(tmp_path / "y.npy"), "-q"])
    assert r.exit_code == 2
    assert "input 'x' has shape [100, 5]; expected [-1, 4]" in r.output  # the file's shape, not a chunk's
    r = CliRunner().invoke(cli, ["serve"])
    assert r.exit_code == 2
    assert "SOURCE" in r.output
    cfg = tmp_path / "c.toml"
    cfg.write_text("[batching]\nmax_batch_sise = 3\n")
    r = CliRunner().invoke(cli, ["serve", str(bundles["mlp"]), "--config", str(cfg)])
    assert r.exit_code == 2
    assert "max_batch_sise" in r.output
    r = CliRunner().invoke(cli, ["serve", str(bundles["mlp"]), "--batch-timeout-policy", "sometimes"])
    assert r.exit_code == 2
    assert "Invalid value for '--batch-timeout-policy': 'sometimes' is not one of 'adaptive', 'fixed'" in r.output


def test_score_progress_goes_to_stderr(bundles: dict[str, Path], tmp_path: Path) -> None:
    from edgekit.cli import cli as toolkit  # the toolkit has rich: its bar, not click's

    src = tmp_path / "x.npy"
    np.save(src, X)
    for command in (cli, toolkit):
        r = CliRunner().invoke(command, ["score", str(bundles["mlp"]), str(src), "-o", str(tmp_path / "y.npy")])
        assert r.exit_code == 0, r.output
        assert r.stdout == ""  # `score ... > file` captures nothing
        assert "scoring mlp v1" in r.stderr
        assert f"wrote {len(X)} rows of output_0" in r.stderr


def test_score_json_summary(bundles: dict[str, Path], tmp_path: Path) -> None:
    import json

    src = tmp_path / "x.npy"
    np.save(src, X)
    r = CliRunner().invoke(cli, ["score", str(bundles["mlp"]), str(src), "-o", str(tmp_path / "y.npz"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["model"] == "mlp"
    assert summary["rows"] == len(X)
    assert summary["outputs"] == {"output_0": [len(X), 3]}
    assert summary["output_file"] == str(tmp_path / "y.npz")
    assert np.load(tmp_path / "y.npz")["output_0"].shape == (len(X), 3)
