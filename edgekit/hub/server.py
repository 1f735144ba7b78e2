"""Wiring of a hub: its data folder (lock, token, database, artifacts), the registry and devices
over them, the HTTP API, and the process that serves it (bound up front, uvicorn, SIGINT/SIGTERM).

Data folder (docs/hub.md)::

    DATA/hub.lock     held while a hub serves DATA (a second one is refused)
    DATA/token        the API token, mode 0600, made on first start and reused
    DATA/hub.db       SQLite in WAL mode (unless --db names another database)
    DATA/artifacts/   bundle files, <sha256>.ekb; uploads in progress in .incoming/
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import uvicorn
from starlette.applications import Starlette

from edgekit.hub.api import create_app
from edgekit.hub.artifacts import Artifacts
from edgekit.hub.devices import Devices
from edgekit.hub.embedded_broker import start_embedded_broker
from edgekit.hub.fleet import Fleet
from edgekit.hub.registry import Registry
from edgekit.hub.store import Store, database_url
from edgekit.hub.telemetry import DEFAULT_RETENTION_S, Compactor, Ingestor
from edgekit_runtime.agent.link import parse_broker_url
from edgekit_runtime.bundle import fsync_dir, max_bundle_bytes
from edgekit_runtime.errors import InvalidInputError, UnavailableError
from edgekit_runtime.server.run import bind
from edgekit_runtime.signing import PublicKey

__all__ = ["DEFAULT_PORT", "TOKEN_FILE", "Hub", "HubConfig", "load_or_create_token", "parse_http", "serve"]

log = logging.getLogger("edgekit.hub")

DEFAULT_PORT = 8600
TOKEN_FILE = "token"  # noqa: S105 (a file name, not a secret)
LOCK_FILE = "hub.lock"


@dataclass(frozen=True)
class HubConfig:
    data: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: str | None = None  # a SQLAlchemy URL; None: SQLite in DATA
    trusted: tuple[PublicKey, ...] = ()
    broker: str | None = None  # the fleet's MQTT broker, mqtt[s]://[USER:PASS@]HOST:PORT
    mqtt_prefix: str = "edgekit"
    link_options: dict[str, Any] = field(default_factory=dict)  # tls_ca, tls_cert, tls_key for the broker
    embedded_broker_port: int | None = None  # --embedded-broker: amqtt on 127.0.0.1:PORT (0: free) is the broker
    max_upload_bytes: int = field(default_factory=max_bundle_bytes)
    log_level: str = "warning"
    ingest: bool = True  # store the devices' telemetry in this process (False: `edgekit hub ingest` workers do)
    ingest_group: str | None = None  # join this shared subscription for telemetry ($share/GROUP/...)
    telemetry_retention_s: float = DEFAULT_RETENTION_S  # raw telemetry kept this long, then minutes


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[::1]:PORT`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or int(port) > 65535:
        msg = f"--http {value!r}: give HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}"
        raise InvalidInputError(msg)
    return host, int(port)


def load_or_create_token(data: Path) -> str:
    """The API token in DATA/token: made on first start (0600, fsynced), then read as it is. A
    token file others can read is refused, as ssh refuses such a key."""
    path = data / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            msg = f"{path} is readable by others (mode {mode:04o}); run chmod 600 {path}"
            raise InvalidInputError(msg) from None
        token = path.read_text().strip()
        if len(token) < 16:
            msg = f"{path} holds no usable token (under 16 characters); remove it and a new one is made"
            raise InvalidInputError(msg) from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(data)
    return token


def _lock(data: Path) -> IO[str]:
    f = (data / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            msg = f"another hub is serving {data} (pid {holder}); stop it, or give this one another --data"
            raise UnavailableError(msg) from None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class Hub:
    """A hub over its data folder: open it (lock, token, database, artifacts), then ``app()``."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        data = config.data
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            msg = f"cannot create --data {data}: {e.strerror}"
            raise InvalidInputError(msg) from None
        self._lock = _lock(data)
        try:
            self.token = load_or_create_token(data)
            self.artifacts = Artifacts(data / "artifacts")
            self.store = Store.open(database_url(config.db, data))
            self.registry = Registry(self.store, self.artifacts, config.trusted)
            self.devices = Devices(self.store)
            # the fleet side only with a broker: without one nothing could reach a device
            self.fleet = (
                Fleet(
                    self.store,
                    self.artifacts,
                    broker=parse_broker_url(config.broker),
                    prefix=config.mqtt_prefix,
                    link_options=config.link_options,
                )
                if config.broker
                else None
            )
            self.ingestor = (
                Ingestor(
                    self.store,
                    parse_broker_url(config.broker),
                    prefix=config.mqtt_prefix,
                    group=config.ingest_group,
                    link_options=config.link_options,
                )
                if config.broker and config.ingest
                else None
            )
            self.compactor = Compactor(self.store, retention_s=config.telemetry_retention_s)
            swept = self.registry.sweep()
            if swept:
                log.warning("removed %d file(s) a crash left in %s: %s", len(swept), self.artifacts.root, swept)
        except BaseException:
            self._lock.close()
            raise

    def app(self) -> Starlette:
        return create_app(
            self.registry,
            self.devices,
            token=self.token,
            max_upload_bytes=self.config.max_upload_bytes,
            fleet=self.fleet,
            ingestor=self.ingestor,
        )

    def close(self) -> None:
        self.compactor.stop()
        if self.ingestor is not None:
            self.ingestor.stop()
        if self.fleet is not None:
            self.fleet.stop()
        self.store.close()
        self._lock.close()


