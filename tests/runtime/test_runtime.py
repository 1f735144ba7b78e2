"""The Python API, settings precedence and the manifest's pre/post-processing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.bundle import BatchingSettings, Postprocessing, Preprocessing, RuntimeSettings, read_bundle
from edgekit_runtime.config import BatchingOverrides, load_config, runtime_settings
from edgekit_runtime.errors import InvalidInputError, NotFoundError
from edgekit_runtime.tensors import dequantize
from tests.runtime import models
from tests.runtime.conftest import GOLDEN_X, Models, reference

X = np.random.default_rng(9).normal(size=(6, 4)).astype(np.float32)


def test_sync_and_async_predict(bundles: dict[str, Path], model_files: Models) -> None:
    want = reference(model_files, X)
    with Runtime() as rt:
        assert rt.load(bundles["mlp"]) == ["mlp"]
        np.testing.assert_allclose(rt.predict("mlp", {"x": X})["output_0"], want, atol=1e-4)

        async def many() -> list[dict[str, np.ndarray]]:
            return await asyncio.gather(*(rt.apredict("mlp", {"x": X[i : i + 1]}) for i in range(6)))

        outs = asyncio.run(many())
        np.testing.assert_allclose(np.concatenate([o["output_0"] for o in outs]), want, atol=1e-4)
        with pytest.raises(NotFoundError, match="served models: mlp"):
            rt.predict("nope", {"x": X})
        with pytest.raises(InvalidInputError, match=r"'x'.*float32.*\[-1, 4\]"):
            rt.predict("mlp", {"x": X[:, :3]})


def test_async_context_manager(bundles: dict[str, Path]) -> None:
    async def main() -> tuple[int, ...]:
        async with Runtime() as rt:
            rt.load(bundles["two"])
            out = await rt.apredict("two", {"a": X[:, :3], "b": X[:, :3]})
            return out["sum"].shape

    assert asyncio.run(main()) == (6, 3)


def test_fixed_batch_and_int8_models(bundles: dict[str, Path], model_files: Models) -> None:
    with Runtime() as rt:
        rt.load(bundles["fixed1"])
        rt.load(bundles["int8"])
        np.testing.assert_allclose(rt.predict("fixed1", {"x": X})["output_0"], reference(model_files, X), atol=1e-4)
        q = rt.predict("int8", {"x": GOLDEN_X})["output_0"]
        assert q.dtype == np.int8
        spec = rt.get("int8").outputs[0]
        np.testing.assert_allclose(dequantize(q, spec), reference(model_files, GOLDEN_X), atol=0.15)
        # a client may send the integer values directly as well
        assert rt.predict("int8", {"x": np.zeros((2, 4), np.int8)})["output_0"].shape == (2, 3)


def test_settings_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "edgekit.toml"
    cfg_file.write_text(
        """
threads = 3
[server]
port = 9000
[batching]
max_batch_size = 16
batch_timeout_micros = 500
[models.mlp]
version_policy = { latest = 2 }
threads = 1
[models.mlp.batching]
max_enqueued_batches = 4
batch_timeout_policy = "fixed"
[models.other]
version_policy = "latest"
[models.other.batching]
enabled = false
"""
    )
    cfg = load_config(cfg_file)
    assert cfg.server.port == 9000
    profile = RuntimeSettings(threads=4, batching=BatchingSettings(max_batch_size=8, allowed_batch_sizes=[1, 2, 4, 8]))
    s = runtime_settings(profile, cfg, "mlp")
    assert s.threads == 1
    assert s.batching.max_batch_size == 16
    assert s.batching.allowed_batch_sizes == [1, 2, 4, 8, 16]  # the new max extends the profile's sizes
    assert s.batching.batch_timeout_micros == 500
    assert s.batching.max_enqueued_batches == 4
    assert s.batching.batch_timeout_policy == "fixed"
    assert runtime_settings(profile, cfg, "other").batching.batch_timeout_policy == "adaptive"  # the default
    flags = BatchingOverrides(batch_timeout_policy="adaptive")
    assert runtime_settings(profile, cfg, "mlp", flags=flags).batching.batch_timeout_policy == "adaptive"
    s = runtime_settings(profile, cfg, "other", flags=BatchingOverrides(batch_timeout_micros=0), threads=2)
    assert not s.batching.enabled
    assert s.batching.batch_timeout_micros == 0
    assert s.threads == 2
    assert cfg.model("mlp").version_policy.select([1, 2, 3]) == {2, 3}
    cfg_file.write_text('[batching]\nbatch_timeout_policy = "sometimes"\n')
    with pytest.raises(
        InvalidInputError, match=r"'batching.batch_timeout_policy': Input should be 'adaptive' or 'fixed'"
    ):
        load_config(cfg_file)
    cfg_file.write_text("[models.mlp]\nversion_policy = { latest = 1, specific = [1] }\n")
    with pytest.raises(InvalidInputError, match="version_policy"):
        load_config(cfg_file)


def test_pre_and_post_processing(model_files: Models, tmp_path: Path) -> None:
    b = read_bundle(models.make_bundle(tmp_path / "raw.ekb", name="two", version=1, fmt="onnx", model=model_files.two))
    m = b.manifest.model_copy(
        update={
            "preprocessing": Preprocessing(input="a", mean=[1.0], std=[2.0]),
            "postprocessing": Postprocessing(output="sum", top_k=2, labels=["zero", "one", "two"]),
        }
    )
    path = tmp_path / "pp.ekb"
    type(b)(m, b.model, {}, {}).write(path)
    with Runtime() as rt:
        rt.load(path)
        a = np.asarray([[1.0, 3.0, 5.0]], np.float32)  # -> (a - 1) / 2 = [0, 1, 2]
        out = rt.predict("two", {"a": a, "b": np.zeros((1, 3), np.float32)})
        np.testing.assert_allclose(out["sum"], [[0.0, 1.0, 2.0]])
        assert out["top_k_indices"].tolist() == [[2, 1]]
        assert out["top_k_labels"].tolist() == [["two", "one"]]
        np.testing.assert_allclose(out["top_k_scores"], [[2.0, 1.0]])
        assert [s.name for s in rt.get("two").outputs][-3:] == ["top_k_indices", "top_k_scores", "top_k_labels"]
