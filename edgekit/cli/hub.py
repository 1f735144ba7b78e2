"""`edgekit hub serve`: the long-running hub (registry and devices over an HTTP JSON API; docs/hub.md)."""

from __future__ import annotations

from pathlib import Path

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
    max_upload_mb: float | None,
    log_level: str,
) -> None:
    """Serve the hub on HTTP until SIGINT/SIGTERM. State (SQLite, artifacts, API token) lives in --data;
    the API token is written to DATA/token (mode 0600) on first start."""
    import logging

    from edgekit.hub.embedded_broker import DEFAULT_BROKER_PORT, check_embedded_broker
    from edgekit.hub.server import HubConfig, parse_http, serve
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
    extra = {} if max_upload_mb is None else {"max_upload_bytes": int(max_upload_mb * 1e6)}
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
        **extra,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config, announce=lambda line: click.echo(line, err=True))