class _Early:
    def __init__(self) -> None:
        self.signalled = False
        self.server: uvicorn.Server | None = None

    def handle(self, sig: int, frame: object) -> None:
        self.signalled = True
        if self.server is not None:
            self.server.should_exit = True

    def attach(self, server: uvicorn.Server) -> None:
        self.server = server
        server.should_exit = self.signalled


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT ends ``run`` normally: uvicorn raises the signal again
    once shut down, and SIGTERM's default action would kill the process before the hub closes its
    database and lock."""

    @staticmethod
    @contextlib.contextmanager
    def stop_on_signals() -> Iterator[_Early]:
        """Until uvicorn's own handlers take over: a signal stops the server once there is one."""
        early = _Early()
        original = {sig: signal.signal(sig, early.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield early
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(config: HubConfig, *, announce: Callable[[str], object] = print) -> None:
    """Serve until SIGINT/SIGTERM: bind first (a busy port fails at once), open the hub, announce
    the address, run uvicorn (which finishes requests in flight on a signal), close.

    The signal handlers are in place before the address is announced, so a signal at any moment
    after that is a clean stop, never the default action's abrupt death.

    With ``embedded_broker_port`` an amqtt broker is started (and announced) first and is the hub's
    broker; it stops after the hub."""
    if config.embedded_broker_port is not None:
        with start_embedded_broker(port=config.embedded_broker_port) as broker:
            announce(broker.announcement)
            serve(replace(config, broker=broker.url, embedded_broker_port=None), announce=announce)
        return
    try:
        sock = bind(config.host, config.port)
    except UnavailableError as e:
        raise UnavailableError(e.message.replace("with --port", "with --http HOST:PORT")) from None
    try:
        with _Server.stop_on_signals() as early:
            hub = Hub(config)
            try:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                announce(f"edgekit hub on http://{shown}:{port} (data {config.data}, database {hub.store.where})")
                if not config.trusted:
                    log.warning("no --trust-key given: every push will be refused")
                hub.compactor.start()
                if hub.fleet is not None and hub.fleet.link is not None:
                    where = f"{hub.fleet.link.broker.host}:{hub.fleet.link.broker.port}"
                    announce(f"edgekit hub: devices through MQTT at {where} (topics {config.mqtt_prefix}/devices/...)")
                    hub.fleet.start()
                    if hub.ingestor is not None:
                        announce(f"edgekit hub: storing telemetry from {hub.ingestor.subscription}")
                        hub.ingestor.start()
                else:
                    log.warning("no --broker given: devices cannot be reached; deploy and rollback are refused")
                server = _Server(
                    uvicorn.Config(
                        hub.app(),
                        log_level=config.log_level.lower(),
                        access_log=False,
                        lifespan="off",
                        timeout_graceful_shutdown=30,
                    )
                )
                early.attach(server)
                server.run(sockets=[sock])
            finally:
                hub.close()
    finally:
        sock.close()
