"""The MQTT protocol between the hub and a device agent: topics and payloads (docs/mqtt-protocol.md).

The runtime owns this contract because the device is the side that must stay small; the hub imports
it. Every payload is JSON with a ``schema`` version. A receiver refuses, with a ProtocolError naming
the reason, a payload that is too big, not JSON, of a newer schema, or of the wrong shape, and
carries on: a bad message never stops an agent or a hub.

Topics, under a configurable prefix (default ``edgekit``), all per device so that one Mosquitto
pattern ACL (``%u`` = the device's user name) confines a device to its own:

====================================  =========  ========  ===========================================
topic                                 retained   writer    payload
====================================  =========  ========  ===========================================
``P/devices/ID/presence``             yes        device    Presence (online; the last will says offline)
``P/devices/ID/reported``             yes        device    Reported (what runs, what the agent is doing)
``P/devices/ID/desired``              yes        hub       Desired (what should run)
====================================  =========  ========  ===========================================
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekit_runtime.errors import InvalidInputError

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "SCHEMA",
    "Desired",
    "DesiredModel",
    "Presence",
    "ProtocolError",
    "Reported",
    "ReportedModel",
    "Topics",
    "check_device_id",
    "check_prefix",
    "decode",
    "encode",
]

SCHEMA = 1
#: Control payloads are small; a bigger one is refused before it is parsed.
MAX_PAYLOAD_BYTES = 256 << 10

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}$")


class ProtocolError(InvalidInputError):
    """An MQTT payload that is too big, not JSON, of a newer schema or of the wrong shape."""


def check_device_id(device_id: str) -> str:
    """Device ids are topic levels and broker user names: letters, digits and ``._-``, no wildcards."""
    if not _ID.match(device_id):
        msg = (
            f"device id {device_id!r} must be 1-64 letters, digits or ._- (starting with a letter or digit); "
            "MQTT wildcards and '/' cannot be part of it"
        )
        raise InvalidInputError(msg)
    return device_id


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        msg = f"topic prefix {prefix!r} must be 1-4 '/'-separated levels of letters, digits or ._-, no wildcards"
        raise InvalidInputError(msg)
    return prefix


@dataclass(frozen=True)
class Topics:
    """Every topic of one device under ``prefix``."""

    prefix: str
    device: str

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        check_device_id(self.device)

    @property
    def base(self) -> str:
        return f"{self.prefix}/devices/{self.device}"

    @property
    def presence(self) -> str:
        return f"{self.base}/presence"

    @property
    def reported(self) -> str:
        return f"{self.base}/reported"

    @property
    def desired(self) -> str:
        return f"{self.base}/desired"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a newer minor sender may add fields: ignore them

    schema_: int = Field(default=SCHEMA, alias="schema", ge=1)


class Presence(_Message):
    online: bool
    since: float = Field(default_factory=time.time, description="unix time of the change")
    device: str = ""
    profile: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    runtime_version: str = ""


class DesiredModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = Field(ge=1)


class Desired(_Message):
    """What the hub wants a device to run. ``generation`` grows with every change the hub makes, so
    a duplicate or an older message (QoS 1 redelivery, a stale retained copy) is recognised."""

    generation: int = Field(ge=0)
    models: dict[str, DesiredModel] = Field(default_factory=dict)


class ReportedModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    active: int | None = None
    versions: list[int] = Field(default_factory=list)
    state: str = "serving"
    reason: str = ""


class Reported(_Message):
    seq: int = Field(ge=0, description="grows with every report of this agent's process and across restarts")
    desired_generation: int | None = None
    models: dict[str, ReportedModel] = Field(default_factory=dict)


M = TypeVar("M", bound=_Message)


def encode(message: _Message) -> bytes:
    return json.dumps(message.model_dump(mode="json", by_alias=True), separators=(",", ":")).encode()


def decode(kind: type[M], payload: bytes, topic: str = "") -> M:
    """Parse and check one payload; ProtocolError says what is wrong with it."""
    where = f"{topic}: " if topic else ""
    if len(payload) > MAX_PAYLOAD_BYTES:
        msg = f"{where}payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
        raise ProtocolError(msg)
    try:
        raw: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"{where}payload is not JSON ({e})"
        raise ProtocolError(msg) from None
    if not isinstance(raw, dict):
        msg = f"{where}payload must be a JSON object, not {type(raw).__name__}"
        raise ProtocolError(msg)
    schema = raw.get("schema", SCHEMA)
    if isinstance(schema, int) and schema > SCHEMA:
        msg = f"{where}schema {schema} is newer than this side's ({SCHEMA}); upgrade edgekit"
        raise ProtocolError(msg)
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(p) for p in first["loc"]) or "(root)"
        msg = f"{where}{kind.__name__} payload invalid at {at!r}: {first['msg']}"
        raise ProtocolError(msg) from None
