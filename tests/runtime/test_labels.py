"""Version labels as TF Serving's ``/v1/models/M/labels/L``: ``stable`` is the serving version,
``canary`` one in a shadow check or health window; each label route answers what its
``/versions/N`` route answers. In-process for the routes, and over a real socket with a real
agent, broker and shadow check for the canary coming and going."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from edgekit_runtime import Runtime
from edgekit_runtime.backends import load_backend
from edgekit_runtime.server import create_app
from edgekit_runtime.store import install_bundle
from tests.mqtt import Mosquitto
from tests.runtime.conftest import Client
from tests.runtime.test_shadow import W, X, classifier, in_shadow
from tests.runtime.test_socket import running_server
from tests.runtime.test_update import ScriptedHub, T, signed


@pytest.fixture(scope="module")
def clf2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unsigned "clf" v1 (softmax(x W)) and v2 (softmax(-x W))."""
    from tests.runtime import models

    d = tmp_path_factory.mktemp("labels")
    golden = {"x": X}
    return {
        f"v{v}": models.make_bundle(
            d / f"v{v}.ekb", name="clf", version=v, fmt="onnx", model=classifier(w), golden_in=golden
        )
        for v, w in ((1, W), (2, -W))
    }


def expected(w: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in load_backend("onnx", classifier(w)).run({"x": X})["output_0"]]


@pytest.fixture
def client(clf2: dict[str, Path], store: Path) -> Iterator[tuple[Runtime, Client]]:
    """v1 serving (pinned, as during a shadow check), v2 loaded beside it and named canary."""
    install_bundle(clf2["v1"], store)
    install_bundle(clf2["v2"], store)
    rt = Runtime([store])
    rt.pin("clf", 1)
    rt.start(poll_seconds=0)
    rt.set_canary("clf", 2)
    c = Client(create_app(rt))
    yield rt, c
    c.close()
    rt.close()


def test_each_label_answers_what_its_version_answers(client: tuple[Runtime, Client]) -> None:
    _, c = client
    for label, version in (("stable", "1"), ("canary", "2")):
        status = c.get(f"/v1/models/clf/labels/{label}")
        assert status.status_code == 200, status.text
        assert status.json() == c.get(f"/v1/models/clf/versions/{version}").json()
        assert [s["version"] for s in status.json()["model_version_status"]] == [version]
        meta = c.get(f"/v1/models/clf/labels/{label}/metadata")
        assert meta.json()["model_spec"]["version"] == version
        r = c.post(f"/v1/models/clf/labels/{label}:predict", json={"instances": X.tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], expected(W if version == "1" else -W), rtol=1e-5)
        r = c.post(f"/v1/models/clf/labels/{label}:classify", json={"examples": []})
        assert r.status_code == 501, r.text  # as /versions/N:classify
        assert r.json()["error"] == ":classify is not implemented; use :predict"
    r = c.post("/v1/models/clf:predict", json={"instances": X.tolist()})  # clients still get v1
    np.testing.assert_allclose(r.json()["predictions"], expected(W), rtol=1e-5)


def test_a_label_no_version_holds_and_an_unknown_label_are_404_naming_the_labels(
    client: tuple[Runtime, Client],
) -> None:
    rt, c = client
    rt.set_canary("clf", None)
    r = c.get("/v1/models/clf/labels/canary")
    assert r.status_code == 404
    assert r.json()["error"] == (
        "no version of model 'clf' holds the label 'canary' now (a version in a shadow check or a health "
        "window); labels held now: stable (v1)"
    )
    r = c.post("/v1/models/clf/labels/beta:predict", json={"instances": X.tolist()})
    assert r.status_code == 404
    assert r.json()["error"] == (
        "label 'beta' does not exist; the labels are 'stable': the serving (default) version; 'canary': a "
        "version in a shadow check or a health window; held now: stable (v1)"
    )
    r = c.get("/v1/models/nope/labels/stable")
    assert r.status_code == 404
    assert "model 'nope' is not served here" in r.json()["error"]
    doc = c.get("/openapi.json").json()
    label = next(
        p for p in doc["paths"]["/v1/models/{model}/labels/{label}"]["get"]["parameters"] if p["name"] == "label"
    )
    assert label["schema"]["enum"] == ["stable"]  # the labels held now: path values that answer (no canary here)


def test_the_canary_label_follows_a_shadow_check_over_a_real_socket(
    clf2: dict[str, Path], store: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from edgekit_runtime.signing import generate_keys

    key, pub = generate_keys(tmp_path / "keys")
    install_bundle(signed(clf2["v1"], tmp_path / "v1.ekb", key), store)
    hub = ScriptedHub(mosquitto)
    args = [str(store), "--poll-seconds", "0", "--log-level", "warning", "--broker", mosquitto.url,
            "--device-id", "dev-1", "--trust-key", str(pub)]  # fmt: skip
    try:
        with running_server(*args) as port:
            url = f"http://127.0.0.1:{port}/v1/models/clf"
            hub.obs.wait_json(T.reported, lambda r: r["models"].get("clf", {}).get("active") == 1, "v1 serving")
            assert requests.get(f"{url}/labels/canary", timeout=30).status_code == 404
            hub.deploy("clf", 2, signed(clf2["v2"], tmp_path / "v2.ekb", key), shadow_s=3600)
            in_shadow(hub, "clf")
            for label, version, w in (("stable", 1, W), ("canary", 2, -W)):
                r = requests.post(f"{url}/labels/{label}:predict", json={"instances": X.tolist()}, timeout=30)
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(r.json()["predictions"], expected(w), rtol=1e-5)
                meta = requests.get(f"{url}/labels/{label}/metadata", timeout=30).json()
                assert meta["model_spec"]["version"] == str(version)
            hub.desire("clf", 1, rollout="abort")  # the hub aborts: the version in its shadow check leaves
            hub.obs.wait_for(lambda: not (store / "clf" / "2").exists(), "v2 out of the store")
            hub.obs.wait_json(T.reported, lambda r: r["models"]["clf"]["versions"] == [1], "v2 unloaded")
            r = requests.get(f"{url}/labels/canary", timeout=30)
            assert r.status_code == 404
            assert "holds the label 'canary' now" in r.json()["error"]
            stable = requests.get(f"{url}/labels/stable", timeout=30).json()
            assert [s["version"] for s in stable["model_version_status"] if s["state"] == "AVAILABLE"] == ["1"]
    finally:
        hub.obs.close()
