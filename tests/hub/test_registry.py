"""The registry's push rules and deletes, in-process over a real SQLite file (and the real
PostgreSQL): every refusal leaves nothing behind, on disk or in the database."""

from __future__ import annotations

import dataclasses
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from edgekit.hub.errors import ConflictError
from edgekit.hub.registry import PushResult, Registry
from edgekit_runtime.bundle import BundleError, read_bundle
from edgekit_runtime.errors import NotFoundError, SignatureError
from tests.hub.conftest import BundleFactory, Keys


def push(registry: Registry, path: Path) -> PushResult:
    """As the API does: the upload is a copy in the artifacts' incoming folder, the registry's to keep."""
    fd, upload = registry.artifacts.new_upload()
    os.close(fd)
    shutil.copyfile(path, upload)
    return registry.push(upload, where=path.name)


def leftovers(registry: Registry) -> tuple[list[str], list[str]]:
    """(bundle rows as NAME:VERSION:PROFILE, files under artifacts/ including unfinished uploads)."""
    with registry.store.begin() as tx:
        rows = [f"{b.name}:{b.version}:{b.profile}" for b in tx.bundles()]
    root = registry.artifacts.root
    return rows, sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_push_stores_the_bundle_under_its_sha256(registry: Registry, bundle: BundleFactory, keys: Keys) -> None:
    path = bundle()
    result = push(registry, path)
    assert result.created
    b = result.bundle
    assert (b.name, b.version, b.profile, b.format, b.signer) == ("digits", 1, "raspberrypi", "onnx", keys.public.id)
    assert b.size_bytes == path.stat().st_size
    stored = registry.artifacts.path(b.sha256)
    assert stored.read_bytes() == path.read_bytes()
    assert leftovers(registry) == (["digits:1:raspberrypi"], [stored.name])


def test_same_bytes_again_is_idempotent(registry: Registry, bundle: BundleFactory) -> None:
    path = bundle()
    first = push(registry, path)
    again = push(registry, path)
    assert not again.created
    assert again.bundle == first.bundle
    assert leftovers(registry) == (["digits:1:raspberrypi"], [f"{first.bundle.sha256}.ekb"])


def test_one_version_many_profiles(registry: Registry, bundle: BundleFactory) -> None:
    for profile in ("raspberrypi", "jetson", "x86-server"):
        push(registry, bundle(profile=profile, seed=len(profile)))
    push(registry, bundle(version=2))
    rows, files = leftovers(registry)
    assert rows == ["digits:1:jetson", "digits:1:raspberrypi", "digits:1:x86-server", "digits:2:raspberrypi"]
    assert len(files) == 4


def test_a_different_upload_of_the_same_name_version_profile_conflicts(
    registry: Registry, bundle: BundleFactory
) -> None:
    first = push(registry, bundle(seed=1))
    before = leftovers(registry)
    with pytest.raises(ConflictError, match=r"digits v1 for profile raspberrypi is already on the hub with other"):
        push(registry, bundle(seed=2))
    assert leftovers(registry) == before
    assert registry.artifacts.path(first.bundle.sha256).exists()


def test_refusals_leave_nothing_behind(
    registry: Registry, bundle: BundleFactory, other_keys: Keys, tmp_path: Path
) -> None:
    unsigned = bundle(signed=False)
    untrusted = bundle(key=other_keys.private)
    # Changed after signing: the manifest says v2 now, the signature covers v1's manifest.
    signed = bundle()
    b = read_bundle(signed)
    retagged = tmp_path / "retagged.ekb"
    dataclasses.replace(b, manifest=b.manifest.model_copy(update={"version": 2}), manifest_bytes=b"").write(retagged)
    # A model byte changed: the manifest's hash no longer matches (read_bundle refuses first).
    flipped = tmp_path / "flipped.ekb"
    with zipfile.ZipFile(signed) as src, zipfile.ZipFile(flipped, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:-1] + bytes([data[-1] ^ 1]) if info.filename == "model.onnx" else data)
    not_a_zip = tmp_path / "junk.ekb"
    not_a_zip.write_bytes(b"not a bundle at all")
    cases: list[tuple[Path, type[Exception], str]] = [
        (unsigned, SignatureError, f"{unsigned.name}: the bundle is not signed; sign it with `edgekit sign"),
        (untrusted, SignatureError, f"signed by key {other_keys.public.id}, not trusted here"),
        (retagged, SignatureError, "retagged.ekb: manifest.json differ from what key"),
        (flipped, BundleError, "flipped.ekb: model file hash does not match the manifest"),
        (not_a_zip, BundleError, "junk.ekb: not a bundle"),
    ]
    for path, error, message in cases:
        with pytest.raises(error) as caught:
            push(registry, path)
        assert type(caught.value) is error
        assert caught.value.message.startswith(message) or message in caught.value.message, caught.value.message
        assert str(registry.artifacts.incoming_dir) not in caught.value.message  # the hub's temporary path
        assert leftovers(registry) == ([], []), path


