"""The hub's telemetry side: devices' messages ingested into the store exactly once, acknowledged by
sequence number after they are committed, and read back for `edgekit fleet`, the exports and the
dashboard.

Ingestion (``Ingestor``): one MQTT client subscribed to ``P/devices/+/telemetry`` (or, for several
worker processes on one database, the shared subscription ``$share/GROUP/P/devices/+/telemetry``:
the broker hands each message to one worker of the group). paho's callback only enqueues; one
thread takes up to BATCH messages at a time, checks them (a bad one is counted by reason and
dropped, never a crash), inserts them in one transaction with ON CONFLICT DO NOTHING on (device,
seq), updates the newest row per device and model, commits, and then publishes one Ack per device
naming every sequence number of the batch that is now stored, new or duplicate. A device forgets
a message only on that Ack, so what the broker drops (a hub down longer than the broker's queue
holds) is sent again, and the key makes the second copy harmless: stored exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from edgekit.hub import schema
from edgekit.hub.drift import DriftSettings, DriftTracker, Reference, reference_from_manifest
from edgekit.hub.store import Store
from edgekit_runtime.agent.link import BrokerAddress, Link
from edgekit_runtime.agent.protocol import (
    ID_PATTERN,
    MAX_ACK,
    Ack,
    ProtocolError,
    Telemetry,
    check_device_id,
    check_prefix,
    decode_telemetry,
    encode,
)
from edgekit_runtime.errors import InvalidInputError

__all__ = ["BATCH", "IngestStats", "Ingestor", "telemetry_row"]

log = logging.getLogger("edgekit.hub")

#: Messages taken into one transaction at most.
BATCH = 2000
#: Messages waiting for the ingestion thread at most; past it paho's thread waits (TCP backpressure).
QUEUE = 50_000
#: Seconds after which a model version without validation figures on the hub is looked up again.
REF_RETRY_S = 60.0


@dataclass
class IngestStats:
    publishes: int = 0  # MQTT messages (a batch carries several telemetry messages)
    received: int = 0  # telemetry messages
    stored: int = 0
    duplicates: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    acks_sent: int = 0
    transactions: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "publishes": self.publishes,
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "bad": dict(self.bad),
            "acks_sent": self.acks_sent,
            "transactions": self.transactions,
            "failures": self.failures,
        }


def check_group(group: str) -> str:
    """A shared subscription's name: a topic level, no wildcards (the device ids' rule)."""
    if not ID_PATTERN.match(group):
        msg = f"group {group!r}: give 1-64 letters, digits or ._- (a topic level), e.g. edgekit-ingest"
        raise InvalidInputError(msg)
    return group


def _bad_reason(message: str) -> str:
    if "over the" in message and "limit" in message:
        return "too_big"
    if "not JSON" in message or "JSON object" in message:
        return "not_json"
    if "newer than" in message:
        return "newer_schema"
    return "invalid"


def telemetry_row(device: str, msg: Telemetry, received_at: float, body: dict[str, Any]) -> dict[str, Any]:
    """The ``telemetry`` table's row of one checked message."""
    if msg.model is not None:
        m = msg.model
        return {
            "device_id": device,
            "seq": msg.seq,
            "kind": "model",
            "model": m.model,
            "version": m.version,
            "interval_start": m.interval_start,
            "interval_end": m.interval_end,
            "requests": m.requests,
            "errors": m.errors,
            "rejected": m.rejected,
            "p50_ms": m.p50_ms,
            "p95_ms": m.p95_ms,
            "p99_ms": m.p99_ms,
            "rows_per_s": m.rows_per_s,
            "received_at": received_at,
            "body": body,
        }
    d = msg.device
    assert d is not None  # the message's validator: kind "device" carries it
    return {
        "device_id": device,
        "seq": msg.seq,
        "kind": "device",
        "model": "",
        "version": None,
        "interval_start": d.interval_start,
        "interval_end": d.interval_end,
        "requests": 0,
        "errors": 0,
        "rejected": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "rows_per_s": 0.0,
        "received_at": received_at,
        "body": body,
    }


