"""`edgekit broker-config`: Mosquitto configuration for a fleet (TLS per device, per-device ACL)."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit.cli._output import console

__all__ = ["broker_config"]


@click.command("broker-config")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, help="a device id (repeatable)")
@click.option(
    "--devices-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="device ids, one per line"
)
@click.option("--host", "hosts", multiple=True, required=True, help="name or address devices use for the broker")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True, help="the TLS listener")
@click.option("--prefix", default="edgekit", show_default=True, help="topic prefix shared by hub and devices")
@click.option("--hub-user", default="hub", show_default=True, help="the hub's certificate name")
def broker_config(  # noqa: PLR0917 - click passes every option as an argument
    folder: Path,
    devices: tuple[str, ...],
    devices_file: Path | None,
    hosts: tuple[str, ...],
    port: int,
    prefix: str,
    hub_user: str,
) -> None:
    """Write FOLDER/mosquitto.conf, its ACL, a CA, the broker's certificate and one client
    certificate per device (FOLDER/clients/ID/) and for the hub. Each device can then read and
    write only its own topics (docs/mqtt-protocol.md)."""
    from edgekit.broker_config import write_broker_config

    ids = list(devices)
    if devices_file is not None:
        ids += [ln.strip() for ln in devices_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    files = write_broker_config(folder, ids, hosts=list(hosts), port=port, prefix=prefix, hub_user=hub_user)
    console.print(f"wrote {files.conf} and {files.acl} for {len(ids)} devices", soft_wrap=True)
    console.print(f"start the broker: mosquitto -c {files.conf}", soft_wrap=True)
    console.print(
        f"copy {folder}/clients/ID/ to each device and add: --broker mqtts://{hosts[0]}:{port} "
        "--tls-ca ca.crt --tls-cert ID.crt --tls-key ID.key",
        soft_wrap=True,
    )
    console.print(f"keep {folder}/ca.key off the broker once done: it signs new device certificates", soft_wrap=True)
