"""The model bundle (``.ekb``): one zip file with ``manifest.json``, the model file and golden samples.

This is the contract between the converter (which writes bundles), the hub (which stores and
signs them) and the device (which verifies, smoke-tests and serves them). See docs/bundle-format.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekit_runtime.errors import BundleError, NotFoundError
from edgekit_runtime.tensors import TensorSpec

__all__ = [
    "GOLDEN_INPUTS",
    "GOLDEN_OUTPUTS",
    "MANIFEST",
    "MAX_BUNDLE_BYTES",
    "MODEL_FILES",
    "SCHEMA_VERSION",
    "SIGNATURE",
    "BatchTimeoutPolicy",
    "BatchingSettings",
    "Bundle",
    "GoldenInfo",
    "Manifest",
    "Postprocessing",
    "Preprocessing",
    "ProfileRef",
    "RuntimeSettings",
    "SourceInfo",
    "default_file_mode",
    "fsync_dir",
    "max_bundle_bytes",
    "npz_bytes",
    "parse_manifest",
    "read_bundle",
    "read_bundle_dir",
    "read_npz",
    "sha256_bytes",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
GOLDEN_INPUTS = "golden/inputs.npz"
GOLDEN_OUTPUTS = "golden/outputs.npz"
MODEL_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}
#: What a bundle may hold once unpacked, all members together. A zip's sizes are checked before
#: anything is inflated, so a zip bomb is refused without being expanded. Override with the
#: environment variable EDGEKIT_MAX_BUNDLE_BYTES (bytes) for models bigger than this.
MAX_BUNDLE_BYTES = 2 << 30

_MEMBER_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def _member_name(name: str) -> str:
    """A member name is a plain relative POSIX path: no absolute path, no ``..``, no backslash, no
    drive, at most three parts of letters, digits, ``._-``. Anything else could write outside the
    folder a bundle is unpacked into (zip slip)."""
    parts = name.split("/")
    if not name or len(parts) > 3 or any(not _MEMBER_PART.match(p) or p in {".", ".."} for p in parts):
        msg = (
            f"{name!r} is not a plain relative member name (letters, digits and ._- in at most three "
            "'/'-separated parts; no '..', no absolute path)"
        )
        raise ValueError(msg)
    if name in {MANIFEST, SIGNATURE}:
        msg = f"{name!r} is reserved for the bundle's own manifest and signature"
        raise ValueError(msg)
    return name


MemberName = Annotated[str, AfterValidator(_member_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: How long a batch that is not full waits (BatchingSettings.batch_timeout_policy); the first is the default.
BatchTimeoutPolicy = Literal["adaptive", "fixed"]


class BatchingSettings(_Strict):
    """TF Serving's batching knobs (session_bundle_config.proto), per model."""

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    batch_timeout_micros: int = Field(default=1000, ge=0)
    #: "adaptive": batch_timeout_micros is the most a request waits, and a batch that is not full
    #: runs early when waiting does not pay (batching.py); "fixed": TF Serving's semantics exactly.
    batch_timeout_policy: BatchTimeoutPolicy = "adaptive"
    allowed_batch_sizes: list[int] = Field(default_factory=list)
    max_enqueued_batches: int = Field(default=16, ge=1)
    num_batch_threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _allowed_sizes(self) -> BatchingSettings:
        # The one place this rule lives: profiles, manifests, config files and flags all end here.
        sizes = self.allowed_batch_sizes
        if sizes and (sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.max_batch_size):
            msg = (
                f"allowed_batch_sizes {sizes} must be positive, increase strictly and end with "
                f"max_batch_size ({self.max_batch_size}), as in TF Serving"
            )
            raise ValueError(msg)
        return self


class RuntimeSettings(_Strict):
    """How the device runs the model: engine threads, delegates / execution providers, batching."""

    threads: int = Field(default=0, ge=0, description="engine threads; 0 = the engine's default")
    delegates: list[str] = Field(default_factory=list)
    execution_providers: list[str] = Field(default_factory=list)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)


class ProfileRef(_Strict):
    name: str
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)


class SourceInfo(_Strict):
    path: str
    format: Literal["keras", "saved_model", "onnx"]
    sha256: str
    size_bytes: int


class Preprocessing(_Strict):
    """Optional input normalisation applied by the runtime: x' = (x - mean) / std, per channel or scalar."""

    input: str | None = None
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])


class Postprocessing(_Strict):
    """Optional top-k with labels over one output."""

    output: str | None = None
    top_k: int = Field(default=5, ge=1)
    labels: list[str] = Field(default_factory=list)


