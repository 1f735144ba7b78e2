"""The bundle's bytes: the manifest's JSON form, how a bundle file is written, what reading a folder says."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from edgekit_runtime.bundle import GOLDEN_INPUTS, MANIFEST, read_bundle, read_bundle_dir
from edgekit_runtime.errors import BundleError
from edgekit_runtime.store import install_bundle


def test_the_manifest_is_written_as_sorted_indented_json(bundles: dict[str, Path]) -> None:
    manifest = read_bundle(bundles["mlp"]).manifest
    data = manifest.to_json()
    doc = json.loads(data)
    assert data == json.dumps(doc, indent=2, sort_keys=True).encode()  # stable bytes: what a signature covers
    assert list(doc) == sorted(doc)
    assert data.startswith(b'{\n  "calibration": {}')
    assert doc["golden"]["count"] == 5
    assert doc["profile"]["runtime"]["batching"]["max_batch_size"] == 8
    assert type(manifest).model_validate_json(data) == manifest


def test_a_bundle_is_written_compressed_into_new_folders_and_nothing_else(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    b = read_bundle(bundles["mlp"])
    target = tmp_path / "a" / "b" / "mlp.ekb"
    assert b.write(target) == target
    with zipfile.ZipFile(target) as z:
        infos = {i.filename: i for i in z.infolist()}
        assert z.read(MANIFEST) == b.manifest_bytes
    assert set(infos) == {MANIFEST, "model.tflite", GOLDEN_INPUTS, "golden/outputs.npz"}
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos.values())
    assert [p.name for p in target.parent.iterdir()] == ["mlp.ekb"]  # no temporary file left beside it
    assert read_bundle(target).model == b.model


def test_a_failed_write_leaves_nothing_and_says_where(bundles: dict[str, Path], tmp_path: Path) -> None:
    b = read_bundle(bundles["mlp"])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(BundleError) as e:
        b.write(blocker / "mlp.ekb")
    assert e.value.message.startswith(f"cannot write to {blocker}: ")
    assert e.value.message.endswith("; choose an output folder you can write to")
    target = tmp_path / "out" / "mlp.ekb"
    target.mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        b.write(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["mlp.ekb"]  # the temporary file is gone


def test_an_installed_member_that_cannot_be_read_is_named(bundles: dict[str, Path], store: Path) -> None:
    version = install_bundle(bundles["mlp"], store)
    (version / "model.tflite").unlink()
    (version / "model.tflite").mkdir()  # present, but not a file that reads
    with pytest.raises(BundleError) as e:
        read_bundle_dir(version)
    assert e.value.message.startswith(f"{version}: model.tflite unreadable (")
    (version / "model.tflite").rmdir()
    with pytest.raises(BundleError) as e:
        read_bundle_dir(version)
    assert e.value.message == f"{version}: bundle has no model.tflite; reinstall the bundle"
    golden = version / "golden"
    for p in golden.iterdir():
        p.unlink()
    golden.rmdir()
    golden.write_text("a file where the folder was")
    with pytest.raises(BundleError) as e:
        read_bundle_dir(version)
    assert e.value.message.startswith(f"{version}: ")
