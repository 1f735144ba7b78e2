"""The store's queries on a real SQLite file (WAL) and on the real PostgreSQL (skipped with the
reason when it is unreachable): devices, reported model state, labels, URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from edgekit.errors import InvalidInputError
from edgekit.hub.store import Store, database_url
from edgekit_runtime.errors import UnavailableError


def test_sqlite_is_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    store = Store.open(database_url(None, tmp_path))
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (tmp_path / "hub.db").exists()
    finally:
        store.close()


def test_devices_register_report_and_keep_the_hubs_labels(store: Store) -> None:
    with store.begin() as tx:
        tx.register_device("pi-1", profile="raspberrypi", labels={"site": "lab"}, online=True, now=10.0)
        tx.report_model("pi-1", "digits", active=1, state="serving", detail={"versions": [1]}, now=11.0)
        tx.register_device("jet-1", profile="jetson", labels={}, online=False, now=12.0)
    with store.begin() as tx:
        assert tx.set_labels("pi-1", {"ring": "canary", "site": None})
        assert not tx.set_labels("nope", {"a": "b"})
        # A later contact updates presence and profile, never the labels set on the hub.
        tx.register_device("pi-1", profile="raspberrypi5", labels={"site": "elsewhere"}, online=False, now=20.0)
        tx.report_model("pi-1", "digits", active=2, state="downloading", reason="", now=21.0)
    with store.begin() as tx:
        pi, jet = tx.device("pi-1"), tx.device("jet-1")
        assert [d.id for d in tx.devices()] == ["jet-1", "pi-1"]
        assert tx.devices_running("digits", 2) == ["pi-1"]
        assert tx.devices_running("digits", 1) == []
    assert pi is not None and jet is not None
    assert (pi.profile, pi.labels, pi.online, pi.last_seen) == ("raspberrypi5", {"ring": "canary"}, False, 20.0)
    m = pi.models["digits"]
    assert (m.active, m.state, m.detail, m.updated_at) == (2, "downloading", {}, 21.0)
    assert jet.models == {}


def test_deleting_a_device_deletes_its_model_rows(store: Store) -> None:
    from edgekit.hub import schema

    with store.begin() as tx:
        tx.register_device("pi-1", profile="p", labels={}, online=True, now=1.0)
        tx.report_model("pi-1", "digits", active=1, state="serving", now=1.0)
    with store.begin() as tx:
        tx.conn.execute(schema.devices.delete().where(schema.devices.c.id == "pi-1"))
        assert tx.conn.execute(sa.select(sa.func.count()).select_from(schema.device_models)).scalar() == 0


def test_database_urls(tmp_path: Path) -> None:
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/hub.db"
    assert database_url("postgresql://u@h:5432/d", tmp_path) == "postgresql+psycopg://u@h:5432/d"
    assert database_url("postgres://u:pw@h/d", tmp_path) == "postgresql+psycopg://u:pw@h/d"
    with pytest.raises(InvalidInputError, match=r"'mysql\+pymysql' databases are not supported"):
        database_url("mysql+pymysql://u@h/d", tmp_path)
    with pytest.raises(InvalidInputError, match="is not a database URL"):
        database_url("just words", tmp_path)


def test_an_unreachable_database_is_one_clear_error_without_the_password(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'edgekit-ml[postgresql]')")
    url = database_url("postgresql://someone:secret@127.0.0.1:1/none", tmp_path)
    with pytest.raises(UnavailableError) as caught:
        Store.open(url)
    assert caught.value.message.startswith(
        "cannot use the database postgresql+psycopg://someone:***@127.0.0.1:1/none: "
    )
    assert "secret" not in caught.value.message


def test_a_reader_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    """SQLite in WAL mode: Store.read() (plain BEGIN) reads while a write transaction is open; a
    second writer (BEGIN IMMEDIATE) would wait for it. The API's status and list reads use read()."""
    import threading

    store = Store.open(database_url(None, tmp_path))
    try:
        with store.begin() as tx:
            tx.register_device("pi-1", profile="raspberrypi", labels={}, online=True, now=1.0)
        writing, release = threading.Event(), threading.Event()

        def writer() -> None:
            with store.begin() as tx:
                tx.register_device("pi-2", profile="raspberrypi", labels={}, online=True, now=2.0)
                writing.set()
                release.wait(30)

        t = threading.Thread(target=writer)
        t.start()
        assert writing.wait(30)
        try:
            with store.read() as tx:  # would raise "database is locked" after busy_timeout with BEGIN IMMEDIATE
                seen = [d.id for d in tx.devices()]
            assert seen == ["pi-1"]  # and its uncommitted row is not visible
        finally:
            release.set()
            t.join(30)
        with store.read() as tx:
            assert [d.id for d in tx.devices()] == ["pi-1", "pi-2"]
    finally:
        store.close()
