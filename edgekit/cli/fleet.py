"""`edgekit push`, `edgekit models`, `edgekit devices`: the hub's registry and devices from the
workstation, through its HTTP API (``--hub``/EDGEKIT_HUB, ``--token``/EDGEKIT_HUB_TOKEN)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from rich.table import Table

from edgekit.cli._output import console, emit_json, json_option_help
from edgekit.errors import InvalidInputError
from edgekit.hub.client import DEFAULT_HUB, HubClient

__all__ = ["COMMANDS", "devices", "models", "push"]

F = TypeVar("F", bound=Callable[..., Any])


def _hub_options(f: F) -> F:
    f = click.option(
        "--token",
        envvar="EDGEKIT_HUB_TOKEN",
        help="the hub's API token (env EDGEKIT_HUB_TOKEN; the hub keeps it in DATA/token)",
    )(f)
    return click.option(
        "--hub",
        "hub_url",
        envvar="EDGEKIT_HUB",
        default=DEFAULT_HUB,
        show_default=True,
        help="the hub's URL (env EDGEKIT_HUB)",
    )(f)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help=json_option_help)(f)


def _client(ctx: click.Context) -> HubClient:
    """A client from the nearest --hub/--token given on the command line (the command's own or its
    group's: `edgekit models --hub URL delete ...` works), else the environment, else the default."""
    chosen: dict[str, Any] = {}
    for name in ("hub_url", "token"):
        chosen[name] = ctx.params.get(name)
        c: click.Context | None = ctx
        while c is not None:
            if name in c.params and c.get_parameter_source(name) == ParameterSource.COMMANDLINE:
                chosen[name] = c.params[name]
                break
            c = c.parent
    token = chosen["token"].strip() if chosen["token"] else None
    return HubClient(url=chosen["hub_url"] or DEFAULT_HUB, token=token)


def _wants_json(ctx: click.Context) -> bool:
    c: click.Context | None = ctx
    while c is not None:
        if c.params.get("as_json"):
            return True
        c = c.parent
    return False


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# -- push ---------------------------------------------------------------------------------------


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@_hub_options
@_json_option
@click.pass_context
def push(ctx: click.Context, bundles: tuple[Path, ...], hub_url: str, token: str | None, as_json: bool) -> None:
    """Upload signed BUNDLES to the hub, in order; the first refusal stops (those before it are stored,
    and pushing the same file again is harmless)."""
    missing = [str(b) for b in bundles if not b.is_file()]
    if missing:
        msg = f"no such bundle file: {', '.join(missing)}"
        raise InvalidInputError(msg)
    results = []
    with _client(ctx) as client:
        for path in bundles:
            result = client.push(path)
            results.append(result)
            if not as_json:
                b = result["bundle"]
                what = "pushed" if result["created"] else "already on the hub (same bytes):"
                console.print(
                    f"{what} {b['name']} v{b['version']} for {b['profile']} ({_size(b['size_bytes'])}, "
                    f"signed by {b['signer']}, sha256 {b['sha256'][:12]}) from {path}",
                    soft_wrap=True,
                )
    if as_json:
        emit_json(results)


# -- models -------------------------------------------------------------------------------------


class _ModelsGroup(click.Group):
    """`edgekit models [NAME]` and `edgekit models delete NAME:VERSION`: a first argument that is
    not a subcommand is the model's NAME."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            return "show", _show, args
        return super().resolve_command(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[OPTIONS] [NAME] | delete NAME:VERSION")


def _models_table(found: list[dict[str, Any]]) -> Table:
    table = Table(title="models on the hub")
    for column in ("model", "version", "profile", "format", "size", "signer", "sha256", "uploaded"):
        table.add_column(column, justify="right" if column in ("version", "size") else "left")
    for model in found:
        for v in model["versions"]:
            for b in v["bundles"]:
                table.add_row(
                    model["name"],
                    str(v["version"]),
                    b["profile"],
                    f"{b['format']}/{b['quantization']}",
                    _size(b["size_bytes"]),
                    b["signer"],
                    b["sha256"][:12],
                    b["uploaded"],
                )
    return table


def _show_models(ctx: click.Context, name: str | None) -> None:
    with _client(ctx) as client:
        found = client.models(name)
    if _wants_json(ctx):
        emit_json(found)
    elif not found:
        console.print("no models on the hub yet: `edgekit push BUNDLE` uploads one")
    else:
        console.print(_models_table(found))


@click.group(cls=_ModelsGroup, invoke_without_command=True)
@_hub_options
@_json_option
@click.pass_context
def models(ctx: click.Context, hub_url: str, token: str | None, as_json: bool) -> None:
    """The hub's models: versions, profiles, sizes, signer. `edgekit models NAME` shows one;
    `edgekit models delete NAME:VERSION` deletes a version (every profile's bundle of it)."""
    if ctx.invoked_subcommand is None:
        _show_models(ctx, None)


@click.command("show", hidden=True)
@click.argument("name")
@_hub_options
@_json_option
@click.pass_context
def _show(ctx: click.Context, name: str, hub_url: str, token: str | None, as_json: bool) -> None:
    _show_models(ctx, name)


def _name_version(value: str) -> tuple[str, int]:
    name, sep, version = value.rpartition(":")
    version = version[1:] if version[:1] in ("v", "V") else version
    if not sep or not name or not version.isdigit():
        msg = f"{value!r}: give NAME:VERSION, e.g. digits:2"
        raise InvalidInputError(msg)
    return name, int(version)


@models.command("delete")
@click.argument("target", metavar="NAME:VERSION")
@_hub_options
@click.pass_context
def delete(ctx: click.Context, target: str, hub_url: str, token: str | None) -> None:
    """Delete NAME:VERSION from the hub (every profile's bundle of it); refused while a device runs it
    or a rollout targets it."""
    name, version = _name_version(target)
    with _client(ctx) as client:
        gone = client.delete(name, version)
    profiles = ", ".join(b["profile"] for b in gone)
    console.print(f"deleted {name} v{version} ({len(gone)} bundle(s): {profiles})", soft_wrap=True)


# -- devices ------------------------------------------------------------------------------------


def _devices_table(found: list[dict[str, Any]]) -> Table:
    table = Table(title="devices")
    for column in ("device", "profile", "labels", "online", "models", "last seen"):
        table.add_column(column)
    for d in found:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        runs = "; ".join(
            f"{name} v{m['active'] if m['active'] is not None else '-'} {m['state']}"
            + (f" ({m['reason']})" if m.get("reason") else "")
            for name, m in sorted(d["models"].items())
        )
        table.add_row(d["id"], d["profile"], labels, "yes" if d["online"] else "no", runs, d["last_seen"] or "-")
    return table


@click.group(invoke_without_command=True)
@_hub_options
@_json_option
@click.pass_context
def devices(ctx: click.Context, hub_url: str, token: str | None, as_json: bool) -> None:
    """Every device that registered: id, profile, labels, online, and per model its active version
    and state. `edgekit devices label ID KEY=VALUE` labels one."""
    if ctx.invoked_subcommand is not None:
        return
    with _client(ctx) as client:
        found = client.devices()
    if as_json:
        emit_json(found)
    elif not found:
        console.print("no device has registered yet (devices register on first contact over MQTT)")
    else:
        console.print(_devices_table(found))


@devices.command("label")
@click.argument("device")
@click.argument("labels", nargs=-1, required=True, metavar="KEY=VALUE|KEY-...")
@_hub_options
@click.pass_context
def label(ctx: click.Context, device: str, labels: tuple[str, ...], hub_url: str, token: str | None) -> None:
    """Set labels of DEVICE (KEY=VALUE), or remove them (KEY-)."""
    from edgekit.hub.devices import parse_label_changes

    changes = parse_label_changes(labels)
    with _client(ctx) as client:
        d = client.label(device, changes)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "none"
    console.print(f"device {d['id']} labels: {shown}", soft_wrap=True)


COMMANDS = [push, models, devices]
