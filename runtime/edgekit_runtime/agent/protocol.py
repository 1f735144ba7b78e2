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
``P/devices/ID/chunks/get``           no         device    ChunkRequest (a window of chunk indexes)
``P/devices/ID/chunks/data``          no         hub       a chunk frame (encode_chunk)
``P/devices/ID/telemetry``            no         device    Telemetry (one model version's interval, or
                                                           the device's own figures), by sequence
``P/devices/ID/acks``                 no         hub       Ack (the sequence numbers the hub stored)
====================================  =========  ========  ===========================================
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekit_runtime.errors import InvalidInputError

__all__ = [
    "ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "MAX_WINDOW",
    "SCHEMA",
    "Ack",
    "Artifact",
    "Chunk",
    "ChunkRequest",
    "Desired",
    "DesiredModel",
    "DeviceStats",
    "Presence",
    "ProtocolError",
    "Reported",
    "ReportedModel",
    "Telemetry",
    "TelemetryModel",
    "Topics",
    "check_device_id",
    "check_prefix",
    "decode",
    "decode_chunk",
    "decode_telemetry",
    "encode",
    "encode_chunk",
]

SCHEMA = 1
#: Control payloads are small; a bigger one is refused before it is parsed.
MAX_PAYLOAD_BYTES = 256 << 10
#: Chunk sizes a device accepts (AWS IoT's MQTT file streams allow 256 B to 128 KB blocks).
MIN_CHUNK, DEFAULT_CHUNK, MAX_CHUNK = 1 << 10, 64 << 10, 128 << 10
#: Chunk indexes one request may ask for: the device's one outstanding window.
MAX_WINDOW = 16
MAX_ARTIFACT_BYTES = 2 << 30
_FRAME_HEADER_MAX = 4 << 10

#: Device ids (and other names that are a topic level): 1-64 letters, digits or ._-, no wildcards.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}$")


class ProtocolError(InvalidInputError):
    """An MQTT payload that is too big, not JSON, of a newer schema or of the wrong shape."""


def check_device_id(device_id: str) -> str:
    """Device ids are topic levels and broker user names: letters, digits and ``._-``, no wildcards."""
    if not ID_PATTERN.match(device_id):
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

    @property
    def chunks_get(self) -> str:
        return f"{self.base}/chunks/get"

    @property
    def chunks_data(self) -> str:
        return f"{self.base}/chunks/data"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def acks(self) -> str:
        return f"{self.base}/acks"


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


class Artifact(BaseModel):
    """The bundle file a device fetches for a desired version: its hash, size and chunking."""

    model_config = ConfigDict(extra="ignore")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, le=MAX_ARTIFACT_BYTES)
    chunk_size: int = Field(default=DEFAULT_CHUNK, ge=MIN_CHUNK, le=MAX_CHUNK)

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)


class DesiredModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = Field(ge=1)
    artifact: Artifact | None = None
    allow_signature_change: bool = False
    rollout: str = ""
    health_window_s: float = Field(default=0.0, ge=0, le=7 * 86400, description="watch the new version this long")
    shadow_s: float = Field(
        default=0.0, ge=0, le=7 * 86400, description="mirror live requests to the new version this long first"
    )
    min_agreement: float | None = Field(
        default=None, ge=0, le=1, description="the shadow check's lowest top-1 agreement that lets the switch happen"
    )


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
    target: int | None = Field(default=None, description="the version an update is bringing, if any")
    rollout: str = ""
    progress: dict[str, int] | None = Field(default=None, description="chunks held and chunks in all")
    shadow: dict[str, Any] | None = Field(
        default=None,
        description='the shadow check: {"metric": "top1" | "max_abs_diff", "value": float, "requests": int, '
        '"source": "live" | "golden"}',
    )


class Reported(_Message):
    seq: int = Field(ge=0, description="grows with every report of this agent's process and across restarts")
    desired_generation: int | None = None
    models: dict[str, ReportedModel] = Field(default_factory=dict)


class ChunkRequest(_Message):
    artifact: str = Field(pattern=r"^[0-9a-f]{64}$")
    chunk_size: int = Field(ge=MIN_CHUNK, le=MAX_CHUNK)
    chunks: list[int] = Field(min_length=1, max_length=MAX_WINDOW)


