"""`edgekit hub serve`: the long-running hub (registry and devices over an HTTP JSON API; docs/hub.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgekit.errors import InvalidInputError
from edgekit_runtime.signing import load_public_key

__all__ = ["hub"]

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def hub() -> None:
    """The fleet's hub: bundle registry and devices (docs/hub.md)."""


@hub.command("serve")
@click.option("--data", "data", type=click.Path(path_type=Path), required=True, help="the hub's state folder")
@click.option("--http", "http", default="127.0.0.1:8600", show_default=True, help="HOST:PORT of the HTTP API")
@click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="public key (.pub) whose signed bundles may be pushed (repeatable); without one every push is refused",
)
@click.option(
    "--broker",
    help="the fleet's MQTT broker, mqtt://[USER:PASS@]HOST:PORT or mqtts://... (TLS); without one (or "
    "--embedded-broker) devices cannot be reached and deploys are refused",
)
@click.option("--mqtt-prefix", default="edgekit", show_default=True, help="topic prefix shared with the devices")
@click.option("--tls-ca", type=_FILE, help="CA certificate of the broker (mqtts://)")
@click.option("--tls-cert", type=_FILE, help="the hub's client certificate (edgekit broker-config writes one)")
@click.option("--tls-key", type=_FILE, help="the hub's private key for --tls-cert")
@click.option(
    "--embedded-broker",
    is_flag=True,
    help="run an in-process MQTT broker (amqtt) on 127.0.0.1 as the hub's broker: a laptop quick start, "
    "not for production (pip install 'edgekit-ml[embedded-broker]')",
)
@click.option(
    "--broker-port",
    type=click.IntRange(0, 65535),
    help="the embedded broker's port (default 1883; 0 picks a free one, and the printed line says which)",
)
@click.option("--db", help="database URL: postgresql://USER@HOST:PORT/DB (default: SQLite in DATA/hub.db)")
@click.option(
    "--no-ingest",
    is_flag=True,
    help="do not store the devices' telemetry in this process (`edgekit hub ingest` workers do)",
)
@click.option(
    "--ingest-group",
    help="take telemetry through the MQTT 5 shared subscription of this name, beside `edgekit hub ingest "
    "--group NAME` workers (Mosquitto 2; not the embedded broker)",
)
@click.option(
    "--telemetry-retention",
    default="24h",
    show_default=True,
    help="keep raw telemetry this long (30m, 24h, 7d), then only per-minute aggregates",
)
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), help="refuse bigger pushes")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
)
def serve(
    *,
    data: Path,
    http: str,
    trust_keys: tuple[Path, ...],
    broker: str | None,
    embedded_broker: bool,
    broker_port: int | None,
    mqtt_prefix: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    db: str | None,
    no_ingest: bool,
    ingest_group: str | None,
    telemetry_retention: str,
    max_upload_mb: float | None,
    log_level: str,
) -> None:
    """Serve the hub on HTTP until SIGINT/SIGTERM. State (SQLite, artifacts, API token) lives in --data;
    the API token is written to DATA/token (mode 0600) on first start."""
    import logging

    from edgekit.hub.embedded_broker import DEFAULT_BROKER_PORT, check_embedded_broker
    from edgekit.hub.fleet import parse_duration
    from edgekit.hub.server import HubConfig, parse_http, serve
    from edgekit.hub.telemetry import check_group
    from edgekit_runtime.agent.link import parse_broker_url
    from edgekit_runtime.agent.protocol import check_prefix

    if embedded_broker and broker:
        msg = "give either --broker URL (a broker you run) or --embedded-broker (one in this process), not both"
        raise InvalidInputError(msg)
    if broker_port is not None and not embedded_broker:
        msg = "--broker-port is the embedded broker's port: give it with --embedded-broker"
        raise InvalidInputError(msg)
    embedded_port = None
    if embedded_broker:
        check_embedded_broker()
        embedded_port = DEFAULT_BROKER_PORT if broker_port is None else broker_port
    if broker:
        parse_broker_url(broker)
    check_prefix(mqtt_prefix)
    if (tls_cert is None) != (tls_key is None):
        msg = "give --tls-cert and --tls-key together (the hub's certificate and its key)"
        raise InvalidInputError(msg)
    tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
    host, port = parse_http(http)
    trusted = tuple(load_public_key(p) for p in trust_keys)
    if ingest_group is not None:
        check_group(ingest_group)
        if embedded_broker:
            msg = "--ingest-group needs a broker with shared subscriptions (Mosquitto 2); the embedded one has none"
            raise InvalidInputError(msg)
    retention = parse_duration(telemetry_retention, "--telemetry-retention")
    if retention < 60:
        msg = f"--telemetry-retention {telemetry_retention!r}: keep raw telemetry at least a minute (e.g. 30m, 24h)"
        raise InvalidInputError(msg)
    extra: dict[str, Any] = {} if max_upload_mb is None else {"max_upload_bytes": int(max_upload_mb * 1e6)}
    config = HubConfig(
        data=data,
        host=host,
        port=port,
        db=db,
        trusted=trusted,
        broker=broker,
        mqtt_prefix=mqtt_prefix,
        link_options={k: str(v) for k, v in tls.items() if v is not None},
        embedded_broker_port=embedded_port,
        log_level=log_level,
        ingest=not no_ingest,
        ingest_group=ingest_group,
        telemetry_retention_s=retention,
        **extra,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config, announce=lambda line: click.echo(line, err=True))