def test_a_hub_without_trusted_keys_refuses_every_push(registry: Registry, bundle: BundleFactory) -> None:
    registry.trusted = ()
    with pytest.raises(SignatureError, match=r"trusts no signing key.*edgekit hub serve --trust-key PUB"):
        push(registry, bundle())
    assert leftovers(registry) == ([], [])


def test_delete_removes_every_profile_and_the_files(registry: Registry, bundle: BundleFactory) -> None:
    push(registry, bundle(profile="raspberrypi"))
    push(registry, bundle(profile="jetson", seed=3))
    kept = push(registry, bundle(version=2))
    gone = registry.delete("digits", 1)
    assert sorted(b.profile for b in gone) == ["jetson", "raspberrypi"]
    assert leftovers(registry) == (["digits:2:raspberrypi"], [f"{kept.bundle.sha256}.ekb"])
    with pytest.raises(NotFoundError, match=r"^no digits v1 on the hub; it has v2$"):
        registry.delete("digits", 1)
    with pytest.raises(NotFoundError, match="no nope v1 on the hub"):
        registry.delete("nope", 1)


def test_delete_is_refused_while_a_device_runs_the_version(registry: Registry, bundle: BundleFactory) -> None:
    push(registry, bundle())
    with registry.store.begin() as tx:
        tx.register_device("pi-1", profile="raspberrypi", labels={}, online=True, now=1.0)
        tx.report_model("pi-1", "digits", active=1, state="serving", now=1.0)
        tx.register_device("pi-2", profile="raspberrypi", labels={}, online=False, now=1.0)
        tx.report_model("pi-2", "digits", active=2, state="serving", now=1.0)  # another version: no bar
    before = leftovers(registry)
    with pytest.raises(ConflictError, match=r"^digits v1 runs on 1 device\(s\) \(pi-1\); deploy another version"):
        registry.delete("digits", 1)
    assert leftovers(registry) == before
    with registry.store.begin() as tx:
        tx.report_model("pi-1", "digits", active=2, state="serving", now=2.0)
    registry.delete("digits", 1)
    assert leftovers(registry) == ([], [])


def test_delete_is_refused_while_a_rollout_targets_the_version(registry: Registry, bundle: BundleFactory) -> None:
    push(registry, bundle())
    with registry.store.begin() as tx:
        tx.add_rollout("r-1", "digits", 1, "paused", {})
        tx.add_rollout("r-0", "digits", 1, "completed", {})  # finished rollouts do not hold it
    with pytest.raises(ConflictError, match=r"target of rollout r-1; wait until it ends or cancel it"):
        registry.delete("digits", 1)
    assert leftovers(registry)[0] == ["digits:1:raspberrypi"]


def test_sweep_removes_what_a_crash_left(registry: Registry, bundle: BundleFactory) -> None:
    kept = push(registry, bundle())
    fd, _unfinished = registry.artifacts.new_upload()
    os.write(fd, b"half an upload")
    os.close(fd)
    orphan = registry.artifacts.path("ab" * 32)  # renamed into place, but its row never committed
    orphan.write_bytes(b"x")
    assert sorted(registry.sweep()) == sorted([_unfinished.name, orphan.name])
    assert leftovers(registry) == (["digits:1:raspberrypi"], [f"{kept.bundle.sha256}.ekb"])


def test_bundles_of_an_unknown_model_is_not_found(registry: Registry) -> None:
    assert registry.bundles() == []
    with pytest.raises(NotFoundError, match=r"no model 'digits' on the hub"):
        registry.bundles("digits")


def test_concurrent_different_pushes_of_one_name_version_profile(registry: Registry, bundle: BundleFactory) -> None:
    """Whatever the interleaving (PostgreSQL lets both check before either inserts; the loser's
    insert fails on the unique key and looks again), one wins and the rest are conflicts."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [bundle(seed=s) for s in range(4)]

    def attempt(path: Path) -> str:
        try:
            return "created" if push(registry, path).created else "same"
        except ConflictError:
            return "conflict"

    with ThreadPoolExecutor(4) as pool:
        outcomes = sorted(pool.map(attempt, paths))
    assert outcomes == ["conflict", "conflict", "conflict", "created"]
    rows, files = leftovers(registry)
    assert rows == ["digits:1:raspberrypi"]
    assert len(files) == 1
