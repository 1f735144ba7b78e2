"""The transport-free serving logic: a request caught by a swap, readiness and the repository index."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime, __version__
from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.errors import NotFoundError, UnavailableError
from edgekit_runtime.store import install_bundle
from tests.runtime.conftest import GOLDEN_X, Models, reference


def test_a_request_caught_by_a_swap_is_answered_by_the_new_version(
    bundles: dict[str, Path], store: Path, model_files: Models
) -> None:
    install_bundle(bundles["mlp"], store)
    rt = Runtime([store])
    rt.start(poll_seconds=0)
    try:
        dp = DataPlane(rt)
        old = dp.model("mlp")
        assert old.version == 1
        install_bundle(bundles["mlp_v2"], store)
        rt.refresh()  # version 2 serves; version 1's batcher is closed
        assert dp.model("mlp").version == 2
        feeds = {"x": GOLDEN_X}
        out = asyncio.run(dp.infer(old, feeds))  # looked up before the swap, enqueued after it
        v2 = asyncio.run(dp.infer(dp.model("mlp"), feeds))
        np.testing.assert_array_equal(out["output_0"], v2["output_0"])
        assert not np.allclose(out["output_0"], reference(model_files, GOLDEN_X), atol=1e-3)  # not version 1's
        with pytest.raises((NotFoundError, UnavailableError), match="1"):  # pinned: only version 1 will do
            asyncio.run(dp.infer(old, feeds, pinned=True))
    finally:
        rt.close()


def test_readiness_index_and_server_metadata(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["mlp"], store)
    install_bundle(bundles["mlp_bad"], store)  # version 3: fails its golden samples, never serves
    rt = Runtime([store])
    rt.start(poll_seconds=0)
    try:
        dp = DataPlane(rt)
        assert dp.live() is True
        assert dp.model_ready("mlp") == (True, "")
        ready, why = dp.model_ready("mlp", "3")
        assert ready is False
        assert "golden" in why
        assert dp.model_ready("mlp", "9")[0] is False
        with pytest.raises(NotFoundError):
            dp.model_ready("nope")
        assert dp.versions("mlp") == [1]
        index = {(i["name"], i["version"]): i for i in dp.repository_index()}
        assert index[("mlp", "1")] == {"name": "mlp", "version": "1", "state": "READY"}
        bad = index[("mlp", "3")]
        assert (bad["state"], set(bad)) == ("UNAVAILABLE", {"name", "version", "state", "reason"})
        assert "golden" in bad["reason"]
        assert dp.server_metadata() == {
            "name": "edgekit-runtime",
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_repository"],
        }
    finally:
        rt.close()


def test_a_version_of_up_to_18_digits_is_looked_up_and_a_longer_one_refused(bundles: dict[str, Path]) -> None:
    rt = Runtime([bundles["mlp"]])
    rt.start(poll_seconds=0)
    try:
        dp = DataPlane(rt)
        assert dp.model("mlp", "1").version == 1
        with pytest.raises(NotFoundError) as e:
            dp.model("mlp", "9" * 18)  # an integer, just not a version served here
        assert "versions are positive integers" not in e.value.message
        assert "9" * 18 in e.value.message
        with pytest.raises(NotFoundError) as e:
            dp.model("mlp", "1" + "0" * 18)
        assert e.value.message == "version '1000000000000000000' does not exist: versions are positive integers"
    finally:
        rt.close()


def test_a_model_without_a_ready_version_is_not_ready_and_says_why(bundles: dict[str, Path]) -> None:
    rt = Runtime([bundles["mlp_bad"]])  # its only version fails its golden samples
    rt.start(poll_seconds=0)
    try:
        ready, why = DataPlane(rt).model_ready("mlp")
        assert ready is False
        assert why.startswith("model 'mlp' has no version ready: version 3 failed: ")
    finally:
        rt.close()