def _insert(conn: Connection, table: sa.Table) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def store_rows(
    conn: Connection, rows: list[dict[str, Any]], drift: dict[tuple[str, str], dict[str, Any]] | None = None
) -> set[tuple[str, int]]:
    """Insert telemetry rows once each; returns the (device, seq) that were new. Updates the newest
    row per device and model with the new ones, and with ``drift``'s verdicts per (device, model)."""
    if not rows:
        return set()
    if conn.dialect.name == "postgresql":
        return _store_rows_pg(conn, rows, drift)
    t = schema.telemetry
    stmt = _insert(conn, t).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    new = {(r[0], int(r[1])) for r in conn.execute(stmt.returning(t.c.device_id, t.c.seq), rows)}
    newest = _newest(rows, new)
    if newest:
        lt = schema.telemetry_latest
        cols = ("version", "seq", "interval_start", "interval_end", "requests", "errors", "rejected")
        latest = [
            {
                "device_id": r["device_id"],
                "model": r["model"],
                **{c: r[c] for c in cols},
                "p95_ms": r["p95_ms"],
                "rows_per_s": r["rows_per_s"],
                "received_at": r["received_at"],
                "body": r["body"],
                "drift": drift.get((r["device_id"], r["model"])) if drift else None,
            }
            for r in newest.values()
        ]
        up = _insert(conn, lt)
        excluded = up.excluded
        values = {c.name: excluded[c.name] for c in lt.columns if c.name not in ("device_id", "model", "drift")}
        # no verdict in this batch (too little data): the last one stands, unless the version changed
        values["drift"] = sa.case(
            (lt.c.version.is_distinct_from(excluded.version), excluded.drift),
            else_=sa.func.coalesce(excluded.drift, lt.c.drift),
        )
        up = up.on_conflict_do_update(index_elements=["device_id", "model"], set_=values, where=lt.c.seq < excluded.seq)
        conn.execute(up, latest)
    return new