class GoldenInfo(_Strict):
    inputs: MemberName = GOLDEN_INPUTS
    outputs: MemberName = GOLDEN_OUTPUTS
    count: int
    atol: float
    rtol: float = 0.0


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: int = Field(ge=1)
    format: Literal["tflite", "onnx"]
    quantization: str
    model_file: MemberName
    model_sha256: str
    model_size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profile: ProfileRef
    golden: GoldenInfo | None = None
    source: SourceInfo | None = None
    calibration: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    postprocessing: Postprocessing | None = None
    converter: dict[str, str] = Field(default_factory=dict)
    created: str = ""

    @model_validator(mode="after")
    def _distinct_members(self) -> Manifest:
        names = self.member_names()
        if len(set(names)) != len(names):
            msg = f"member names must be distinct: model_file and golden name {names}"
            raise ValueError(msg)
        return self

    def member_names(self) -> list[str]:
        """The members this manifest names besides itself and its signature, in bundle order."""
        names = [self.model_file]
        if self.golden is not None:
            names += [self.golden.inputs, self.golden.outputs]
        return names

    def to_json(self) -> bytes:
        """The manifest as written into a bundle. ``batch_timeout_policy`` is left out while it is
        the default (``adaptive``): runtimes older than the field reject unknown keys, and so still
        load such a bundle (batching with their fixed delay, the only one they know); only a bundle
        whose profile asks for ``fixed`` names it, and needs a runtime that knows it."""
        doc = self.model_dump(mode="json")
        batching = doc["profile"]["runtime"]["batching"]
        if batching.get("batch_timeout_policy") == BatchingSettings.model_fields["batch_timeout_policy"].default:
            del batching["batch_timeout_policy"]
        return json.dumps(doc, indent=2, sort_keys=True).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    # An .npz is a zip of its own: its inflated size is capped like the bundle's.
    with zipfile.ZipFile(io.BytesIO(data)) as inner:
        total = sum(i.file_size for i in inner.infolist())
    if total > max_bundle_bytes():
        msg = f"golden samples unpack to {total} bytes, more than the {max_bundle_bytes()}-byte cap"
        raise ValueError(msg)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def default_file_mode() -> int:
    """0666 less the process umask: what open(2) would give a new file. mkstemp makes 0600 files,
    which other users (a service account serving the store) could not read."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable: power loss must not undo a finished install."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Bundle:
    """A bundle in memory: its manifest, model bytes, golden samples and optional signature."""

    manifest: Manifest
    model: bytes
    golden_inputs: dict[str, np.ndarray]
    golden_outputs: dict[str, np.ndarray]
    signature: bytes | None = None
    manifest_bytes: bytes = b""
    #: the golden members' bytes as read, so an install writes back exactly what was signed
    golden_bytes: tuple[bytes, bytes] | None = None

    def golden_members(self) -> tuple[bytes, bytes]:
        """The golden inputs and outputs as member bytes: as read when read, else serialised."""
        if self.golden_bytes is not None:
            return self.golden_bytes
        return npz_bytes(self.golden_inputs), npz_bytes(self.golden_outputs)

    def write(self, path: Path) -> Path:
        """Write atomically: a temporary file beside ``path``, renamed into place when complete."""
        path = Path(path)
        manifest_bytes = self.manifest_bytes or self.manifest.to_json()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        except OSError as e:
            msg = f"cannot write to {path.parent}: {e.strerror}; choose an output folder you can write to"
            raise BundleError(msg) from e
        try:
            with os.fdopen(fd, "wb") as f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                    z.writestr(MANIFEST, manifest_bytes)
                    if self.signature is not None:
                        z.writestr(SIGNATURE, self.signature)
                    z.writestr(self.manifest.model_file, self.model)
                    if self.manifest.golden is not None:
                        gin, gout = self.golden_members()
                        z.writestr(self.manifest.golden.inputs, gin)
                        z.writestr(self.manifest.golden.outputs, gout)
                os.fchmod(f.fileno(), default_file_mode())
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).replace(path)
            fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Parse and check ``manifest.json`` of the bundle at ``path``; BundleError names the bad field."""
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = f"{path}: invalid manifest.json at {where!r}: {first['msg']}"
        raise BundleError(msg) from None
    if manifest.schema_version > SCHEMA_VERSION:
        msg = (
            f"{path}: bundle schema {manifest.schema_version} is newer than this runtime's "
            f"({SCHEMA_VERSION}); upgrade edgekit-ml-runtime"
        )
        raise BundleError(msg)
    return manifest


