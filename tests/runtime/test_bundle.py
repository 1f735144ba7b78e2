"""Bundles from untrusted hands: member names that escape, members nobody named, links, zip bombs,
file modes. Each evil bundle is a real bundle rewritten member by member."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgekit_runtime.bundle import MANIFEST, read_bundle, read_bundle_dir
from edgekit_runtime.errors import BundleError
from edgekit_runtime.store import install_bundle


def rezip(
    src: Path,
    dst: Path,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
    rename: dict[str, str] | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Copy bundle ``src`` to ``dst``, editing the manifest, renaming members or adding some."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(members[MANIFEST])
    if edit is not None:
        edit(manifest)
    members[MANIFEST] = json.dumps(manifest).encode()
    for old, new in (rename or {}).items():
        members[new] = members.pop(old)
    members.update(extra or {})
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def set_model_file(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        m["model_file"] = name

    return edit


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*"))


#: ABSOLUTE stands for an absolute path outside the test's folder, fresh per test: a fixed name in
#: /tmp was left behind by a mutant of the check (mutation runs share /tmp) and failed later runs.
ESCAPES = ["../../../x.tflite", "ABSOLUTE", "a/../../x.tflite", "..", "a\\..\\x.tflite", ""]


@pytest.mark.parametrize("name", ESCAPES)
def test_a_model_file_that_escapes_is_refused_and_nothing_is_written(
    bundles: dict[str, Path], tmp_path: Path, name: str
) -> None:
    outside = tmp_path.parent / f"edgekit-evil-{tmp_path.name}.tflite"
    name = str(outside) if name == "ABSOLUTE" else name
    evil = rezip(
        bundles["mlp"], tmp_path / "evil.ekb", edit=set_model_file(name), rename={"model.tflite": name} if name else {}
    )
    store = tmp_path / "deep" / "er" / "store"
    store.mkdir(parents=True)
    before = files_under(tmp_path)
    with pytest.raises(BundleError, match="not a plain relative member name"):
        install_bundle(evil, store)
    assert files_under(tmp_path) == before
    assert not outside.exists()


@pytest.mark.parametrize("member_too", [False, True])
def test_golden_members_that_escape_are_refused(bundles: dict[str, Path], tmp_path: Path, member_too: bool) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["golden"]["inputs"] = "../inputs.npz"

    rename = {"golden/inputs.npz": "../inputs.npz"} if member_too else {}
    evil = rezip(bundles["mlp"], tmp_path / "evil.ekb", edit=edit, rename=rename)
    where = "unsafe bundle member" if member_too else r"manifest.json at 'golden\.inputs'"
    with pytest.raises(BundleError, match=where):
        read_bundle(evil)


def test_a_model_file_named_like_the_manifest_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    evil = rezip(bundles["mlp"], tmp_path / "evil.ekb", edit=set_model_file("manifest.sig"))
    with pytest.raises(BundleError, match="reserved"):
        read_bundle(evil)


def test_members_the_manifest_does_not_name_are_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    evil = rezip(bundles["mlp"], tmp_path / "evil.ekb", extra={"run-me.sh": b"#!/bin/sh\n"})
    with pytest.raises(BundleError, match=r"does not name: \['run-me.sh'\]"):
        read_bundle(evil)


def test_an_escaping_member_is_refused_even_when_unnamed(bundles: dict[str, Path], tmp_path: Path) -> None:
    evil = rezip(bundles["mlp"], tmp_path / "evil.ekb", extra={"../../etc/cron.d/x": b"* * * * * root true\n"})
    with pytest.raises(BundleError, match="unsafe bundle member"):
        read_bundle(evil)


def test_a_link_member_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    evil = rezip(bundles["mlp"], tmp_path / "evil.ekb")
    with zipfile.ZipFile(evil, "a") as z:
        info = zipfile.ZipInfo("golden/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(BundleError, match="is a link"):
        read_bundle(evil)


def test_a_member_twice_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    evil = rezip(bundles["mlp"], tmp_path / "evil.ekb")
    with zipfile.ZipFile(evil, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("model.tflite", b"another model")
    with pytest.raises(BundleError, match="twice"):
        read_bundle(evil)


def test_a_zip_bomb_is_refused_before_inflating(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEKIT_MAX_BUNDLE_BYTES", str(1 << 20))
    assert read_bundle(bundles["mlp"]).manifest.name == "mlp"  # a real bundle fits the cap
    bomb = rezip(bundles["mlp"], tmp_path / "bomb.ekb")
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("golden/zeros.npz", bytes(8 << 20))  # 8 MiB of zeros deflate to about 8 KiB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match="more than the 1048576-byte cap"):
        read_bundle(bomb)


def test_a_cap_that_is_not_a_number_is_a_clear_error(bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEKIT_MAX_BUNDLE_BYTES", "2GB")
    with pytest.raises(BundleError, match="EDGEKIT_MAX_BUNDLE_BYTES='2GB'"):
        read_bundle(bundles["mlp"])


def test_an_installed_member_behind_a_link_is_refused(bundles: dict[str, Path], store: Path, tmp_path: Path) -> None:
    target = install_bundle(bundles["mlp"], store)
    assert read_bundle_dir(target).manifest.version == 1
    outside = tmp_path / "outside.tflite"
    (target / "model.tflite").rename(outside)
    (target / "model.tflite").symlink_to(outside)
    with pytest.raises(BundleError, match="through a link"):
        read_bundle_dir(target)


def test_bundles_and_installs_get_the_umask_modes(bundles: dict[str, Path], store: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        written = read_bundle(bundles["mlp"]).write(tmp_path / "copy.ekb")
        target = install_bundle(written, store)
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    for member in ("manifest.json", "model.tflite", "golden/inputs.npz"):
        assert stat.S_IMODE((target / member).stat().st_mode) == 0o644, member


def test_an_install_keeps_the_bytes_it_read(bundles: dict[str, Path], store: Path) -> None:
    target = install_bundle(bundles["mlp"], store)
    with zipfile.ZipFile(bundles["mlp"]) as z:
        for name in z.namelist():
            assert (target / name).read_bytes() == z.read(name), name


def test_edgekit_bench_refuses_an_escaping_bundle(bundles: dict[str, Path], tmp_path: Path) -> None:
    from edgekit.cli import cli

    evil = rezip(
        bundles["mlp"],
        tmp_path / "evil.ekb",
        edit=set_model_file("../../escaped.tflite"),
        rename={"model.tflite": "../../escaped.tflite"},
    )
    before = files_under(tmp_path.parent)
    result = CliRunner().invoke(cli, ["bench", str(evil)])
    assert result.exit_code == 5, result.output
    assert "not a plain relative member name" in result.output
    assert files_under(tmp_path.parent) == before
