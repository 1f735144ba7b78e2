"""The model bundle (``.ekb``): one zip file with ``manifest.json``, the model file and golden samples.

This is the contract between the converter (which writes bundles), the hub (which stores and
signs them) and the device (which verifies, smoke-tests and serves them). See docs/bundle-format.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekit_runtime.errors import BundleError
from edgekit_runtime.tensors import TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
GOLDEN_INPUTS = "golden/inputs.npz"
GOLDEN_OUTPUTS = "golden/outputs.npz"
MODEL_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingSettings(_Strict):
    """TF Serving's batching knobs (session_bundle_config.proto), per model."""

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    batch_timeout_micros: int = Field(default=1000, ge=0)
    allowed_batch_sizes: list[int] = Field(default_factory=list)
    max_enqueued_batches: int = Field(default=16, ge=1)
    num_batch_threads: int = Field(default=1, ge=1)


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
    inputs: str = GOLDEN_INPUTS
    outputs: str = GOLDEN_OUTPUTS
    count: int
    atol: float
    rtol: float = 0.0


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: int = Field(ge=1)
    format: Literal["tflite", "onnx"]
    quantization: str
    model_file: str
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

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class Bundle:
    """A bundle in memory: its manifest, model bytes, golden samples and optional signature."""

    manifest: Manifest
    model: bytes
    golden_inputs: dict[str, np.ndarray]
    golden_outputs: dict[str, np.ndarray]
    signature: bytes | None = None
    manifest_bytes: bytes = b""

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
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr(MANIFEST, manifest_bytes)
                if self.signature is not None:
                    z.writestr(SIGNATURE, self.signature)
                z.writestr(self.manifest.model_file, self.model)
                if self.manifest.golden is not None:
                    z.writestr(self.manifest.golden.inputs, _npz_bytes(self.golden_inputs))
                    z.writestr(self.manifest.golden.outputs, _npz_bytes(self.golden_outputs))
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _assemble(path: Path, read: Callable[[str], bytes | None], fix: str) -> Bundle:
    """Check and assemble a bundle from its members, whatever holds them (a zip file or an installed
    folder): manifest schema, model hash, golden samples. ``fix`` tells the user what to do."""

    def member(name: str) -> bytes:
        data = read(name)
        if data is None:
            msg = f"{path}: bundle has no {name}; {fix}"
            raise BundleError(msg)
        return data

    raw = member(MANIFEST)
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
    model = member(manifest.model_file)
    if sha256_bytes(model) != manifest.model_sha256:
        msg = f"{path}: model file hash does not match the manifest (corrupted or tampered); {fix}"
        raise BundleError(msg)
    golden_in: dict[str, np.ndarray] = {}
    golden_out: dict[str, np.ndarray] = {}
    if manifest.golden is not None:
        try:
            golden_in = _read_npz(member(manifest.golden.inputs))
            golden_out = _read_npz(member(manifest.golden.outputs))
        except (ValueError, OSError) as e:
            msg = f"{path}: golden samples unreadable: {e}"
            raise BundleError(msg) from e
    return Bundle(manifest, model, golden_in, golden_out, read(SIGNATURE), raw)


def read_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle file: manifest schema, model hash, golden samples. BundleError if anything is off."""
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such bundle file"
        raise BundleError(msg)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        msg = f"{path}: not a bundle (expected a zip with manifest.json; {e}); create one with `edgekit convert`"
        raise BundleError(msg) from e
    with z:
        names = set(z.namelist())
        return _assemble(path, lambda name: z.read(name) if name in names else None, "re-create or re-download it")


def read_bundle_dir(path: str | Path) -> Bundle:
    """Read and check a bundle unpacked into a folder (an installed version in a model store)."""
    path = Path(path)

    def read(name: str) -> bytes | None:
        try:
            return (path / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            msg = f"{path}: {name} unreadable ({e.strerror})"
            raise BundleError(msg) from e

    return _assemble(path, read, "reinstall the bundle")
