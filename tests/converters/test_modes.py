"""Every TFLite and ONNX mode on the digits classifier, through every bundled profile."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgekit.profiles import bundled_profiles
from edgekit_runtime.backends import load_backend
from edgekit_runtime.bundle import read_bundle
from edgekit_runtime.tensors import dequantize

pytestmark = pytest.mark.slow

MODES = {
    "generic-cpu": ("tflite", "float32"),
    "android-arm64": ("tflite", "float16"),
    "tflite-dynamic": ("tflite", "dynamic"),
    "raspberrypi": ("tflite", "int8"),
    "coral-edgetpu": ("tflite", "int8-only"),
    "cortex-m": ("tflite", "int8-only"),
    "tflite-int16x8": ("tflite", "int16x8"),
    "onnx-float32": ("onnx", "float32"),
    "jetson-orin": ("onnx", "float16"),
    "onnx-dynamic": ("onnx", "dynamic-int8"),
    "x86-server": ("onnx", "static-int8"),
}
INT8 = {"raspberrypi", "coral-edgetpu", "cortex-m", "x86-server", "onnx-dynamic", "tflite-dynamic"}


def test_every_bundled_profile_and_mode_converted(all_modes: dict[str, Any]) -> None:
    by = all_modes["by_profile"]
    assert set(bundled_profiles()) <= set(by)
    assert {(p["format"], p["quantization"]) for p in by.values()} == set(MODES.values())
    for name, (fmt, mode) in MODES.items():
        assert (by[name]["format"], by[name]["quantization"]) == (fmt, mode)


@pytest.mark.parametrize("profile", sorted(MODES))
def test_accuracy_is_real_and_kept(all_modes: dict[str, Any], profile: str) -> None:
    m = all_modes["by_profile"][profile]["metrics"]
    assert m["trustworthy"] is True
    assert m["samples"] == 360
    assert m["accuracy_source"] >= 90.0
    drop = m["accuracy_drop_points"]
    assert drop <= (1.0 if profile in INT8 else 0.5), m
    assert m["top1_agreement"] >= 0.97
    assert m["cosine_similarity"] > 0.99
    assert m["sqnr_db"] > 15
    assert m["latency_p50_ms_b1"] > 0


def test_quantized_models_are_smaller(all_modes: dict[str, Any]) -> None:
    by = all_modes["by_profile"]
    float32 = by["generic-cpu"]["size_bytes"]
    assert by["android-arm64"]["size_bytes"] < 0.75 * float32
    assert by["raspberrypi"]["size_bytes"] < 0.6 * float32
    assert by["x86-server"]["size_bytes"] < by["onnx-float32"]["size_bytes"]


@pytest.mark.parametrize("profile", sorted(MODES))
def test_bundle_matches_report_and_runs_golden_samples(all_modes: dict[str, Any], profile: str) -> None:
    entry = all_modes["by_profile"][profile]
    bundle = read_bundle(entry["bundle"])
    m = bundle.manifest
    assert (m.format, m.quantization) == MODES[profile]
    assert m.profile.name == profile
    assert m.model_size_bytes == entry["size_bytes"] == len(bundle.model)
    assert m.source is not None and m.source.format == "keras" and len(m.source.sha256) == 64
    assert m.validation["accuracy_converted"] == entry["metrics"]["accuracy_converted"]
    assert m.converter["tensorflow"] and m.created
    assert m.golden is not None and m.golden.count == 8
    # the device's smoke test: the bundle's own model on its golden inputs gives its golden outputs
    backend = load_backend(m.format, bundle.model, m.profile.runtime)
    got = backend.run(bundle.golden_inputs)
    for name, want in bundle.golden_outputs.items():
        np.testing.assert_allclose(got[name].astype(np.float64), want.astype(np.float64), atol=m.golden.atol)


@pytest.mark.parametrize(("profile", "dtype"), [("coral-edgetpu", "uint8"), ("cortex-m", "int8")])
def test_integer_io_carries_quantization(all_modes: dict[str, Any], profile: str, dtype: str) -> None:
    bundle = read_bundle(all_modes["by_profile"][profile]["bundle"])
    m = bundle.manifest
    (inp,), (out,) = m.inputs, m.outputs
    assert inp.dtype == out.dtype == dtype
    assert inp.quantization is not None and out.quantization is not None
    assert inp.shape == [1, 64]  # static batch for these targets
    # float input quantized by the runtime, output dequantized with the manifest's parameters
    backend = load_backend("tflite", bundle.model, m.profile.runtime)
    raw = backend.run({"pixels": bundle.golden_inputs["pixels"]})["output_0"]
    probs = dequantize(raw, out)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.05)


def test_constraint_facts_reported(all_modes: dict[str, Any]) -> None:
    by = all_modes["by_profile"]
    assert "FULLY_CONNECTED" in by["cortex-m"]["constraints"]["ops"]
    assert 0 < by["cortex-m"]["constraints"]["tensor_arena_kb"] < 256
    assert "QuantizeLinear" in by["x86-server"]["constraints"]["ops"]


def test_budgets_reported_per_profile(all_modes: dict[str, Any]) -> None:
    rpi = all_modes["by_profile"]["raspberrypi"]
    names = {b["budget"] for b in rpi["budgets"]}
    assert {"max_model_size_mb", "max_accuracy_drop_points", "min_top1_agreement", "max_latency_ms_p50"} <= names
    assert rpi["budgets_ok"] is True
