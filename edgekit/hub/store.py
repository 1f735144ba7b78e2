"""The hub's database: one engine (SQLite in WAL mode, or PostgreSQL) and the queries the registry,
the device link and the rollouts need, as typed records. Transport-free: no HTTP, no MQTT here.

Use ``with store.begin() as tx:`` for everything that must hold together (check, then write):
on SQLite each transaction starts with ``BEGIN IMMEDIATE`` so two writers never both pass a check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from edgekit.errors import InvalidInputError, MissingDependencyError
from edgekit.hub import schema
from edgekit.hub.migrations import MIGRATIONS, Migration, migrate
from edgekit_runtime.errors import UnavailableError

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "DB_FILE",
    "BundleRecord",
    "DeviceModelRecord",
    "DeviceRecord",
    "Store",
    "Tx",
    "database_url",
]

DB_FILE = "hub.db"
_READ_ONLY = "edgekit_read_only"
#: Rollout states in which a rollout still targets its version (a delete waits for them to end).
ACTIVE_ROLLOUT_STATES = ("running", "paused")


@dataclass(frozen=True)
class BundleRecord:
    name: str
    version: int
    profile: str
    sha256: str
    size_bytes: int
    format: str
    quantization: str
    model_size_bytes: int
    signer: str
    uploaded_at: float
    manifest: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class DeviceModelRecord:
    model: str
    active: int | None
    state: str
    reason: str
    detail: dict[str, Any]
    updated_at: float
    previous: int | None = None  # the version it ran before ``active`` (what a rollback goes back to)


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    profile: str
    labels: dict[str, str]
    online: bool
    last_seen: float | None
    registered_at: float
    models: dict[str, DeviceModelRecord]


def database_url(db: str | None, data: Path) -> str:
    """The SQLAlchemy URL for ``--db``: SQLite in DATA by default; ``postgresql://`` uses psycopg 3."""
    if not db:
        return f"sqlite:///{data.resolve() / DB_FILE}"
    try:
        url = make_url(db)
    except ArgumentError:
        msg = f"--db {db!r} is not a database URL; give postgresql://USER@HOST:PORT/DB or sqlite:///PATH"
        raise InvalidInputError(msg) from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.drivername not in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        msg = f"--db: {url.drivername!r} databases are not supported; give postgresql://... or sqlite:///PATH"
        raise InvalidInputError(msg)
    return url.render_as_string(hide_password=False)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _engine(url: str) -> Engine:
    try:
        # JSON columns through orjson (telemetry writes tens of thousands of them a second); it
        # refuses NaN, as the protocol does
        engine = sa.create_engine(
            url, pool_pre_ping=url.startswith("postgresql"), json_serializer=_json_dumps, json_deserializer=orjson.loads
        )
    except (NoSuchModuleError, ModuleNotFoundError) as e:
        msg = f"a PostgreSQL --db needs the psycopg driver ({e}): pip install 'edgekit-ml[postgresql]'"
        raise MissingDependencyError(msg) from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def _sqlite_setup(engine: Engine) -> None:
    """WAL (readers never block the writer), foreign keys on, a wait instead of 'database is locked',
    and transactions SQLAlchemy begins itself (pysqlite's own defers BEGIN, so a check-then-write
    could interleave; DDL would not be transactional)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=10000", "synchronous=FULL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # a reader (Store.read) takes no write lock: in WAL mode it never waits for the writer
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")


def _bundle(row: sa.Row[Any]) -> BundleRecord:
    m = row._mapping
    return BundleRecord(
        name=m["name"],
        version=m["version"],
        profile=m["profile"],
        sha256=m["sha256"],
        size_bytes=m["size_bytes"],
        format=m["format"],
        quantization=m["quantization"],
        model_size_bytes=m["model_size_bytes"],
        signer=m["signer"],
        uploaded_at=m["uploaded_at"],
        manifest=m["manifest"],
    )


class Tx:
    """The queries, inside one transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- bundles --------------------------------------------------------------------------------

    def bundle(self, name: str, version: int, profile: str) -> BundleRecord | None:
        b = schema.bundles
        row = self.conn.execute(
            sa.select(b).where(b.c.name == name, b.c.version == version, b.c.profile == profile)
        ).first()
        return None if row is None else _bundle(row)

    def bundles(self, name: str | None = None, version: int | None = None) -> list[BundleRecord]:
        b = schema.bundles
        query = sa.select(b).order_by(b.c.name, b.c.version, b.c.profile)
        if name is not None:
            query = query.where(b.c.name == name)
        if version is not None:
            query = query.where(b.c.version == version)
        return [_bundle(r) for r in self.conn.execute(query)]

    def add_bundle(self, rec: BundleRecord) -> None:
        self.conn.execute(
            schema.bundles.insert().values(
                name=rec.name,
                version=rec.version,
                profile=rec.profile,
                sha256=rec.sha256,
                size_bytes=rec.size_bytes,
                format=rec.format,
                quantization=rec.quantization,
                model_size_bytes=rec.model_size_bytes,
                signer=rec.signer,
                uploaded_at=rec.uploaded_at,
                manifest=rec.manifest,
            )
        )

    def delete_bundles(self, name: str, version: int) -> list[BundleRecord]:
        gone = self.bundles(name, version)
        b = schema.bundles
        self.conn.execute(b.delete().where(b.c.name == name, b.c.version == version))
        return gone

    def referenced(self) -> set[str]:
        """The sha256 of every artifact a bundle row names."""
        return set(self.conn.execute(sa.select(schema.bundles.c.sha256).distinct()).scalars())

    # -- what holds a version -------------------------------------------------------------------

    def devices_running(self, model: str, version: int) -> list[str]:
        dm = schema.device_models
        query = sa.select(dm.c.device_id).where(dm.c.model == model, dm.c.active_version == version)
        return sorted(self.conn.execute(query.order_by(dm.c.device_id)).scalars())

    def rollouts_targeting(self, model: str, version: int) -> list[str]:
        r = schema.rollouts
        query = sa.select(r.c.id).where(
            r.c.model == model, r.c.version == version, r.c.state.in_(ACTIVE_ROLLOUT_STATES)
        )
        return sorted(self.conn.execute(query).scalars())

    def add_rollout(self, rollout_id: str, model: str, version: int, state: str, spec: dict[str, Any]) -> None:
        now = time.time()
        self.conn.execute(
            schema.rollouts.insert().values(
                id=rollout_id, model=model, version=version, state=state, spec=spec, created_at=now, updated_at=now
            )
        )

    # -- rollouts ---------------------------------------------------------------------------------

    def rollout_rows(
        self, ids: Sequence[str] | None = None, *, states: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Rollouts as plain rows, newest first, each with its ``devices`` (rollout_devices rows)."""
        r, rd = schema.rollouts, schema.rollout_devices
        query = sa.select(r).order_by(r.c.created_at.desc(), r.c.id)
        if ids is not None:
            query = query.where(r.c.id.in_(ids))
        if states is not None:
            query = query.where(r.c.state.in_(states))
        rows = [dict(row._mapping) for row in self.conn.execute(query)]
        if not rows:
            return rows
        by_id = {row["id"]: row for row in rows}
        for row in rows:
            row["devices"] = []
        dq = sa.select(rd).where(rd.c.rollout_id.in_(list(by_id))).order_by(rd.c.rollout_id, rd.c.wave, rd.c.device_id)
        for d in self.conn.execute(dq):
            m = dict(d._mapping)
            by_id[m.pop("rollout_id")]["devices"].append(m)
        return rows

    def save_rollout(self, rollout_id: str, *, state: str, reason: str, wave: int, now: float) -> None:
        r = schema.rollouts
        self.conn.execute(
            r.update().where(r.c.id == rollout_id).values(state=state, reason=reason, wave=wave, updated_at=now)
        )

    def save_rollout_devices(self, rollout_id: str, runs: Sequence[dict[str, Any]], *, insert: bool = False) -> None:
        """Write device runs (rollout.DeviceRun as dicts with ``device``): insert when new, else update."""
        rd = schema.rollout_devices
        for run in runs:
            values = {k: v for k, v in run.items() if k != "device"}
            if insert:
                self.conn.execute(rd.insert().values(rollout_id=rollout_id, device_id=run["device"], **values))
            else:
                self.conn.execute(
                    rd.update().where(rd.c.rollout_id == rollout_id, rd.c.device_id == run["device"]).values(**values)
                )

    # -- desired states ---------------------------------------------------------------------------

    def desired_states(self) -> dict[str, tuple[int, dict[str, Any]]]:
        ds = schema.desired_states
        return {
            m["device_id"]: (m["generation"], m["models"])
            for m in (r._mapping for r in self.conn.execute(sa.select(ds)))
        }

    def save_desired(self, device_id: str, generation: int, models: dict[str, Any], now: float) -> None:
        ds = schema.desired_states
        values = {"generation": generation, "models": models, "updated_at": now}
        if self.conn.execute(ds.update().where(ds.c.device_id == device_id).values(**values)).rowcount == 0:
            self.conn.execute(ds.insert().values(device_id=device_id, **values))

    # -- devices --------------------------------------------------------------------------------

    def devices(self, ids: Sequence[str] | None = None) -> list[DeviceRecord]:
        d, dm = schema.devices, schema.device_models
        query = sa.select(d).order_by(d.c.id)
        models_query = sa.select(dm).order_by(dm.c.device_id, dm.c.model)
        if ids is not None:
            query = query.where(d.c.id.in_(ids))
            models_query = models_query.where(dm.c.device_id.in_(ids))
        models: dict[str, dict[str, DeviceModelRecord]] = {}
        for row in self.conn.execute(models_query):
            m = row._mapping
            models.setdefault(m["device_id"], {})[m["model"]] = DeviceModelRecord(
                m["model"],
                m["active_version"],
                m["state"],
                m["reason"],
                m["detail"],
                m["updated_at"],
                m["previous_version"],
            )
        return [
            DeviceRecord(
                id=m["id"],
                profile=m["profile"],
                labels=dict(m["labels"]),
                online=bool(m["online"]),
                last_seen=m["last_seen"],
                registered_at=m["registered_at"],
                models=models.get(m["id"], {}),
            )
            for m in (row._mapping for row in self.conn.execute(query))
        ]

    def device(self, device_id: str) -> DeviceRecord | None:
        found = self.devices([device_id])
        return found[0] if found else None

    def register_device(
        self, device_id: str, *, profile: str, labels: dict[str, str], online: bool, now: float
    ) -> None:
        """First contact inserts the device with its labels; later contacts update its profile and
        presence but keep the hub's labels (the hub is where labels are changed after that)."""
        d = schema.devices
        known = self.conn.execute(sa.select(d.c.profile).where(d.c.id == device_id)).first()
        values: dict[str, Any] = {"profile": profile, "online": online, "last_seen": now}
        if known is not None and known[0] == "":
            values["labels"] = labels  # known from a report only (ensure_device): this is first contact
        updated = self.conn.execute(d.update().where(d.c.id == device_id).values(**values))
        if updated.rowcount == 0:
            self.conn.execute(
                d.insert().values(
                    id=device_id, profile=profile, labels=labels, online=online, last_seen=now, registered_at=now
                )
            )

    def report_model(
        self,
        device_id: str,
        model: str,
        *,
        active: int | None,
        state: str,
        reason: str = "",
        detail: dict[str, Any] | None = None,
        now: float,
    ) -> None:
        dm = schema.device_models
        values: dict[str, Any] = {
            "active_version": active,
            "state": state,
            "reason": reason,
            "detail": detail or {},
            "updated_at": now,
        }
        where = (dm.c.device_id == device_id, dm.c.model == model)
        before = self.conn.execute(sa.select(dm.c.active_version).where(*where)).first()
        if before is None:
            self.conn.execute(dm.insert().values(device_id=device_id, model=model, **values))
            return
        if active is not None and before[0] is not None and before[0] != active:
            values["previous_version"] = before[0]  # the active version changed: remember the one before
        self.conn.execute(dm.update().where(*where).values(**values))

    def ensure_device(self, device_id: str, now: float) -> None:
        """A report from a device whose presence has not arrived yet: register it, profile unknown."""
        d = schema.devices
        if self.conn.execute(sa.select(d.c.id).where(d.c.id == device_id)).first() is None:
            self.conn.execute(
                d.insert().values(id=device_id, profile="", labels={}, online=True, last_seen=now, registered_at=now)
            )

    def set_labels(self, device_id: str, changes: dict[str, str | None]) -> bool:
        """Set labels (a None value removes the key); False when there is no such device."""
        d = schema.devices
        labels = self.conn.execute(sa.select(d.c.labels).where(d.c.id == device_id)).scalar()
        if labels is None:
            return False
        new = dict(labels)
        for key, value in changes.items():
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        self.conn.execute(d.update().where(d.c.id == device_id).values(labels=new))
        return True


class Store:
    """The hub's database. ``Store.open(url)`` creates or migrates its schema first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, migrations: Sequence[Migration] = MIGRATIONS) -> Store:
        engine = _engine(url)
        where = engine.url.render_as_string(hide_password=True)
        try:
            migrate(engine, migrations, where=where)
        except DBAPIError as e:
            engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
            msg = f"cannot use the database {where}: {reason}"
            raise UnavailableError(msg) from None
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def where(self) -> str:
        """The URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def begin(self) -> Iterator[Tx]:
        with self.engine.begin() as conn:
            yield Tx(conn)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A transaction that only reads: on SQLite a plain BEGIN, so that status and list requests
        never queue behind the fleet worker's writes (nor time out behind them)."""
        with self.engine.connect() as plain:
            conn = plain.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield Tx(conn)

    def close(self) -> None:
        self.engine.dispose()
