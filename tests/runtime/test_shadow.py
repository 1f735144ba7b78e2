"""The shadow check before a switch, end to end through a real Mosquitto with real ONNX classifiers: a
new version that agrees with the serving one is switched to, one whose top class differs is refused
under --min-agreement and leaves the store, and with no live traffic the golden samples decide.
Also the runtime's part: a pinned default while the new version is loaded beside it, requests in
flight finishing on the version they were given, and the mirror's share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.agent import Agent
from edgekit_runtime.agent.shadow import Comparison, Shadow
from edgekit_runtime.backends import load_backend
from edgekit_runtime.dataplane import DataPlane
from edgekit_runtime.store import install_bundle
from tests.mqtt import WAIT, Mosquitto
from tests.runtime import models
from tests.runtime.test_update import ScriptedHub, T, running_device, signed, wide_model

X = np.random.default_rng(11).normal(size=(3, 4)).astype(np.float32)
W = np.random.default_rng(12).normal(size=(4, 3)).astype(np.float32)


def classifier(w: np.ndarray) -> bytes:
    """x: float32[-1, 4] -> output_0 = softmax(x w), [-1, 3]: class probabilities."""
    return models.onnx_softmax(w, out="output_0")


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unsigned bundles of "clf": v1; v2 "agrees" (2 W: other probabilities, the same top class); v2
    "disagrees" (-W: the top class is v1's bottom one); and "wide" v1, v2 (not classifiers)."""
    d = tmp_path_factory.mktemp("clf")
    golden = {"x": np.random.default_rng(13).normal(size=(4, 4)).astype(np.float32)}
    out = {}
    for key, version, model in (
        ("v1", 1, classifier(W)),
        ("agrees", 2, classifier(2 * W)),
        ("disagrees", 2, classifier(-W)),
        ("wide1", 1, wide_model(1, hidden=64)),
        ("wide2", 2, wide_model(2, hidden=64)),
    ):
        name = "wide" if key.startswith("wide") else "clf"
        out[key] = models.make_bundle(
            d / f"{key}.ekb", name=name, version=version, fmt="onnx", model=model, golden_in=golden
        )
    return out


@pytest.fixture
def device(
    clf: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path, keys: tuple[Path, Path]
) -> Iterator[tuple[Runtime, Agent, ScriptedHub]]:
    with running_device(signed(clf["v1"], tmp_path / "v1.ekb", keys[0]), store, mosquitto, keys) as d:
        yield d


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    from edgekit_runtime.signing import generate_keys

    return generate_keys(tmp_path / "keys")


def live(plane: DataPlane, model: str, n: int) -> list[int]:
    """``n`` requests the way the HTTP routes make them; the version that answered each."""

    async def one() -> int:
        lm = plane.model(model)
        with plane.counted(lm):
            await plane.infer(lm, {"x": X})
        return lm.version

    return [asyncio.run(one()) for _ in range(n)]


def in_shadow(hub: ScriptedHub, model: str) -> None:
    hub.obs.wait_json(
        T.reported,
        lambda r: r["models"].get(model, {}).get("state") == "testing" and r["models"][model].get("shadow") is not None,
        f"{model} in its shadow check",
    )


def test_a_new_version_that_agrees_is_switched_to_after_its_shadow_check(
    device: tuple[Runtime, Agent, ScriptedHub], clf: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    rt, agent, hub = device
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("clf", {}).get("active") == 1, "v1 serving")
    hub.deploy("clf", 2, signed(clf["agrees"], tmp_path / "v2.ekb", keys[0]), shadow_s=4, min_agreement=0.9)
    in_shadow(hub, "clf")
    testing = hub.model("clf")
    assert testing["reason"].startswith("shadow check of v2 beside v1: "), testing
    assert rt.labels("clf") == {"stable": 1, "canary": 2}  # loaded beside it; clients still get v1
    assert set(live(DataPlane(rt), "clf", 40)) == {1}
    done = hub.wait_done("clf", 2)
    assert done["state"] == "serving" and done["active"] == 2, done
    shadow = done["shadow"]
    assert shadow["metric"] == "top1" and shadow["source"] == "live", shadow
    assert shadow["value"] == 1.0
    assert 1 <= shadow["requests"] <= 10  # every 4th of the 40 (fewer if the window closed first)
    assert rt.get("clf").version == 2
    assert rt.labels("clf") == {"stable": 2}
    assert agent.updater is not None and agent.updater.jobs["clf"].state == "succeeded"