#: Sequence numbers one Ack may name.
MAX_ACK = 1000
_KIND_NAME = r"^[a-z_]{1,32}$"


class OutputSummary(BaseModel):
    """A model version's outputs in the interval (livestats.py): a class histogram, or per-output
    numeric figures (count, mean, std, min, max, quantiles)."""

    model_config = ConfigDict(extra="ignore")

    kind: str = Field(pattern="^(classes|numeric)$")
    requests: int = Field(ge=0)
    classes: dict[str, int] | None = Field(default=None, max_length=4096)
    outputs: dict[str, dict[str, Any]] | None = Field(default=None, max_length=64)


#: Counts and versions fit a 32-bit database column; sequence numbers a 64-bit one.
INT32 = 2**31 - 1
INT64 = 2**63 - 1


class TelemetryModel(BaseModel):
    """One model version's figures over one interval (livestats.Window.take)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1, le=INT32)
    interval_start: float
    interval_end: float
    requests: int = Field(ge=0, le=INT32)
    errors: int = Field(ge=0, le=INT32)
    errors_by_kind: dict[str, int] = Field(default_factory=dict, max_length=16)
    rejected: int = Field(ge=0, le=INT32)
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    engine_p50_ms: float | None = Field(default=None, ge=0, description="the engine's time per batch")
    engine_p95_ms: float | None = Field(default=None, ge=0)
    rows: int = Field(default=0, ge=0, le=INT64)
    rows_per_s: float = Field(default=0.0, ge=0)
    batch_sizes: dict[str, int] = Field(default_factory=dict, max_length=1100)
    queue_depth: int = Field(default=0, ge=0)
    outputs: OutputSummary | None = None
    feedback: dict[str, Any] | None = Field(
        default=None, description="live accuracy from ground-truth feedback (count, correct, accuracy or mae)"
    )


class DeviceError(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: str = Field(max_length=1000)
    count: int = Field(ge=1)
    last: float


class DeviceStats(BaseModel):
    """The device's own figures over one interval; a field the OS does not show is null."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    interval_start: float
    interval_end: float
    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    process_rss_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    temperature_c: float | None = None
    uptime_s: float | None = None
    runtime_version: str = ""
    agent_state: str = ""
    errors: list[DeviceError] = Field(default_factory=list, max_length=20)
    queue: dict[str, int] = Field(
        default_factory=dict, description="the telemetry queue: messages and bytes held, dropped so far"
    )


class Telemetry(_Message):
    """One telemetry message: ``kind`` "model" carries ``model``, "device" carries ``device``."""

    seq: int = Field(ge=1, le=INT64, description="per device, grows by one per message, kept across restarts")
    kind: str = Field(pattern="^(model|device)$")
    model: TelemetryModel | None = None
    device: DeviceStats | None = None

    @model_validator(mode="after")
    def _one_body(self) -> Telemetry:
        if (self.kind == "model") != (self.model is not None) or (self.kind == "device") != (self.device is not None):
            msg = f"a {self.kind!r} telemetry message carries exactly the {self.kind!r} field"
            raise ValueError(msg)
        return self


#: Telemetry messages one Batch may carry.
MAX_BATCH = 1000


def decode_telemetry(payload: bytes, topic: str = "") -> list[tuple[Telemetry | ProtocolError, dict[str, Any]]]:
    """A telemetry payload: one Telemetry message, or a Batch ``{"schema": 1, "batch": [...]}`` of
    them. Each item is checked on its own (its message, or the ProtocolError saying what is wrong
    with it, and its JSON); a payload that is not one of the two shapes raises ProtocolError."""
    where = f"{topic}: " if topic else ""
    raw = _parse_object(payload, where)
    items = raw.get("batch") if "batch" in raw else [raw]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        msg = f"{where}batch must be a list of 1 to {MAX_BATCH} telemetry messages"
        raise ProtocolError(msg)
    out: list[tuple[Telemetry | ProtocolError, dict[str, Any]]] = []
    for i, item in enumerate(items):
        at = f"{where}batch[{i}]: " if "batch" in raw else where
        if not isinstance(item, dict):
            out.append((ProtocolError(f"{at}a telemetry message must be a JSON object"), {}))
            continue
        try:
            out.append((_check(Telemetry, item, at), item))
        except ProtocolError as e:
            out.append((e, item))
    return out