def _assemble(path: Path, read: Callable[[str], bytes | None], fix: str, present: set[str] | None = None) -> Bundle:
    """Check and assemble a bundle from its members, whatever holds them (a zip file or an installed
    folder): manifest schema, member names, model hash, golden samples. ``present`` is every member
    the holder has, when it can list them (a zip): a member the manifest does not name is refused.
    ``fix`` tells the user what to do."""

    def member(name: str) -> bytes:
        data = read(name)
        if data is None:
            msg = f"{path}: bundle has no {name}; {fix}"
            raise BundleError(msg)
        return data

    raw = member(MANIFEST)
    manifest = parse_manifest(raw, path)
    if present is not None:
        unexpected = sorted(present - {MANIFEST, SIGNATURE, *manifest.member_names()})
        if unexpected:
            msg = f"{path}: bundle holds members its manifest does not name: {unexpected}; {fix}"
            raise BundleError(msg)
    model = member(manifest.model_file)
    if sha256_bytes(model) != manifest.model_sha256:
        msg = f"{path}: model file hash does not match the manifest (corrupted or tampered); {fix}"
        raise BundleError(msg)
    golden_in: dict[str, np.ndarray] = {}
    golden_out: dict[str, np.ndarray] = {}
    golden_bytes = None
    if manifest.golden is not None:
        golden_bytes = (member(manifest.golden.inputs), member(manifest.golden.outputs))
        try:
            golden_in = read_npz(golden_bytes[0])
            golden_out = read_npz(golden_bytes[1])
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            msg = f"{path}: golden samples unreadable: {e}"
            raise BundleError(msg) from e
    return Bundle(manifest, model, golden_in, golden_out, read(SIGNATURE), raw, golden_bytes)


def max_bundle_bytes() -> int:
    """The unpacked-size cap: EDGEKIT_MAX_BUNDLE_BYTES if set, else MAX_BUNDLE_BYTES."""
    raw = os.environ.get("EDGEKIT_MAX_BUNDLE_BYTES", "")
    try:
        return int(raw) if raw else MAX_BUNDLE_BYTES
    except ValueError:
        msg = f"EDGEKIT_MAX_BUNDLE_BYTES={raw!r} is not a number of bytes; unset it or give e.g. 4294967296"
        raise BundleError(msg) from None


def _zip_members(path: Path, z: zipfile.ZipFile) -> set[str]:
    """The zip's member names, refusing what could escape or explode when unpacked: unsafe or
    duplicate names, links, and more unpacked bytes than the cap (checked before inflating)."""
    names: set[str] = set()
    total = 0
    for info in z.infolist():
        name = info.filename
        if name in names:
            msg = f"{path}: bundle holds {name!r} twice; re-create it with `edgekit convert`"
            raise BundleError(msg)
        if stat.S_ISLNK(info.external_attr >> 16):
            msg = f"{path}: bundle member {name!r} is a link; bundles hold plain files only"
            raise BundleError(msg)
        if info.is_dir():
            name = name.rstrip("/")
        if name not in {MANIFEST, SIGNATURE}:
            try:
                _member_name(name)
            except ValueError as e:
                msg = f"{path}: unsafe bundle member: {e}; this bundle was not written by edgekit"
                raise BundleError(msg) from None
        if not info.is_dir():
            names.add(name)
        total += info.file_size
    cap = max_bundle_bytes()
    if total > cap:
        msg = (
            f"{path}: bundle unpacks to {total} bytes, more than the {cap}-byte cap; "
            "set EDGEKIT_MAX_BUNDLE_BYTES if this model really is that big"
        )
        raise BundleError(msg)
    return names


def read_bundle(path: str | Path, *, manifest_only: bool = False) -> Bundle:
    """Read and check a bundle file: manifest schema, member names, sizes, model hash, golden samples.
    BundleError if anything is off. ``manifest_only`` checks the zip's listing and the manifest and
    returns a Bundle without model or golden samples (for settings checks; never to serve)."""
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such bundle file"
        raise NotFoundError(msg)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        msg = f"{path}: not a bundle (expected a zip with manifest.json; {e}); create one with `edgekit convert`"
        raise BundleError(msg) from e
    with z:
        names = _zip_members(path, z)

        def read(name: str) -> bytes | None:
            if name not in names:
                return None
            try:
                return z.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError) as e:
                msg = f"{path}: bundle member {name} is corrupt ({e}); re-create or re-download it"
                raise BundleError(msg) from e

        if manifest_only:
            raw = read(MANIFEST)
            if raw is None:
                msg = f"{path}: bundle has no {MANIFEST}; re-create or re-download it"
                raise BundleError(msg)
            return Bundle(parse_manifest(raw, path), b"", {}, {}, manifest_bytes=raw)
        return _assemble(path, read, "re-create or re-download it", names)


def read_bundle_dir(path: str | Path) -> Bundle:
    """Read and check a bundle unpacked into a folder (an installed version in a model store).
    Links are not followed: a member reached through a symlink is refused."""
    path = Path(path)

    def read(name: str) -> bytes | None:
        here = path
        for part in name.split("/"):
            here = here / part
            try:
                if stat.S_ISLNK(here.lstat().st_mode):
                    msg = f"{path}: {name} is reached through a link ({here}); installed versions hold plain files"
                    raise BundleError(msg)
            except FileNotFoundError:
                return None
            except OSError as e:
                msg = f"{path}: {name} unreadable ({e.strerror})"
                raise BundleError(msg) from e
        try:
            return here.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            msg = f"{path}: {name} unreadable ({e.strerror})"
            raise BundleError(msg) from e

    return _assemble(path, read, "reinstall the bundle")
