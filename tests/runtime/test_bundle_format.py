"""The bundle's bytes: the manifest's JSON form, how a bundle file is written, what reading a folder says."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime.bundle import (
    GOLDEN_INPUTS,
    MANIFEST,
    npz_bytes,
    read_bundle,
    read_bundle_dir,
    read_npz,
    sha256_bytes,
    sha256_file,
)
from edgekit_runtime.errors import BundleError, NotFoundError
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


#: the batching keys every schema-1 reader knows (before batch_timeout_policy came)
_OLD_BATCHING_KEYS = {
    "enabled",
    "max_batch_size",
    "batch_timeout_micros",
    "allowed_batch_sizes",
    "max_enqueued_batches",
    "num_batch_threads",
}


def test_the_default_delay_policy_is_left_out_so_older_runtimes_still_read_the_bundle(
    bundles: dict[str, Path],
) -> None:
    manifest = read_bundle(bundles["mlp"]).manifest
    assert manifest.profile.runtime.batching.batch_timeout_policy == "adaptive"
    written = json.loads(manifest.to_json())["profile"]["runtime"]["batching"]
    assert set(written) == _OLD_BATCHING_KEYS
    assert type(manifest).model_validate_json(manifest.to_json()) == manifest  # read back: adaptive again

    doc = manifest.model_dump()
    doc["profile"]["runtime"]["batching"]["batch_timeout_policy"] = "fixed"
    fixed = type(manifest).model_validate(doc)
    written = json.loads(fixed.to_json())["profile"]["runtime"]["batching"]
    assert written["batch_timeout_policy"] == "fixed"
    assert set(written) - _OLD_BATCHING_KEYS == {"batch_timeout_policy"}
    assert type(manifest).model_validate_json(fixed.to_json()).profile.runtime.batching.batch_timeout_policy == "fixed"


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


def test_an_installed_member_whose_folder_is_a_file_is_named(bundles: dict[str, Path], store: Path) -> None:
    version = install_bundle(bundles["mlp"], store)
    golden = version / "golden"
    for p in golden.iterdir():
        p.unlink()
    golden.rmdir()
    golden.write_text("a file where the folder was")
    with pytest.raises(BundleError) as e:
        read_bundle_dir(version)
    assert e.value.message == f"{version}: {GOLDEN_INPUTS} unreadable (Not a directory)"


def test_sha256_file_is_the_hash_of_the_whole_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: several read blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest() == sha256_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_golden_samples_round_trip_through_npz_bytes() -> None:
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "y": np.array([1, 2], dtype=np.int64)}
    back = read_npz(npz_bytes(arrays))
    assert sorted(back) == ["x", "y"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype


def test_reading_a_bundle_names_the_file_in_every_refusal(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.ekb"
    with pytest.raises(NotFoundError) as nf:
        read_bundle(missing)
    assert nf.value.message == f"{missing}: no such bundle file"

    def rewrite(name: str, change: dict[str, bytes | None]) -> Path:
        with zipfile.ZipFile(bundles["mlp"]) as z:
            members = {n: z.read(n) for n in z.namelist()}
        for k, v in change.items():
            if v is None:
                members.pop(k)
            else:
                members[k] = v
        dst = tmp_path / name
        with zipfile.ZipFile(dst, "w") as z:
            for k, v in members.items():
                z.writestr(k, v)
        return dst

    no_manifest = rewrite("no-manifest.ekb", {MANIFEST: None, "model.tflite": None})
    with pytest.raises(BundleError) as e:
        read_bundle(no_manifest, manifest_only=True)
    assert e.value.message == f"{no_manifest}: bundle has no {MANIFEST}; re-create or re-download it"

    bad = rewrite("bad-manifest.ekb", {MANIFEST: b'{"name": 5}'})
    for manifest_only in (False, True):
        with pytest.raises(BundleError) as e:
            read_bundle(bad, manifest_only=manifest_only)
        assert e.value.message.startswith(f"{bad}: invalid manifest.json at ")

    broken = rewrite("bad-golden.ekb", {GOLDEN_INPUTS: b"not an npz"})
    with pytest.raises(BundleError) as e:
        read_bundle(broken)
    assert e.value.message.startswith(f"{broken}: golden samples unreadable: ")

    monkeypatch.setenv("EDGEKIT_MAX_BUNDLE_BYTES", "1000")
    with pytest.raises(BundleError) as e:
        read_bundle(bundles["mlp"])
    assert e.value.message.startswith(f"{bundles['mlp']}: bundle unpacks to ")
    assert e.value.message.endswith(
        " bytes, more than the 1000-byte cap; set EDGEKIT_MAX_BUNDLE_BYTES if this model really is that big"
    )


def test_a_manifest_only_read_has_no_model_and_no_golden_samples(bundles: dict[str, Path]) -> None:
    b = read_bundle(bundles["mlp"], manifest_only=True)
    assert b.manifest.name == "mlp"
    assert (b.model, b.golden_inputs, b.golden_outputs) == (b"", {}, {})
    with zipfile.ZipFile(bundles["mlp"]) as z:
        assert b.manifest_bytes == z.read(MANIFEST)