class Ack(_Message):
    """The hub stored these sequence numbers of the device's telemetry (or had stored them before)."""

    seqs: list[int] = Field(min_length=1, max_length=MAX_ACK)


@dataclass(frozen=True)
class Chunk:
    """One chunk frame: which artifact, which index, its bytes (``error`` when the hub refuses)."""

    artifact: str
    index: int
    data: bytes
    error: str = ""


def encode_chunk(artifact: str, index: int, data: bytes, *, error: str = "") -> bytes:
    """A chunk frame: a 4-byte big-endian header length, the JSON header (schema, artifact, index,
    the chunk's sha256, or an error), then the raw bytes: no base64, the payload is binary."""
    header: dict[str, Any] = {"schema": SCHEMA, "artifact": artifact, "index": index}
    if error:
        header["error"] = error
    else:
        header["sha256"] = hashlib.sha256(data).hexdigest()
    raw = json.dumps(header, separators=(",", ":")).encode()
    return len(raw).to_bytes(4, "big") + raw + data


def decode_chunk(payload: bytes, topic: str = "") -> Chunk:
    """Parse a chunk frame and check its bytes against the sha256 in its header."""
    where = f"{topic}: " if topic else ""
    if len(payload) < 4:
        raise ProtocolError(f"{where}chunk frame of {len(payload)} bytes is too short")
    n = int.from_bytes(payload[:4], "big")
    if n > _FRAME_HEADER_MAX or 4 + n > len(payload):
        raise ProtocolError(f"{where}chunk frame header length {n} does not fit the frame")
    try:
        header = json.loads(payload[4 : 4 + n])
        artifact, index = str(header["artifact"]), int(header["index"])
        schema = int(header.get("schema", SCHEMA))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{where}chunk frame header unreadable ({e})") from None
    if schema > SCHEMA:
        raise ProtocolError(f"{where}chunk frame schema {schema} is newer than this side's ({SCHEMA})")
    data = bytes(payload[4 + n :])
    if header.get("error"):
        return Chunk(artifact, index, b"", str(header["error"]))
    if hashlib.sha256(data).hexdigest() != header.get("sha256"):
        raise ProtocolError(f"{where}chunk {index} of {artifact[:12]} does not match its sha256 (corrupted in transit)")
    return Chunk(artifact, index, data)


M = TypeVar("M", bound=_Message)


def encode(message: _Message) -> bytes:
    return json.dumps(message.model_dump(mode="json", by_alias=True), separators=(",", ":")).encode()


def decode(kind: type[M], payload: bytes, topic: str = "") -> M:
    """Parse and check one payload; ProtocolError says what is wrong with it."""
    return decode_with_raw(kind, payload, topic)[0]


def decode_with_raw(kind: type[M], payload: bytes, topic: str = "") -> tuple[M, dict[str, Any]]:
    """``decode``, and the parsed JSON object too (the hub stores it as it came)."""
    where = f"{topic}: " if topic else ""
    raw = _parse_object(payload, where)
    return _check(kind, raw, where), raw


def _parse_object(payload: bytes, where: str) -> dict[str, Any]:
    """The payload's JSON object: not over the size cap, JSON (orjson refuses NaN and Infinity, which
    JSON has not, where Python's json reads them), an object."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        msg = f"{where}payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
        raise ProtocolError(msg)
    try:
        raw: Any = orjson.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"{where}payload is not JSON ({e})"
        raise ProtocolError(msg) from None
    if not isinstance(raw, dict):
        msg = f"{where}payload must be a JSON object, not {type(raw).__name__}"
        raise ProtocolError(msg)
    return raw


def _check(kind: type[M], raw: dict[str, Any], where: str) -> M:
    """``raw`` as a ``kind`` message: not of a newer schema, of the right shape."""
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
