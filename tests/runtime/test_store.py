"""The model store, version policies and hot swap with real models."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.config import BatchingOverrides, Config, ModelConfig, VersionPolicy
from edgekit_runtime.errors import BundleError, InvalidInputError, NotFoundError, UnavailableError
from edgekit_runtime.store import install_bundle, read_installed, scan_source

X = np.random.default_rng(7).normal(size=(3, 4)).astype(np.float32)


def wait_for(cond, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_install_and_read_back(bundles: dict[str, Path], store: Path) -> None:
    target = install_bundle(bundles["mlp"], store)
    assert target == store / "mlp" / "1"
    assert {p.name for p in target.iterdir()} >= {"manifest.json", "model.tflite", "golden"}
    b = read_installed(target)
    assert b.manifest.name == "mlp"
    assert set(b.golden_inputs) == {"x"}
    with pytest.raises(BundleError, match="already exists"):
        install_bundle(bundles["mlp"], store)
    assert [p.name for p in (store / "mlp").iterdir()] == ["1"]  # no temp dirs left behind


def test_tampered_install_is_refused(bundles: dict[str, Path], store: Path) -> None:
    target = install_bundle(bundles["mlp"], store)
    (target / "model.tflite").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="hash"):
        read_installed(target)


def test_scan_finds_store_model_dir_version_dir_and_bundle(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["mlp"], store)
    install_bundle(bundles["mlp_v2"], store)
    install_bundle(bundles["two"], store)
    (store / "mlp" / ".7.partial").mkdir()  # an install in progress is invisible
    found, problems = scan_source(store)
    assert not problems
    assert sorted((c.name, c.version) for c in found) == [("mlp", 1), ("mlp", 2), ("two", 1)]
    assert [(c.name, c.version) for c in scan_source(store / "mlp")[0]] != []
    assert [(c.name, c.version) for c in scan_source(store / "mlp" / "2")[0]] == [("mlp", 2)]
    assert [(c.name, c.version) for c in scan_source(bundles["two"])[0]] == [("two", 1)]


def test_latest_version_serves_by_default_and_policies_choose(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["mlp"], store)
    install_bundle(bundles["mlp_v2"], store)
    with Runtime([store]) as rt:
        rt.refresh()
        assert rt.get("mlp").version == 2
        with pytest.raises(NotFoundError, match="version 1"):
            rt.get("mlp", 1)
    cfg = Config(models={"mlp": ModelConfig(version_policy=VersionPolicy(latest=2))})
    with Runtime([store], config=cfg) as rt:
        rt.refresh()
        assert rt.get("mlp").version == 2
        a = rt.predict("mlp", {"x": X}, version=1)["output_0"]
        b = rt.predict("mlp", {"x": X}, version=2)["output_0"]
        assert not np.allclose(a, b)
    cfg = Config(models={"mlp": ModelConfig(version_policy=VersionPolicy(specific=[1]))})
    with Runtime([store], config=cfg) as rt:
        rt.refresh()
        assert rt.get("mlp").version == 1
        assert [s.version for s in rt.status("mlp") if s.state == "AVAILABLE"] == [1]


def test_hot_swap_new_version_is_picked_up_and_bad_one_never_serves(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["mlp"], store)
    with Runtime([store]) as rt:
        rt.start(poll_seconds=0.1)
        v1 = rt.predict("mlp", {"x": X})["output_0"]
        install_bundle(bundles["mlp_v2"], store)
        wait_for(lambda: rt.get("mlp").version == 2, "version 2 to serve")
        v2 = rt.predict("mlp", {"x": X})["output_0"]
        assert not np.allclose(v1, v2)
        wait_for(lambda: rt.status("mlp", 1)[0].state == "END", "version 1 to unload")

        install_bundle(bundles["mlp_bad"], store)  # version 3, golden samples do not match
        wait_for(lambda: rt.status("mlp")[0].version == 3 and rt.status("mlp")[0].state == "END", "version 3 to fail")
        st = rt.status("mlp", 3)[0]
        assert st.error_code == "FAILED_PRECONDITION"
        assert "golden" in st.error_message
        assert rt.get("mlp").version == 2
        np.testing.assert_allclose(rt.predict("mlp", {"x": X})["output_0"], v2)
        with pytest.raises(NotFoundError, match="golden"):
            rt.get("mlp", 3)


def test_in_flight_requests_finish_on_the_old_version(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["mlp"], store)
    with Runtime([store]) as rt:
        rt.refresh()
        old = rt.get("mlp")
        futures = [old.infer_future({"x": X})[0] for _ in range(60)]
        install_bundle(bundles["mlp_v2"], store)
        rt.refresh()  # loads v2, switches, then closes v1 after draining its queue
        assert rt.get("mlp").version == 2
        for f in futures:
            assert f.done()
            assert f.result()["output_0"].shape == (3, 3)


def test_a_model_that_fails_to_load_leaves_others_serving(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["two"], store)
    broken = install_bundle(bundles["mlp"], store)
    (broken / "model.tflite").write_bytes(b"garbage")
    with Runtime([store]) as rt:
        rt.refresh()
        assert rt.predict("two", {"a": X[:, :3], "b": X[:, :3]})["sum"].shape == (3, 3)
        with pytest.raises(UnavailableError, match="hash"):
            rt.get("mlp")
        assert not rt.is_ready()
        # fixed by reinstalling: reload picks it up
        shutil.rmtree(broken)
        install_bundle(bundles["mlp"], store)
        rt.reload("mlp")
        assert rt.get("mlp").version == 1
        assert rt.is_ready()


def test_concurrent_predictions_during_swaps_never_fail(bundles: dict[str, Path], store: Path) -> None:
    install_bundle(bundles["mlp"], store)
    errors: list[BaseException] = []
    stop = threading.Event()
    with Runtime([store]) as rt:
        rt.refresh()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    rt.predict("mlp", {"x": X})
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        install_bundle(bundles["mlp_v2"], store)
        rt.refresh()
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []


def test_a_source_whose_only_bundle_is_corrupt_keeps_the_runtime_unready(
    bundles: dict[str, Path], store: Path, tmp_path: Path
) -> None:
    install_bundle(bundles["two"], store)
    corrupt = tmp_path / "corrupt.ekb"
    corrupt.write_bytes(b"not a zip")
    with Runtime([store, corrupt]) as rt:
        rt.refresh()
        assert rt.get("two").version == 1  # the good source serves
        reasons = rt.readiness()
        assert len(reasons) == 1, reasons
        assert reasons[0].startswith(f"{corrupt} offers no model ({corrupt}: not a bundle")
        assert reasons[0].count(str(corrupt)) == 2  # the source, then its problem; not the path twice more
        assert not rt.is_ready()
        assert rt.startup_failure() is None  # something serves: keep serving, unready
    with Runtime([store]) as rt:
        rt.refresh()
        assert rt.readiness() == []
        assert rt.is_ready()


def test_nothing_servable_is_a_startup_failure_but_an_empty_store_is_waiting(
    bundles: dict[str, Path], store: Path, tmp_path: Path
) -> None:
    with Runtime([store]) as rt:
        assert rt.readiness() == ["the models are still loading"]
        rt.refresh()
        assert rt.readiness() == [f"{store} offers no model"]
        assert rt.startup_failure() is None  # an empty store waits to be filled
    broken = install_bundle(bundles["mlp"], store)
    (broken / "model.tflite").write_bytes(b"garbage")
    with Runtime([store]) as rt:
        rt.refresh()
        err = rt.startup_failure()
        assert isinstance(err, BundleError)
        assert err.message.startswith("nothing to serve: mlp v1 failed to load: ")
        assert "hash does not match" in err.message


def test_effective_settings_are_checked_before_anything_loads(bundles: dict[str, Path]) -> None:
    flags = BatchingOverrides(allowed_batch_sizes=[1, 2, 4])  # the bundle's max_batch_size is 8
    rt = Runtime([bundles["two"]], batching=flags)
    with pytest.raises(InvalidInputError, match=r"model 'two' v1 .*end with max_batch_size \(8\)"):
        rt.check_settings()
    fixed = BatchingOverrides(allowed_batch_sizes=[1, 2, 4], max_batch_size=4)
    Runtime([bundles["two"]], batching=fixed).check_settings()