@hub.command("ingest")
@click.option("--broker", required=True, help="the fleet's MQTT broker, mqtt://[USER:PASS@]HOST:PORT or mqtts://...")
@click.option(
    "--db",
    required=True,
    help="the hub's database, postgresql://USER@HOST:PORT/DB (or sqlite:///DATA/hub.db, one hub's, same disk)",
)
@click.option(
    "--group",
    default="edgekit-ingest",
    show_default=True,
    help="the MQTT 5 shared subscription's name: workers of one group share the messages",
)
@click.option("--mqtt-prefix", default="edgekit", show_default=True, help="topic prefix shared with the devices")
@click.option("--tls-ca", type=_FILE, help="CA certificate of the broker (mqtts://)")
@click.option("--tls-cert", type=_FILE, help="this worker's client certificate")
@click.option("--tls-key", type=_FILE, help="the private key for --tls-cert")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
)
def ingest(
    *,
    broker: str,
    db: str,
    group: str,
    mqtt_prefix: str,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    log_level: str,
) -> None:
    """Store the devices' telemetry, as one of several worker processes sharing one subscription and one
    database, until SIGINT/SIGTERM (docs/telemetry.md). Prints one line once subscribed."""
    import logging
    import signal
    import threading

    from edgekit.hub.store import Store, database_url
    from edgekit.hub.telemetry import Ingestor, check_group
    from edgekit_runtime.agent.link import parse_broker_url
    from edgekit_runtime.agent.protocol import check_prefix

    address = parse_broker_url(broker)
    check_group(group)
    check_prefix(mqtt_prefix)
    if (tls_cert is None) != (tls_key is None):
        msg = "give --tls-cert and --tls-key together (the worker's certificate and its key)"
        raise InvalidInputError(msg)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = Store.open(database_url(db, Path.cwd()))
    tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
    worker = Ingestor(
        store,
        address,
        prefix=mqtt_prefix,
        group=group,
        link_options={k: str(v) for k, v in tls.items() if v is not None},
    )
    try:
        worker.start()
        click.echo(f"edgekit hub ingest: storing telemetry from {worker.subscription} into {store.where}", err=True)
        stop.wait()
    finally:
        worker.stop()
        store.close()
        s = worker.stats
        bad = sum(s.bad.values())
        click.echo(f"edgekit hub ingest: stopped; stored {s.stored}, duplicates {s.duplicates}, bad {bad}", err=True)
