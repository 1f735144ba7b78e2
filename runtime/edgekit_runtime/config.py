"""Serving settings: the TOML config file, version policies and how batching settings are merged.

Precedence for a model's runtime settings, lowest first: the bundle's profile
(``manifest.profile.runtime``), the config file's top-level ``[batching]`` / ``threads``, the
file's ``[models.NAME]`` section, then command-line flags.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekit_runtime.bundle import BatchingSettings, BatchTimeoutPolicy, RuntimeSettings
from edgekit_runtime.errors import InvalidInputError, NotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

__all__ = [
    "BatchingOverrides",
    "Config",
    "ModelConfig",
    "ServerConfig",
    "VersionPolicy",
    "load_config",
    "runtime_settings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingOverrides(_Strict):
    """Any subset of BatchingSettings; unset fields keep the lower layer's value."""

    enabled: bool | None = None
    max_batch_size: int | None = Field(default=None, ge=1)
    batch_timeout_micros: int | None = Field(default=None, ge=0)
    batch_timeout_policy: BatchTimeoutPolicy | None = None
    allowed_batch_sizes: list[int] | None = None
    max_enqueued_batches: int | None = Field(default=None, ge=1)
    num_batch_threads: int | None = Field(default=None, ge=1)

    def apply(self, base: BatchingSettings) -> BatchingSettings:
        update = self.model_dump(exclude_none=True)
        if "max_batch_size" in update and "allowed_batch_sizes" not in update and base.allowed_batch_sizes:
            # A new max invalidates the profile's allowed sizes (the last must equal the max): keep
            # those below the new max and add it.
            mx = update["max_batch_size"]
            update["allowed_batch_sizes"] = [s for s in base.allowed_batch_sizes if s < mx] + [mx]
        try:  # validated (model_copy would not): the merged settings are what the batcher trusts
            return BatchingSettings.model_validate({**base.model_dump(), **update})
        except ValidationError as e:
            raise InvalidInputError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


class VersionPolicy(_Strict):
    """Which versions of a model stay loaded: the newest ``latest`` ones, or exactly ``specific`` ones."""

    latest: int | None = Field(default=None, ge=1)
    specific: list[int] | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        if self.latest is not None and self.specific is not None:
            msg = "give either latest = N or specific = [...], not both"
            raise ValueError(msg)
        return self

    def select(self, versions: Iterable[int]) -> set[int]:
        vs = sorted(set(versions), reverse=True)
        if self.specific is not None:
            return {v for v in vs if v in self.specific}
        return set(vs[: self.latest or 1])

    def describe(self) -> str:
        if self.specific is not None:
            return f"specific {sorted(self.specific)}"
        return f"latest {self.latest or 1}"


class ModelConfig(_Strict):
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    threads: int | None = Field(default=None, ge=0)
    batching: BatchingOverrides = Field(default_factory=BatchingOverrides)

    @model_validator(mode="before")
    @classmethod
    def _policy_shorthand(cls, data: Any) -> Any:
        # version_policy = "latest" is allowed as a shorthand for {latest = 1}
        if isinstance(data, dict) and data.get("version_policy") == "latest":
            return {**data, "version_policy": {"latest": 1}}
        return data


#: The HTTP servers ``serve`` can run on (``--http``); the first is the default.
HTTP_SERVERS = ("native", "uvicorn")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8500, ge=0, le=65535)
    max_body_mb: float = Field(default=64.0, gt=0)
    poll_seconds: float = Field(default=2.0, ge=0, description="0 = do not watch sources for new versions")
    log_level: str = "info"
    sources: list[str] = Field(default_factory=list)
    workers: int = Field(default=1, ge=1, description="serving processes on the one port (--workers)")


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    threads: int | None = Field(default=None, ge=0)
    batching: BatchingOverrides = Field(default_factory=BatchingOverrides)
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    def model(self, name: str) -> ModelConfig:
        return self.models.get(name) or ModelConfig()


def load_config(path: str | Path) -> Config:
    """Read a TOML config; InvalidInputError names the file and the key that is wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{path}: no such config file"
        raise NotFoundError(msg) from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        msg = f"{path}: not a readable TOML file: {e}"
        raise InvalidInputError(msg) from None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = f"{path}: {where!r}: {first['msg']}"
        raise InvalidInputError(msg) from None


def runtime_settings(
    profile: RuntimeSettings,
    config: Config,
    name: str,
    *,
    flags: BatchingOverrides | None = None,
    threads: int | None = None,
) -> RuntimeSettings:
    """The effective runtime settings of model ``name`` (profile < config < model section < flags)."""
    batching = profile.batching
    eff_threads = profile.threads
    model = config.model(name)
    for layer, layer_threads in ((config.batching, config.threads), (model.batching, model.threads)):
        batching = layer.apply(batching)
        if layer_threads is not None:
            eff_threads = layer_threads
    if flags is not None:
        batching = flags.apply(batching)
    if threads is not None:
        eff_threads = threads
    return profile.model_copy(update={"batching": batching, "threads": eff_threads})
