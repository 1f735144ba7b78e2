"""The model store: ``STORE/NAME/VERSION/`` holds one installed (extracted, verified) bundle.

Layout of a version directory: ``manifest.json``, ``manifest.sig`` (if signed), the model file
(``model.tflite`` / ``model.onnx``) and ``golden/``. Installation extracts into a hidden temporary
directory inside the store and renames it into place, so a watcher never sees half a version.
Directories whose names start with ``.`` are ignored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekit_runtime.bundle import (
    MANIFEST,
    SIGNATURE,
    Bundle,
    Manifest,
    default_file_mode,
    fsync_dir,
    parse_manifest,
    read_bundle,
    read_bundle_dir,
)
from edgekit_runtime.errors import BundleError

__all__ = ["Candidate", "install_bundle", "read_installed", "scan_source"]


def install_bundle(bundle_path: str | Path, store: str | Path) -> Path:
    """Verify a ``.ekb`` and install it as ``store/NAME/VERSION``; BundleError if that version exists."""
    bundle = read_bundle(bundle_path)
    m = bundle.manifest
    store = Path(store)
    target = store / m.name / str(m.version)
    if target.exists():
        msg = f"{target} already exists: version {m.version} of {m.name!r} is installed; bump the bundle's version"
        raise BundleError(msg)
    try:
        (store / m.name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{m.version}.", suffix=".part", dir=store / m.name))
    except OSError as e:
        msg = f"cannot write to the store {store}: {e.strerror}"
        raise BundleError(msg) from e
    try:
        members = {MANIFEST: bundle.manifest_bytes or m.to_json(), m.model_file: bundle.model}
        if bundle.signature is not None:
            members[SIGNATURE] = bundle.signature
        if m.golden is not None:
            members[m.golden.inputs], members[m.golden.outputs] = bundle.golden_members()
        mode = default_file_mode()
        for rel, data in members.items():  # names were checked when the bundle was read: none escapes tmp
            _write_durable(tmp / rel, data, mode)
        for d in {(tmp / rel).parent for rel in members}:
            fsync_dir(d)
        tmp.chmod(mode | (mode & 0o444) >> 2)  # searchable wherever readable: 0644 files, a 0755 folder
        # rename(2) of a directory fails if the target exists, so two installers cannot both win.
        os.rename(tmp, target)  # noqa: PTH104 - want rename(2) semantics, not Path.replace
        fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.exists():
            msg = f"{target} already exists: version {m.version} of {m.name!r} is installed"
            raise BundleError(msg) from e
        msg = f"cannot install into {target}: {e.strerror}"
        raise BundleError(msg) from e
    return target


def _write_durable(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_installed(path: str | Path) -> Bundle:
    """Read an installed version directory back into a Bundle, with the same checks as a bundle file."""
    return read_bundle_dir(path)


@dataclass(frozen=True)
class Candidate:
    """A version some source offers: where it is and a key that changes when its content does."""

    name: str
    version: int
    origin: str
    key: tuple[str, float, int]

    def read(self) -> Bundle:
        path = Path(self.origin)
        return read_bundle(path) if path.is_file() else read_installed(path)

    def manifest(self) -> Manifest:
        """Only the manifest (checked), without reading the model."""
        path = Path(self.origin)
        if path.is_file():
            return read_bundle(path, manifest_only=True).manifest
        return parse_manifest((path / MANIFEST).read_bytes(), path)


def _key(path: Path) -> tuple[str, float, int]:
    st = path.stat()
    return (str(path), st.st_mtime, st.st_size)


class _ManifestCache:
    """Name and version of manifests, re-read only when a file changes (polling reads many)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, float, int], tuple[str, int]] = {}

    def ident(self, manifest_or_bundle: Path) -> tuple[tuple[str, float, int], str, int]:
        key = _key(manifest_or_bundle)
        hit = self._seen.get(key)
        if hit is None:
            if manifest_or_bundle.suffix == ".json":
                m = parse_manifest(manifest_or_bundle.read_bytes(), manifest_or_bundle.parent)
            else:
                m = read_bundle(manifest_or_bundle).manifest
            hit = (m.name, m.version)
            self._seen[key] = hit
        return key, hit[0], hit[1]


_cache = _ManifestCache()


def _version_dirs(model_dir: Path) -> list[Path]:
    out = []
    for d in model_dir.iterdir():
        if d.name.startswith(".") or not d.name.isdigit() or not d.is_dir():
            continue
        if (d / MANIFEST).is_file():
            out.append(d)
    return out


def scan_source(source: Path) -> tuple[list[Candidate], list[str]]:
    """The versions a source offers, and problems found (unreadable manifests), without loading models.

    A source is a store (``NAME/VERSION/``), one model's base path (``VERSION/``), one installed
    version (a directory with ``manifest.json``) or a ``.ekb`` file.
    """
    found: list[Candidate] = []
    problems: list[str] = []

    def add(path: Path, manifest_or_bundle: Path) -> None:
        try:
            key, name, version = _cache.ident(manifest_or_bundle)
        except (OSError, BundleError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            # BundleError messages start with the path already: say it once
            problems.append(first if first.startswith(f"{path}") else f"{path}: {first}")
            return
        found.append(Candidate(name, version, str(path), key))

    try:
        if source.is_file():
            add(source, source)
        elif (source / MANIFEST).is_file():
            add(source, source / MANIFEST)
        elif source.is_dir():
            versions = _version_dirs(source)
            if versions:
                for d in versions:
                    add(d, d / MANIFEST)
            else:
                for model_dir in sorted(source.iterdir()):
                    if model_dir.name.startswith(".") or not model_dir.is_dir():
                        continue
                    for d in _version_dirs(model_dir):
                        add(d, d / MANIFEST)
    except OSError as e:
        problems.append(f"{source}: {e.strerror or e}")
    return found, problems
