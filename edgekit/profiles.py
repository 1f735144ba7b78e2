"""Device profiles: typed, validated descriptions of a target device (``device_profiles/*.toml``).

A profile name finds a bundled file; a path to a ``.toml`` file works everywhere a name does.
Unknown keys, wrong types and impossible combinations are errors that name the key and the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekit.errors import ProfileError
from edgekit_runtime.bundle import RuntimeSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6's Ubuntu 22.04)
    import tomli as tomllib

TFLITE_MODES = ("float32", "float16", "dynamic", "int8", "int8-only", "int16x8")
ONNX_MODES = ("float32", "float16", "dynamic-int8", "static-int8")
MODES = {"tflite": TFLITE_MODES, "onnx": ONNX_MODES}
_NEEDS_CALIBRATION = {"int8", "int8-only", "int16x8", "static-int8"}
# Modes where single layers may stay in float (conversion.float_layers): full integer with float fallback.
FLOAT_FALLBACK_MODES = {"int8", "int16x8", "static-int8"}


def _bundled_dir() -> Path:
    here = Path(__file__).resolve().parent
    installed = here / "device_profiles"  # wheel: force-included into the package
    return installed if installed.is_dir() else here.parent / "device_profiles"  # source checkout


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(_Strict):
    """What the device is. Informational, shown by `profiles show`, and used in reports."""

    description: str
    arch: Literal["arm64", "armv7", "x86_64", "armv7e-m", "armv8-m"]
    cores: int = Field(ge=1)
    memory_mb: int = Field(ge=0)
    cpu_class: str = ""
    accelerators: list[str] = Field(default_factory=list)


class Conversion(_Strict):
    """What the converter produces for this device."""

    format: Literal["tflite", "onnx"]
    quantization: str
    input_dtype: Literal["float32", "float16", "int8", "uint8"] = "float32"
    output_dtype: Literal["float32", "float16", "int8", "uint8"] = "float32"
    per_channel: bool = True
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    calibration_samples: int = Field(default=200, ge=1, le=10000)
    static_batch: int | None = Field(default=None, ge=1, description="export with this fixed batch size")
    opset: int = Field(default=17, ge=11, le=21)
    allowed_quantizations: list[str] = Field(
        default_factory=list,
        description="modes `edgekit convert --quantization auto` may choose, smallest/fastest first; "
        "empty = only `quantization`",
    )
    unroll_recurrent: bool = Field(
        default=True,
        description="unroll Keras LSTM/GRU layers over their time steps to calibrate (TensorFlow's calibrator "
        "crashes on their while loop); false keeps the loop",
    )
    float_layers: list[str] = Field(
        default_factory=list,
        description="layers kept in float in a float-fallback mode (TFLite tensor names, ONNX node names)",
    )

    @property
    def needs_calibration(self) -> bool:
        return self.quantization in _NEEDS_CALIBRATION

    @property
    def auto_modes(self) -> list[str]:
        """The modes `--quantization auto` tries, in order."""
        return list(self.allowed_quantizations) or [self.quantization]


class Constraints(_Strict):
    """What the target can run; checked before a conversion is accepted."""

    static_shapes: bool = False
    full_integer: bool = False
    allowed_ops: list[str] = Field(default_factory=list, description="empty = any op the engine has")
    max_tensor_rank: int | None = Field(default=None, ge=1)
    max_tensor_arena_kb: int | None = Field(default=None, ge=1)


class Budgets(_Strict):
    """Limits a converted model must meet; `edgekit convert` fails (or warns with --no-strict) past one."""

    max_model_size_mb: float | None = Field(default=None, gt=0)
    max_accuracy_drop_points: float | None = Field(default=None, ge=0, description="task accuracy, percentage points")
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    min_cosine_similarity: float | None = Field(default=None, ge=-1, le=1)
    max_latency_ms_p50: float | None = Field(default=None, gt=0, description="batch 1, measured on the host")


class Profile(_Strict):
    schema_version: int = Field(default=1, ge=1, le=1)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    target: Target
    conversion: Conversion
    constraints: Constraints = Field(default_factory=Constraints)
    budgets: Budgets = Field(default_factory=Budgets)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    references: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _coherent(self) -> Profile:
        c = self.conversion
        modes = MODES[c.format]
        if c.quantization not in modes:
            msg = f"conversion.quantization {c.quantization!r} is not a {c.format} mode; use one of {', '.join(modes)}"
            raise ValueError(msg)
        bad = [m for m in c.allowed_quantizations if m not in modes]
        if bad:
            msg = f"conversion.allowed_quantizations {bad} are not {c.format} modes; use some of {', '.join(modes)}"
            raise ValueError(msg)
        if c.float_layers and c.quantization not in FLOAT_FALLBACK_MODES:
            msg = (
                "conversion.float_layers needs a mode with float fallback "
                f"({', '.join(sorted(FLOAT_FALLBACK_MODES))}), not {c.quantization!r}"
            )
            raise ValueError(msg)
        integer_io = {c.input_dtype, c.output_dtype} & {"int8", "uint8"}
        if integer_io and c.quantization != "int8-only":
            msg = "conversion.input_dtype/output_dtype int8/uint8 need conversion.quantization = 'int8-only'"
            raise ValueError(msg)
        if self.constraints.full_integer and c.quantization != "int8-only":
            msg = "constraints.full_integer = true needs conversion.quantization = 'int8-only'"
            raise ValueError(msg)
        if self.constraints.static_shapes and c.static_batch is None:
            msg = "constraints.static_shapes = true needs conversion.static_batch (e.g. 1)"
            raise ValueError(msg)
        if c.format == "tflite" and self.runtime.execution_providers:
            msg = "runtime.execution_providers is for ONNX profiles; TFLite profiles use runtime.delegates"
            raise ValueError(msg)
        if c.format == "onnx" and self.runtime.delegates:
            msg = "runtime.delegates is for TFLite profiles; ONNX profiles use runtime.execution_providers"
            raise ValueError(msg)
        return self


def bundled_profiles() -> dict[str, Path]:
    """Bundled profile names and their files."""
    return {p.stem: p for p in sorted(_bundled_dir().glob("*.toml"))}


def _from_file(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        msg = f"cannot read profile {path}: {e.strerror}"
        raise ProfileError(msg) from e
    except tomllib.TOMLDecodeError as e:
        msg = f"profile {path} is not valid TOML: {e}"
        raise ProfileError(msg) from e
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            text = (
                "unknown key (check the spelling; see `edgekit profiles show generic-cpu`)"
                if err["type"] == "extra_forbidden"
                else err["msg"]
            )
            problems.append(f"key {key!r}: {text}")
        msg = f"invalid profile {path}: " + "; ".join(problems)
        raise ProfileError(msg) from None


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name, or a user's profile file by path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            msg = f"profile file {path} does not exist"
            raise ProfileError(msg)
        return _from_file(path)
    bundled = bundled_profiles()
    if text not in bundled:
        msg = f"unknown profile {text!r}; bundled profiles: {', '.join(bundled)} (or pass a path to a .toml file)"
        raise ProfileError(msg)
    return _from_file(bundled[text])


def resolve_profiles(names: tuple[str, ...] | list[str]) -> list[Profile]:
    """Expand `all` to every bundled profile and load each name or path once, in order."""
    out: list[Profile] = []
    for name in names:
        if name == "all":
            out.extend(load_profile(p) for p in bundled_profiles().values())
        else:
            out.append(load_profile(name))
    unique: dict[str, Profile] = {}
    for p in out:
        unique.setdefault(p.name, p)
    return list(unique.values())