def test_a_new_version_that_disagrees_is_refused_under_min_agreement(
    device: tuple[Runtime, Agent, ScriptedHub], clf: dict[str, Path], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    rt, agent, hub = device
    store = agent.state.folder.parent
    hub.obs.wait_json(T.reported, lambda r: r["models"].get("clf", {}).get("active") == 1, "v1 serving")
    hub.deploy("clf", 2, signed(clf["disagrees"], tmp_path / "v2.ekb", keys[0]), shadow_s=4, min_agreement=0.9)
    in_shadow(hub, "clf")
    assert set(live(DataPlane(rt), "clf", 40)) == {1}
    failed = hub.wait_state("clf", "failed")
    assert failed["reason"].startswith("shadow check: top-1 agreement 0.0% over "), failed
    assert failed["reason"].endswith(" live requests against v1, below the minimum 90.0%"), failed
    assert failed["shadow"]["metric"] == "top1" and failed["shadow"]["source"] == "live"
    assert failed["shadow"]["value"] == 0.0
    assert failed["active"] == 1
    assert rt.get("clf").version == 1
    assert rt.labels("clf") == {"stable": 1}
    assert sorted(d.name for d in (store / "clf").iterdir()) == ["1"]  # the new version left the store
    assert set(live(DataPlane(rt), "clf", 2)) == {1}


@pytest.mark.parametrize(
    ("model", "new", "state", "metric"),
    [
        ("clf", "agrees", "serving", "top1"),
        ("clf", "disagrees", "failed", "top1"),
        ("wide", "wide2", "serving", "max_abs_diff"),
    ],
)
def test_without_live_traffic_the_golden_samples_decide(
    clf: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path, keys: tuple[Path, Path],
    model: str, new: str, state: str, metric: str,
) -> None:  # fmt: skip
    first = signed(clf["v1" if model == "clf" else "wide1"], tmp_path / "v1.ekb", keys[0])
    with running_device(first, store, mosquitto, keys) as (rt, _, hub):
        hub.obs.wait_json(T.reported, lambda r: r["models"].get(model, {}).get("active") == 1, "v1 serving")
        hub.deploy(model, 2, signed(clf[new], tmp_path / "v2.ekb", keys[0]), shadow_s=1, min_agreement=0.5)
        done = hub.wait_done(model, 2)
        assert done["state"] == state, done
        assert done["shadow"]["source"] == "golden" and done["shadow"]["requests"] == 0, done
        assert done["shadow"]["metric"] == metric
        if state == "failed":
            assert done["reason"] == (
                "shadow check: top-1 agreement 0.0% on the 4 golden samples (no live request reached v1 in the "
                "window) against v1, below the minimum 50.0%"
            )
            assert rt.get(model).version == 1
        else:
            assert rt.get(model).version == 2


def test_a_pinned_default_stays_while_a_newer_version_loads_and_in_flight_requests_finish_on_it(
    clf: dict[str, Path], store: Path
) -> None:
    install_bundle(clf["v1"], store)
    with Runtime([store]) as rt:
        rt.refresh()
        rt.pin("clf", 1)
        install_bundle(clf["agrees"], store)
        rt.refresh()
        assert [s.version for s in rt.status("clf") if s.state == "AVAILABLE"] == [2, 1]  # policy: latest 1
        assert rt.get("clf").version == 1
        assert rt.get("clf", 2).version == 2
        v1 = rt.get("clf")
        fut, _ = v1.infer_future({"x": X})  # in flight on v1 while the pin is lifted and v1 unloads
        rt.pin("clf", None)
        rt.refresh()
        assert rt.get("clf").version == 2
        assert [s.version for s in rt.status("clf") if s.state == "AVAILABLE"] == [2]
        want = load_backend("onnx", classifier(W)).run({"x": X})["output_0"]
        np.testing.assert_allclose(fut.result(30)["output_0"], want, rtol=1e-5)


def test_the_mirror_takes_every_fourth_request_of_the_serving_version(clf: dict[str, Path], store: Path) -> None:
    install_bundle(clf["v1"], store)
    install_bundle(clf["disagrees"], store)
    with Runtime([store]) as rt:
        rt.pin("clf", 1)
        rt.refresh()
        shadow = Shadow(rt, "clf", serving=1, candidate=2)
        rt.set_tap("clf", shadow.offer)
        try:
            for _ in range(8):
                rt.predict("clf", {"x": X})
            rt.predict("clf", {"x": X}, version=1)  # addressed to a version: not mirrored
            end = time.monotonic() + WAIT  # a bound against hangs, not a timing assertion
            while shadow.result()["requests"] < 2:
                assert time.monotonic() < end, shadow.result()
                time.sleep(0.01)
        finally:
            rt.set_tap("clf", None)
            shadow.close()
        assert shadow.result() == {"metric": "top1", "value": 0.0, "requests": 2, "source": "live"}


def test_which_answers_count_as_class_scores() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    cmp = Comparison("output_0")
    cmp.add({"output_0": probs}, {"output_0": np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]], np.float32)})
    assert cmp.result("live")["metric"] == "top1"
    assert cmp.result("live")["value"] == 0.5  # row 0 keeps its top class, row 1's moves
    logits = np.array([[2.0, -1.0, 0.5]], np.float32)  # not probabilities: compared by difference
    cmp = Comparison("output_0")
    cmp.add({"output_0": logits}, {"output_0": logits + 0.25})
    assert cmp.result("live") == {"metric": "max_abs_diff", "value": 0.25, "requests": 1, "source": "live"}
    cmp = Comparison("output_0")  # a declared top-k: its indices are compared, whatever the scores
    idx = np.array([[2, 0], [1, 0]], np.int64)
    cmp.add({"output_0": logits, "top_k_indices": idx}, {"output_0": logits, "top_k_indices": idx[::-1].copy()})
    assert cmp.result("live")["metric"] == "top1" and cmp.result("live")["value"] == 0.0
