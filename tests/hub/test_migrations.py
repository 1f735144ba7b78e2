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
    Store.open(db_url).close()
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
    Store.open(db_url, [Migration(2, "devices.notes", add_notes)]).close()
    with pytest.raises(InvalidInputError, match=r"has hub schema v2, newer than this hub's v1: upgrade edgekit-ml"):
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
