"""`edgekit hub serve` as a real process: the token file, the address line, a busy port, a second hub
on the same data, SIGTERM/SIGINT, a restart keeping state; and the wiring's pieces in-process."""

from __future__ import annotations

import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from edgekit.hub.server import load_or_create_token, parse_http
from edgekit_runtime.errors import InvalidInputError
from tests.hub.conftest import BundleFactory, HubProcess, Keys, edgekit


def test_first_start_writes_a_0600_token_and_later_starts_reuse_it(
    hub_factory: Callable[..., HubProcess], tmp_path: Path
) -> None:
    hub = hub_factory()
    token_file = tmp_path / "hub" / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = hub.token
    assert len(token) >= 40
    assert (
        hub.lines[0] == f"edgekit hub on {hub.url} (data {tmp_path / 'hub'}, database sqlite:///{tmp_path}/hub/hub.db)"
    )
    assert hub.url.startswith("http://127.0.0.1:")
    r = httpx.get(f"{hub.url}/healthz")
    assert r.json() == {"status": "ok"}
    assert httpx.get(f"{hub.url}/v1/models").status_code == 401
    assert httpx.get(f"{hub.url}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert hub.stop() == 0
    again = hub_factory()
    assert again.token == token


def test_sigterm_and_sigint_stop_it_cleanly(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        hub = hub_factory()
        assert hub.stop(sig) == 0, hub.lines
        assert not any("Traceback" in line for line in hub.lines), hub.lines
        # The database was closed: SQLite folds its write-ahead log back in when the last connection closes.
        assert not (tmp_path / "hub" / "hub.db-wal").exists()


def test_a_busy_port_is_refused_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = edgekit("hub", "serve", "--data", str(tmp_path / "hub"), "--http", f"127.0.0.1:{port}")
    assert r.returncode == 4
    assert r.stderr == (f"Error: port {port} on 127.0.0.1 is already in use; choose another with --http HOST:PORT\n")


def test_a_second_hub_on_the_same_data_is_refused(hub_factory: Callable[..., HubProcess], tmp_path: Path) -> None:
    hub = hub_factory()
    r = edgekit("hub", "serve", "--data", str(hub.data), "--http", "127.0.0.1:0")
    assert r.returncode == 4
    pid = hub.proc.pid if hub.proc else 0
    assert (
        r.stderr == f"Error: another hub is serving {hub.data} (pid {pid}); stop it, or give this one another --data\n"
    )


def test_flags_checked_before_anything_starts(tmp_path: Path, keys: Keys) -> None:
    data = tmp_path / "hub"
    cases = [
        (["--broker", "http://x"], 2, "Error: --broker 'http://x': give mqtt://HOST[:PORT]"),
        (["--http", "nowhere"], 2, "Error: --http 'nowhere': give HOST:PORT"),
        (["--trust-key", str(keys.private_path)], 2, f"Error: {keys.private_path}: not an edgekit public key"),
        (["--db", "mysql://u@h/d"], 2, "Error: --db: 'mysql' databases are not supported"),
    ]
    for args, code, start in cases:
        r = edgekit("hub", "serve", "--data", str(data), "--http", "127.0.0.1:0", *args)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.startswith(start), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr


def test_a_restart_keeps_models_and_artifacts(
    hub_factory: Callable[..., HubProcess], bundle: BundleFactory, keys: Keys
) -> None:
    hub = hub_factory("--trust-key", str(keys.public_path))
    path = bundle()
    assert edgekit("push", str(path), env=hub.env()).returncode == 0
    hub.stop()
    again = hub_factory("--trust-key", str(keys.public_path))
    r = edgekit("models", "--json", env=again.env())
    assert r.returncode == 0, r.stderr
    import json

    [model] = json.loads(r.stdout)
    assert model["name"] == "digits"
    sha = model["versions"][0]["bundles"][0]["sha256"]
    assert (hub.data / "artifacts" / f"{sha}.ekb").read_bytes() == path.read_bytes()


def test_hub_serve_on_postgresql(
    hub_factory: Callable[..., HubProcess], pg_url: str, bundle: BundleFactory, keys: Keys
) -> None:
    hub = hub_factory("--db", pg_url, "--trust-key", str(keys.public_path))
    assert "database postgresql+psycopg://" in hub.lines[0]
    assert edgekit("push", str(bundle()), env=hub.env()).returncode == 0
    r = edgekit("models", "digits", "--json", env=hub.env())
    assert r.returncode == 0, r.stderr
    assert not (hub.data / "hub.db").exists()


def test_token_file_in_process(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    assert load_or_create_token(tmp_path) == token
    (tmp_path / "token").chmod(0o644)
    with pytest.raises(InvalidInputError, match=r"token is readable by others \(mode 0644\); run chmod 600"):
        load_or_create_token(tmp_path)


def test_parse_http() -> None:
    assert parse_http("127.0.0.1:8600") == ("127.0.0.1", 8600)
    assert parse_http(":9000") == ("127.0.0.1", 9000)
    assert parse_http("[::1]:8600") == ("::1", 8600)
    for bad in ("8600", "host:", "host:99999", "host:http"):
        with pytest.raises(InvalidInputError, match="give HOST:PORT"):
            parse_http(bad)
