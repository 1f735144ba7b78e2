"""`edgekit inspect` and `edgekit bench` on bundles written by `edgekit convert`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgekit.cli import cli

pytestmark = pytest.mark.slow


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_table(bundles: dict[str, Path]) -> None:
    r = invoke("inspect", bundles["int8"])
    assert r.exit_code == 0, r.output
    for text in (
        "tflite / int8-only",
        "cortex-m",
        "int8",
        "[1, 64]",
        "accuracy_drop_points",
        "max_model_size_mb",
        "golden",
    ):
        assert text in r.output, text
    assert "'budget':" not in r.output  # budgets are shown as lines, not as Python reprs


def test_inspect_json(bundles: dict[str, Path]) -> None:
    r = invoke("inspect", bundles["onnx"], "--json")
    data = json.loads(r.stdout)
    assert data["format"] == "onnx"
    assert data["quantization"] == "static-int8"
    assert data["source"]["format"] == "onnx"
    assert data["validation"]["accuracy_source"] > 90
    assert data["signed"] is False


def test_inspect_not_a_bundle(tmp_path: Path) -> None:
    path = tmp_path / "x.ekb"
    path.write_text("nope")
    r = invoke("inspect", path)
    assert r.exit_code == 5
    assert "not a bundle" in r.output


@pytest.mark.parametrize("kind", ["onnx", "int8"])
def test_bench(bundles: dict[str, Path], kind: str) -> None:
    r = invoke("bench", bundles[kind], "--seconds", "0.1", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    sizes = [row["batch_size"] for row in data["results"]]
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert all(row["p50_ms"] > 0 and row["rows_per_s"] > 0 for row in data["results"])


def test_bench_table_with_batch_sizes(bundles: dict[str, Path]) -> None:
    r = invoke("bench", bundles["onnx"], "-b", "1", "-b", "4", "--seconds", "0.1")
    assert r.exit_code == 0, r.output
    assert "p50 ms" in r.output
    assert "rows/s" in r.output


def test_a_missing_bundle_is_not_found_exit_3(tmp_path: Path) -> None:
    for command in ("inspect", "bench"):
        result = CliRunner().invoke(cli, [command, str(tmp_path / "nosuch.ekb")])
        assert result.exit_code == 3, result.output
        assert result.output == f"Error: {tmp_path / 'nosuch.ekb'}: no such bundle file\n"