def _newest(rows: list[dict[str, Any]], new: set[tuple[str, int]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Of the rows just stored, the newest per (device, model)."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if (r["device_id"], r["seq"]) not in new:
            continue
        key = (r["device_id"], r["model"])
        if key not in newest or newest[key]["seq"] < r["seq"]:
            newest[key] = r
    return newest


_T_COLS = [c.name for c in schema.telemetry.columns]
_L_COLS = [c.name for c in schema.telemetry_latest.columns]
_JSON_COLS = {"body", "drift"}


def _values(cols: list[str]) -> str:
    return ", ".join("%s::json" if c in _JSON_COLS else "%s" for c in cols)


_PG_INSERT = (
    f"INSERT INTO telemetry ({', '.join(_T_COLS)}) VALUES ({_values(_T_COLS)}) "  # noqa: S608 - column names only
    "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq"
)
_PG_LATEST = (
    f"INSERT INTO telemetry_latest ({', '.join(_L_COLS)}) VALUES ({_values(_L_COLS)}) "  # noqa: S608 - as above
    "ON CONFLICT (device_id, model) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _L_COLS if c not in ("device_id", "model", "drift"))
    + ", drift = CASE WHEN telemetry_latest.version IS DISTINCT FROM EXCLUDED.version THEN EXCLUDED.drift "
    "ELSE COALESCE(EXCLUDED.drift, telemetry_latest.drift) END WHERE telemetry_latest.seq < EXCLUDED.seq"
)


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _store_rows_pg(
    conn: Connection, rows: list[dict[str, Any]], drift: dict[tuple[str, str], dict[str, Any]] | None
) -> set[tuple[str, int]]:
    """store_rows on PostgreSQL: psycopg's executemany in pipeline mode with one short statement (the
    generic path's multi-VALUES statements of thousands of placeholders cost psycopg more to parse
    than the database to run), in the transaction the caller opened."""
    raw = conn.connection.driver_connection
    assert raw is not None
    params = [tuple(_json_text(r[c]) if c in _JSON_COLS else r[c] for c in _T_COLS) for r in rows]
    new: set[tuple[str, int]] = set()
    with raw.cursor() as cur:
        cur.executemany(_PG_INSERT, params, returning=True)
        while True:
            new.update((d, int(s)) for d, s in cur.fetchall())
            if not cur.nextset():
                break
        newest = _newest(rows, new)
        if newest:
            latest = []
            for r in newest.values():
                row = {**r, "drift": drift.get((r["device_id"], r["model"])) if drift else None}
                latest.append(tuple(_json_text(row[c]) if c in _JSON_COLS else row[c] for c in _L_COLS))
            cur.executemany(_PG_LATEST, latest)
    return new


class Ingestor:
    """Telemetry from MQTT into ``store``. ``group``: join the shared subscription of that name
    (several ingestion processes on one database); None: a plain subscription."""

    def __init__(
        self,
        store: Store,
        broker: BrokerAddress,
        *,
        prefix: str = "edgekit",
        group: str | None = None,
        link_options: dict[str, Any] | None = None,
        client_id: str | None = None,
        drift: DriftSettings | None = None,
    ) -> None:
        self.store = store
        self.prefix = check_prefix(prefix)
        self.group = group
        self.stats = IngestStats()
        self.drift = DriftTracker(drift)
        self._profiles: dict[str, str] = {}
        self._refs: dict[tuple[str, int], tuple[float, dict[str, Reference | None]]] = {}
        self._queue: queue.Queue[tuple[str, bytes, float]] = queue.Queue(QUEUE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.link = Link(
            broker,
            client_id=client_id or f"edgekit-ingest-{secrets.token_hex(4)}",
            max_inflight=1000,
            mqtt5=group is not None,
            **(link_options or {}),
        )
        topic = f"{self.prefix}/devices/+/telemetry"
        #: what the link subscribes to: the telemetry of every device, or the group's share of it
        self.subscription = f"$share/{group}/{topic}" if group else topic
        self.link.subscribe(self.subscription, self._on_message)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="edgekit-hub-ingest", daemon=True)
        self._thread.start()
        self.link.start()

    def stop(self) -> None:
        """Stop taking messages, store what was taken (and ack it), then stop."""
        self.link.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def wait_connected(self, timeout: float) -> bool:
        return self.link.wait_connected(timeout)

    # -- paho's thread ----------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._queue.put((topic, payload, time.time()))

    # -- the ingestion thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            items = [first]
            while len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.ingest(items)
            except Exception:  # the database failed: the devices send these again (no ack went out)
                self.stats.failures += 1
                log.exception("telemetry: storing %d message(s) failed; the devices will send them again", len(items))
                time.sleep(0.5)

    def _device_of(self, topic: str) -> str:
        base = f"{self.prefix}/devices/"
        if not topic.startswith(base) or not topic.endswith("/telemetry"):
            raise ProtocolError(f"{topic}: not a telemetry topic")
        try:
            return check_device_id(topic[len(base) : -len("/telemetry")])
        except InvalidInputError as e:  # a level '+' matched that is no device id: a bad message, not a failure
            raise ProtocolError(f"{topic}: {e.message}") from None

    def _reference(self, conn: Connection, device: str, model: str, version: int) -> Reference | None:
        """The validation figures of ``model`` v``version`` for the device's profile (any profile's
        when the device's has no bundle); looked up again a minute after a miss (a later push)."""
        now = time.monotonic()
        cached = self._refs.get((model, version))
        if cached is None or (not cached[1] and now - cached[0] > REF_RETRY_S):
            b = schema.bundles
            rows = conn.execute(
                sa.select(b.c.profile, b.c.manifest).where(b.c.name == model, b.c.version == version)
            ).all()
            cached = (now, {r.profile: reference_from_manifest(r.manifest or {}) for r in rows})
            self._refs[(model, version)] = cached
        refs = cached[1]
        if not refs:
            return None
        if device not in self._profiles:
            d = schema.devices
            self._profiles[device] = conn.execute(sa.select(d.c.profile).where(d.c.id == device)).scalar() or ""
        return refs.get(self._profiles[device]) or next((r for r in refs.values() if r is not None), None)

    def _judge(self, conn: Connection, rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The drift tracker's verdicts of this batch's model rows (the newest per device and model)."""
        verdicts: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            if r["kind"] != "model":
                continue
            fig = r["body"].get("model", {})
            verdict = self.drift.judge(
                r["device_id"], fig, self._reference(conn, r["device_id"], r["model"], r["version"])
            )
            if verdict is not None:
                verdicts[(r["device_id"], r["model"])] = verdict
        return verdicts

    def _folded(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        """The compacted watermark of the batch's devices (none for most: only where a backlog older
        than the retention arrives)."""
        devices = sorted({r["device_id"] for r in rows})
        m = schema.telemetry_compacted
        with self.store.read() as tx:
            return {
                d: int(s)
                for d, s in tx.conn.execute(sa.select(m.c.device_id, m.c.seq).where(m.c.device_id.in_(devices)))
            }

    def _one_by_one(
        self, rows: list[dict[str, Any]], verdicts: dict[tuple[str, str], dict[str, Any]]
    ) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
        new: set[tuple[str, int]] = set()
        refused: set[tuple[str, int]] = set()
        for r in rows:
            key = (r["device_id"], r["seq"])
            try:
                with self.store.begin() as tx:
                    new |= store_rows(tx.conn, [r], verdicts)
            except DBAPIError as e:
                refused.add(key)
                self.stats.bad["unstorable"] += 1
                reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
                log.warning("telemetry from %s seq %d: the database refused it (%s); dropped", key[0], key[1], reason)
        return new, refused

    def ingest(self, items: Iterable[tuple[str, bytes, float]]) -> dict[str, list[int]]:
        """Check, store and acknowledge one batch; returns the sequence numbers acked per device."""
        rows: list[dict[str, Any]] = []
        for topic, payload, received_at in items:
            self.stats.publishes += 1
            try:
                device = self._device_of(topic)
                decoded = decode_telemetry(payload, topic)  # one message or a batch; refuses NaN, Infinity
            except ProtocolError as e:
                self.stats.received += 1
                self.stats.bad[_bad_reason(e.message)] += 1
                log.warning("ignored a telemetry message: %s", e.message)
                continue
            for msg, body in decoded:
                self.stats.received += 1
                if isinstance(msg, ProtocolError):
                    self.stats.bad[_bad_reason(msg.message)] += 1
                    log.warning("ignored a telemetry message: %s", msg.message)
                    continue
                rows.append(telemetry_row(device, msg, received_at, body))
        if not rows:
            return {}
        # the same (device, seq) twice in one batch: one row (the database would refuse the pair)
        unique = list({(r["device_id"], r["seq"]): r for r in rows}.values())
        unique.sort(key=lambda r: (r["device_id"], r["seq"]))
        folded = self._folded(unique)  # copies of rows already folded into minutes: duplicates
        fresh = [r for r in unique if r["seq"] > folded.get(r["device_id"], 0)]
        verdicts: dict[tuple[str, str], dict[str, Any]] = {}
        refused: set[tuple[str, int]] = set()
        try:
            with self.store.begin() as tx:
                verdicts = self._judge(tx.conn, fresh)
                new = store_rows(tx.conn, fresh, verdicts)
        except DBAPIError:
            # one row the database refuses must not cost the batch: store them one by one, and drop
            # what still cannot be stored (counted, and acknowledged so the device stops sending it)
            new, refused = self._one_by_one(fresh, verdicts)
        self.stats.transactions += 1
        self.stats.stored += len(new)
        self.stats.duplicates += len(rows) - len(new) - len(refused)
        acks: dict[str, list[int]] = {}
        for r in unique:
            acks.setdefault(r["device_id"], []).append(r["seq"])
        for device, seqs in acks.items():
            for i in range(0, len(seqs), MAX_ACK):
                with contextlib.suppress(ValueError, RuntimeError):
                    self.link.publish(f"{self.prefix}/devices/{device}/acks", encode(Ack(seqs=seqs[i : i + MAX_ACK])))
                    self.stats.acks_sent += 1
        return acks


# -- reading --------------------------------------------------------------------------------------

#: The columns of `edgekit telemetry export` and GET /v1/telemetry, in order.
EXPORT_COLUMNS = (
    "device",
    "model",
    "version",
    "seq",
    "interval_start",
    "interval_end",
    "requests",
    "errors",
    "rejected",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "rows",
    "rows_per_s",
    "queue_depth",
    "errors_by_kind",
)
MAX_PAGE = 10_000


def _rate(requests: int, start: float, end: float) -> float:
    return round(requests / (end - start), 3) if end > start else 0.0


def fleet_rows(conn: Connection) -> list[dict[str, Any]]:
    """One row per device and model it runs (a device with none: one row, model None): what
    `edgekit fleet` shows, from the devices, their reported state and their newest telemetry."""
    d, dm, lt = schema.devices, schema.device_models, schema.telemetry_latest
    models: dict[str, dict[str, Any]] = {}
    for r in conn.execute(sa.select(dm.c.device_id, dm.c.model, dm.c.active_version, dm.c.state)):
        models.setdefault(r.device_id, {})[r.model] = {"version": r.active_version, "state": r.state}
    latest: dict[str, dict[str, Any]] = {}
    for r in conn.execute(sa.select(lt)):
        latest.setdefault(r.device_id, {})[r.model] = r._mapping
    out = []
    for dev in conn.execute(sa.select(d).order_by(d.c.id)):
        tele = latest.get(dev.id, {})
        seen = [t for t in (dev.last_seen, *(x["received_at"] for x in tele.values())) if t is not None]
        base = {
            "device": dev.id,
            "labels": dict(dev.labels),
            "profile": dev.profile,
            "online": bool(dev.online),
            "last_seen": max(seen) if seen else None,
        }
        names = sorted(set(models.get(dev.id, {})) | {m for m in tele if m})
        if not names:
            out.append({**base, "model": None, "version": None, "state": None, "p95_ms": None, "req_per_s": None,
                        "error_pct": None, "interval_end": None, "drift": None, "drift_reasons": []})  # fmt: skip
        for name in names:
            rep = models.get(dev.id, {}).get(name, {})
            t = tele.get(name)
            row = {**base, "model": name, "version": rep.get("version"), "state": rep.get("state")}
            if t is None:
                row.update(p95_ms=None, req_per_s=None, error_pct=None, interval_end=None, drift=None, drift_reasons=[])
            else:
                row.update(
                    version=row["version"] if row["version"] is not None else t["version"],
                    telemetry_version=t["version"],
                    p95_ms=t["p95_ms"],
                    req_per_s=_rate(t["requests"], t["interval_start"], t["interval_end"]),
                    error_pct=round(100.0 * t["errors"] / t["requests"], 3) if t["requests"] else 0.0,
                    interval_end=t["interval_end"],
                    drift=bool(t["drift"]["drift"]) if t["drift"] else None,
                    drift_reasons=list(t["drift"]["reasons"]) if t["drift"] else [],
                )
            out.append(row)
    return out


def export_rows(
    conn: Connection,
    *,
    device: str | None = None,
    since: float | None = None,
    after: tuple[str, int] | None = None,
    limit: int = MAX_PAGE,
) -> list[dict[str, Any]]:
    """The model telemetry rows in (device, seq) order after ``after``: one per device, model,
    version and interval, with EXPORT_COLUMNS."""
    t = schema.telemetry
    q = sa.select(t).where(t.c.kind == "model").order_by(t.c.device_id, t.c.seq).limit(limit)
    if device is not None:
        q = q.where(t.c.device_id == device)
    if since is not None:
        q = q.where(t.c.interval_end >= since)
    if after is not None:
        q = q.where(sa.tuple_(t.c.device_id, t.c.seq) > sa.tuple_(sa.literal(after[0]), sa.literal(after[1])))
    rows = []
    for r in conn.execute(q):
        body = r.body.get("model", {}) if isinstance(r.body, dict) else {}
        rows.append(
            {
                "device": r.device_id,
                "model": r.model,
                "version": r.version,
                "seq": r.seq,
                "interval_start": r.interval_start,
                "interval_end": r.interval_end,
                "requests": r.requests,
                "errors": r.errors,
                "rejected": r.rejected,
                "p50_ms": r.p50_ms,
                "p95_ms": r.p95_ms,
                "p99_ms": r.p99_ms,
                "rows": int(body.get("rows", 0)),
                "rows_per_s": r.rows_per_s,
                "queue_depth": int(body.get("queue_depth", 0)),
                "errors_by_kind": json.dumps(body.get("errors_by_kind", {}), sort_keys=True, separators=(",", ":")),
            }
        )
    return rows


def device_history(conn: Connection, device: str, *, limit: int = 120) -> dict[str, Any]:
    """A device's newest ``limit`` intervals per model (oldest first) and its newest device message."""
    t = schema.telemetry
    q = sa.select(t).where(t.c.device_id == device).order_by(t.c.seq.desc()).limit(limit * 8)
    per_model: dict[str, list[dict[str, Any]]] = {}
    device_msg: dict[str, Any] | None = None
    for r in conn.execute(q):
        body = r.body if isinstance(r.body, dict) else {}
        if r.kind == "device":
            if device_msg is None:
                device_msg = {"seq": r.seq, "received_at": r.received_at, **body.get("device", {})}
            continue
        items = per_model.setdefault(f"{r.model}", [])
        if len(items) < limit:
            m = body.get("model", {})
            items.append({"seq": r.seq, "version": r.version, **{k: m.get(k) for k in (
                "interval_start", "interval_end", "requests", "errors", "rejected", "p50_ms", "p95_ms", "p99_ms",
                "rows_per_s", "queue_depth", "errors_by_kind", "batch_sizes", "outputs", "feedback")}})  # fmt: skip
    return {
        "device": device,
        "models": {name: list(reversed(items)) for name, items in sorted(per_model.items())},
        "latest_device": device_msg,
    }


# -- retention ------------------------------------------------------------------------------------

#: Raw rows are kept this long by default (`edgekit hub serve --telemetry-retention`).
DEFAULT_RETENTION_S = 86400.0
#: A raw row is folded only once it was received this long ago: a copy still on its way (a device's
#: resend after 15 s without an ack) then finds its row, not a gap.
SETTLE_S = 600.0
#: Rows folded per transaction at most.
COMPACT_BATCH = 20_000


def compact(conn: Connection, *, now: float, retention_s: float, limit: int = COMPACT_BATCH) -> int:
    """Fold raw rows whose interval ended more than ``retention_s`` ago into per-minute aggregates
    (telemetry_minutes: requests, errors, rejected and rows summed, the worst p50/p95/p99 of the
    minute's intervals), delete them, and raise each device's compacted watermark. Device messages
    past the retention are deleted. Returns how many raw rows went."""
    t, mins, mark = schema.telemetry, schema.telemetry_minutes, schema.telemetry_compacted
    cutoff, settled = now - retention_s, now - SETTLE_S
    rows = conn.execute(
        sa.select(
            t.c.device_id,
            t.c.seq,
            t.c.kind,
            t.c.model,
            t.c.version,
            t.c.interval_end,
            t.c.requests,
            t.c.errors,
            t.c.rejected,
            t.c.p50_ms,
            t.c.p95_ms,
            t.c.p99_ms,
            t.c.body,
        )
        .where(t.c.interval_end < cutoff, t.c.received_at < settled)
        .order_by(t.c.device_id, t.c.seq)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    agg: dict[tuple[str, str, int, float], dict[str, Any]] = {}
    top: dict[str, int] = {}
    for r in rows:
        top[r.device_id] = max(top.get(r.device_id, 0), int(r.seq))
        if r.kind != "model":
            continue
        minute = float(int(r.interval_end // 60) * 60)
        a = agg.setdefault((r.device_id, r.model, int(r.version or 0), minute), {
            "intervals": 0, "requests": 0, "errors": 0, "rejected": 0, "rows": 0,
            "p50_ms": None, "p95_ms": None, "p99_ms": None})  # fmt: skip
        a["intervals"] += 1
        for k in ("requests", "errors", "rejected"):
            a[k] += int(getattr(r, k))
        a["rows"] += int((r.body or {}).get("model", {}).get("rows", 0)) if isinstance(r.body, dict) else 0
        for k in ("p50_ms", "p95_ms", "p99_ms"):
            v = getattr(r, k)
            if v is not None and (a[k] is None or v > a[k]):
                a[k] = v
    if agg:
        up = _insert(conn, mins)
        ex = up.excluded
        sums = {k: mins.c[k] + ex[k] for k in ("intervals", "requests", "errors", "rejected", "rows")}
        worst = {k: sa.func.coalesce(sa.case((ex[k] > mins.c[k], ex[k]), else_=mins.c[k]), ex[k], mins.c[k])
                 for k in ("p50_ms", "p95_ms", "p99_ms")}  # fmt: skip
        up = up.on_conflict_do_update(
            index_elements=["device_id", "model", "version", "minute"], set_={**sums, **worst}
        )
        conn.execute(up, [{"device_id": d, "model": m, "version": v, "minute": minute, **a}
                          for (d, m, v, minute), a in agg.items()])  # fmt: skip
    wm = _insert(conn, mark)
    wm = wm.on_conflict_do_update(
        index_elements=["device_id"],
        set_={"seq": sa.case((wm.excluded.seq > mark.c.seq, wm.excluded.seq), else_=mark.c.seq)},
    )
    conn.execute(wm, [{"device_id": d, "seq": s} for d, s in top.items()])
    for d, s in top.items():
        conn.execute(t.delete().where(t.c.device_id == d, t.c.seq <= s, t.c.interval_end < cutoff,
                                      t.c.received_at < settled))  # fmt: skip
    return len(rows)


class Compactor:
    """Runs ``compact`` every ``every_s`` seconds in a thread of `edgekit hub serve`."""

    def __init__(self, store: Store, *, retention_s: float = DEFAULT_RETENTION_S, every_s: float = 60.0) -> None:
        self.store = store
        self.retention_s = retention_s
        self.every_s = every_s
        self.folded = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgekit-hub-compact", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def run_once(self, now: float | None = None) -> int:
        total = 0
        while True:
            with self.store.begin() as tx:
                n = compact(tx.conn, now=time.time() if now is None else now, retention_s=self.retention_s)
            total += n
            if n < COMPACT_BATCH:
                break
        self.folded += total
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                n = self.run_once()
                if n:
                    log.info("telemetry: folded %d raw row(s) older than the retention into minutes", n)
            except Exception:  # the next round tries again
                log.exception("telemetry: compacting failed")
