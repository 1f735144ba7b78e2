"""Versioned schema: a fresh database is created at the newest version, an older one is brought up
to it by ordered steps, each in its own transaction and recorded in ``schema_version``.

Why not Alembic: it wants a script folder (``env.py``, ``script.py.mako``, one file per revision)
shipped inside the wheel and an ``alembic.ini`` or its Config built in code, to run what here is a
list of functions. The hub starts its own migrations (there is no separate ``alembic upgrade``
step for a user to forget), so a small runner over SQLAlchemy Core does the same with less: the
steps are plain functions on a Connection, so they run on SQLite and PostgreSQL alike. Like
Alembic's advice for new databases, a fresh one is created from the current tables (schema.py)
and stamped with the newest version; migrations only ever run on databases that already exist.

Rule for the next schema change: change ``schema.py``, append a ``Migration(N, ...)`` that turns a
version N-1 database into that, and add a test that migrates a database created by version N-1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgekit.errors import InvalidInputError
from edgekit.hub import schema

__all__ = ["BASELINE", "MIGRATIONS", "Migration", "current_version", "head", "migrate"]

#: The version the first release's schema.py created.
BASELINE = 1
#: An arbitrary constant: the PostgreSQL advisory lock that keeps two hubs from migrating at once.
_PG_LOCK = 0x6564_6B68


@dataclass(frozen=True)
class Migration:
    """The step from schema ``version - 1`` to ``version``."""

    version: int
    description: str
    upgrade: Callable[[Connection], None]


def _v2_rollouts(conn: Connection) -> None:
    """v1 -> v2: the rollout engine's state (rollouts.reason/wave, rollout_devices), the desired
    state per device, and each device's previous version of a model."""
    conn.execute(sa.text("ALTER TABLE rollouts ADD COLUMN reason TEXT NOT NULL DEFAULT ''"))
    conn.execute(sa.text("ALTER TABLE rollouts ADD COLUMN wave INTEGER NOT NULL DEFAULT 0"))
    conn.execute(sa.text("ALTER TABLE device_models ADD COLUMN previous_version INTEGER"))
    schema.rollout_devices.create(conn)
    schema.desired_states.create(conn)


def _v3_telemetry(conn: Connection) -> None:
    """v2 -> v3: the devices' telemetry (raw rows, the newest per device and model, minutes)."""
    for table in (schema.telemetry, schema.telemetry_latest, schema.telemetry_minutes, schema.telemetry_compacted):
        table.create(conn)


#: Steps after BASELINE, in order.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "rollout state, desired states, previous versions", _v2_rollouts),
    Migration(3, "telemetry", _v3_telemetry),
)


def head(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    return migrations[-1].version if migrations else BASELINE


def _check_order(migrations: Sequence[Migration]) -> None:
    expected = list(range(BASELINE + 1, BASELINE + 1 + len(migrations)))
    if [m.version for m in migrations] != expected:
        msg = f"migrations must be numbered {expected} in order, got {[m.version for m in migrations]}"
        raise ValueError(msg)


def current_version(conn: Connection) -> int | None:
    """The schema version of the database, or None when it has no ``schema_version`` table."""
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return None
    version = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar()
    return None if version is None else int(version)


def _lock(conn: Connection) -> None:
    # SQLite: every transaction here starts with BEGIN IMMEDIATE (store.py), which is the lock.
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})


def _record(conn: Connection, version: int, description: str) -> None:
    conn.execute(
        schema.schema_version.insert().values(version=version, description=description, applied_at=time.time())
    )


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS, *, where: str = "") -> tuple[int | None, int]:
    """Create or upgrade the hub's schema; returns (version found or None when fresh, version now).

    Refuses a database of a newer schema (a newer hub wrote it) and one that holds tables but no
    ``schema_version`` (not a hub database). A failing step rolls back whole, leaving the version
    before it."""
    _check_order(migrations)
    target = head(migrations)
    where = where or engine.url.render_as_string(hide_password=True)
    with engine.begin() as conn:
        _lock(conn)
        found = current_version(conn)
        if found is None:
            others = sorted(sa.inspect(conn).get_table_names())
            if others:
                msg = (
                    f"{where} holds tables ({', '.join(others[:5])}) but no schema_version: it is not a hub "
                    "database; give the hub an empty database or its own --data folder"
                )
                raise InvalidInputError(msg)
            schema.metadata.create_all(conn)
            _record(conn, target, "created")
            return None, target
        if found > target:
            msg = f"{where} has hub schema v{found}, newer than this hub's v{target}: upgrade edgekit-ml"
            raise InvalidInputError(msg)
    for step in migrations:
        if step.version <= found:
            continue
        with engine.begin() as conn:
            _lock(conn)
            now = current_version(conn) or BASELINE
            if now >= step.version:  # another hub process migrated meanwhile
                continue
            step.upgrade(conn)
            _record(conn, step.version, step.description)
    return found, target
