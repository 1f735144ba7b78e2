"""The ordered-migrations runner on SQLite and PostgreSQL: a fresh database is created at the newest
version, an older one upgraded step by step, a failing step rolled back whole, a newer or foreign
database refused."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgekit.errors import InvalidInputError
from edgekit.hub import schema
from edgekit.hub.migrations import BASELINE, MIGRATIONS, Migration, current_version, head, migrate
from edgekit.hub.store import Store


def columns(url: str, table: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


def versions(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(schema.schema_version.c.version).order_by("version")).scalars())


def add_notes(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE devices ADD COLUMN notes VARCHAR(200)"))


def test_a_fresh_database_is_created_at_the_newest_version(db_url: str) -> None:
    store = Store.open(db_url)
    try:
        assert versions(store) == [head()]
        assert head() == BASELINE + len(MIGRATIONS)
        names = set(sa.inspect(store.engine).get_table_names())
        assert names == set(schema.metadata.tables)
        for table in schema.metadata.tables.values():
            assert columns(db_url, table.name) == [c.name for c in table.columns]
    finally:
        store.close()
    Store.open(db_url).close()  # opening again changes nothing
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert current_version(conn) == head()
    engine.dispose()


def test_an_older_database_is_upgraded_in_order_and_a_failing_step_rolls_back(db_url: str) -> None:
    Store.open(db_url, ()).close()  # stamped v1 (the runner's own steps below, not the hub's)
    step2 = Migration(2, "devices.notes", add_notes)
    store = Store.open(db_url, [step2])
    assert versions(store) == [1, 2]
    store.close()
    assert "notes" in columns(db_url, "devices")

    def half_done(conn: Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half (id INTEGER)"))
        msg = "step 3 broke"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="step 3 broke"):
        Store.open(db_url, [step2, Migration(3, "breaks", half_done)])
    engine = sa.create_engine(db_url)
    try:
        assert "half" not in sa.inspect(engine).get_table_names()  # DDL rolled back with the step
        with engine.connect() as conn:
            assert current_version(conn) == 2
    finally:
        engine.dispose()


def test_a_newer_database_is_refused(db_url: str) -> None:
    newer = [*MIGRATIONS, Migration(head() + 1, "devices.notes", add_notes)]
    Store.open(db_url, newer).close()
    v, h = head() + 1, head()
    with pytest.raises(
        InvalidInputError, match=rf"has hub schema v{v}, newer than this hub's v{h}: upgrade edgekit-ml"
    ):
        Store.open(db_url)


def test_a_database_with_other_tables_is_refused(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE invoices (id INTEGER)"))
    engine.dispose()
    with pytest.raises(InvalidInputError, match=r"holds tables \(invoices\) but no schema_version: it is not a hub"):
        Store.open(db_url)


def test_migrations_must_be_numbered_in_order(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with pytest.raises(ValueError, match=r"numbered \[2, 3\] in order, got \[3, 2\]"):
            migrate(engine, [Migration(3, "", add_notes), Migration(2, "", add_notes)])
    finally:
        engine.dispose()


def _v1_tables() -> sa.MetaData:
    """The tables as the first release (schema v1) created them, frozen here."""
    md = sa.MetaData()
    sa.Table(
        "schema_version",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.String(200), nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
    )
    sa.Table(
        "bundles",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        *(
            sa.Column(n, sa.String(128), nullable=False)
            for n in ("name", "profile", "format", "quantization", "signer")
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("model_size_bytes", sa.BigInteger, nullable=False),
        sa.Column("uploaded_at", sa.Float, nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
    )
    sa.Table(
        "devices",
        md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("profile", sa.String(128), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("registered_at", sa.Float, nullable=False),
    )
    sa.Table(
        "device_models",
        md,
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("active_version", sa.Integer, nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    sa.Table(
        "rollouts",
        md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    return md


def test_a_v1_database_with_rows_is_migrated_to_the_newest_schema_keeping_them(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    v1 = _v1_tables()
    with engine.begin() as conn:
        v1.create_all(conn)
        conn.execute(v1.tables["schema_version"].insert().values(version=1, description="created", applied_at=0.0))
        conn.execute(
            v1.tables["devices"]
            .insert()
            .values(id="pi-1", profile="raspberrypi", labels={}, online=True, registered_at=1.0)
        )
        conn.execute(
            v1.tables["device_models"]
            .insert()
            .values(
                device_id="pi-1",
                model="digits",
                active_version=3,
                state="serving",
                reason="",
                detail={},
                updated_at=1.0,
            )
        )
        conn.execute(
            v1.tables["rollouts"]
            .insert()
            .values(id="r1", model="digits", version=3, state="completed", spec={}, created_at=1.0, updated_at=1.0)
        )
    engine.dispose()
    store = Store.open(db_url)
    try:
        assert versions(store) == [1, 2, 3] == list(range(1, head() + 1))
        with store.begin() as tx:
            dev = tx.device("pi-1")
            assert dev is not None and dev.models["digits"].active == 3
            assert tx.rollouts_targeting("digits", 3) == []  # completed
        for table in schema.metadata.tables.values():
            assert set(columns(db_url, table.name)) == {c.name for c in table.columns}
    finally:
        store.close()
