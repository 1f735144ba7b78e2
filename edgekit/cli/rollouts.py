"""`edgekit deploy`, `edgekit rollout ...`, `edgekit rollback`: rollouts through the hub's HTTP API."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgekit.cli._output import console, emit_json
from edgekit.cli.fleet import _client, _hub_options, _json_option, _name_version
from edgekit.errors import InvalidInputError
from edgekit.hub.fleet import parse_duration

__all__ = ["COMMANDS", "deploy", "rollback", "rollout"]

F = TypeVar("F", bound=Callable[..., Any])
ENDED = ("completed", "aborted", "cancelled")


def _percent(value: str, what: str) -> float:
    text = value.strip().rstrip("%")
    try:
        n = float(text)
    except ValueError:
        msg = f"{what} {value!r}: give a percentage such as 20 or 20%"
        raise InvalidInputError(msg) from None
    if not 0 <= n <= 100:
        msg = f"{what} {value!r}: a percentage from 0 to 100"
        raise InvalidInputError(msg)
    return n


def _rollout_options(f: F) -> F:
    """The options a deploy and a rollback share (the hub's semantics: docs/ota.md)."""
    options = [
        click.option("--to", "to", required=True, help="all, a comma-separated list of device ids, or KEY=VALUE"),
        click.option("--waves", default="100%", show_default=True, help="cumulative wave sizes, e.g. 1,10%,50%,100%"),
        click.option(
            "--abort-failure-rate",
            default="20%",
            show_default=True,
            help="abort (and put switched devices back) past this share of failed, timed-out or rolled-back devices",
        ),
        click.option(
            "--abort-min-devices",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="finished devices needed before the failure rate can abort",
        ),
        click.option(
            "--device-timeout",
            default="10m",
            show_default=True,
            help="a device in one state longer than this has timed out (retried, then failed)",
        ),
        click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True, help="retries per timeout"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _common(params: dict[str, Any]) -> dict[str, Any]:
    """The shared options' request fields, from the command's parsed parameters."""
    return {
        "to": params["to"],
        "waves": params["waves"],
        "abort_failure_rate": _percent(params["abort_failure_rate"], "--abort-failure-rate"),
        "abort_min_devices": params["abort_min_devices"],
        "device_timeout": parse_duration(params["device_timeout"], "--device-timeout"),
        "retries": params["retries"],
    }


def _started(ctx: click.Context, status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(status)
        return
    click.echo(status["id"])  # stdout: the id alone, for scripts (ID=$(edgekit deploy ...))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status["counts"].items()))
    n = len(status["devices"])
    what = (
        f"{status['model']} v{status['version']} to {n} device(s)"
        if status["version"] is not None
        else f"{status['model']}: {n} device(s) back to their previous version"
    )
    console.print(
        f"rollout {status['id']}: {what} ({counts}); `edgekit rollout status {status['id']} --watch` follows it",
        soft_wrap=True,
    )


@click.command()
@click.argument("target", metavar="NAME:VERSION")
@_rollout_options
@click.option("--health-window", default="0s", show_default=True, help="watch error rate and p95 after the switch")
@click.option("--shadow", default="0s", show_default=True, help="mirror live traffic to the new version first")
@click.option("--min-agreement", help="with --shadow: the top-1 agreement a device needs to switch, e.g. 99%")
@click.option(
    "--allow-signature-change", is_flag=True, help="allow inputs/outputs that differ from the serving version"
)
@_hub_options
@_json_option
@click.pass_context
def deploy(
    ctx: click.Context,
    *,
    target: str,
    to: str,
    waves: str,
    abort_failure_rate: str,
    abort_min_devices: int,
    device_timeout: str,
    retries: int,
    health_window: str,
    shadow: str,
    min_agreement: str | None,
    allow_signature_change: bool,
    hub_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Roll NAME:VERSION out to the devices --to selects, in waves; prints the rollout id. Each device
    gets the bundle built for its profile; one whose profile has none is skipped."""
    name, version = _name_version(target)
    body = {
        "model": name,
        "version": version,
        **_common(ctx.params),
        "health_window": parse_duration(health_window, "--health-window"),
        "shadow": parse_duration(shadow, "--shadow"),
        "min_agreement": None if min_agreement is None else _percent(min_agreement, "--min-agreement"),
        "allow_signature_change": allow_signature_change,
    }
    if min_agreement is not None and not body["shadow"]:
        msg = "--min-agreement is judged in the shadow check: give --shadow DURATION too"
        raise InvalidInputError(msg)
    with _client(ctx) as client:
        status = client.deploy(body)
    _started(ctx, status, as_json)


@click.command()
@click.argument("name")
@_rollout_options
@_hub_options
@_json_option
@click.pass_context
def rollback(
    ctx: click.Context,
    *,
    name: str,
    to: str,
    waves: str,
    abort_failure_rate: str,
    abort_min_devices: int,
    device_timeout: str,
    retries: int,
    hub_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """A rollout of model NAME back to each selected device's previous version; prints its id."""
    body = {
        "model": name,
        **_common(ctx.params),
    }
    with _client(ctx) as client:
        status = client.rollback(body)
    _started(ctx, status, as_json)


# -- rollout ------------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Follow and steer rollouts: status, list, pause, resume, cancel."""


def _progress(d: dict[str, Any]) -> str:
    p = d.get("progress")
    if not p or not p.get("of"):
        return ""
    return f"{p['chunks']}/{p['of']} chunks ({100 * p['chunks'] / p['of']:.0f}%)"


def _status_table(s: dict[str, Any]) -> Group:
    """The heading line (not a table title: rich wraps those to the table's width), the reason, the table."""
    what = f"v{s['version']}" if s["version"] is not None else "back to each device's previous version"
    rate = f"failure rate {s['failure_rate']:.0%}"
    heading = f"rollout {s['id']}: {s['model']} {what}, {s['state']} (wave {s['wave']}, {rate})"
    lines: list[Any] = [Text(heading, style="bold")]
    if s.get("reason"):
        lines.append(Text(s["reason"]))
    table = Table()
    for column in ("device", "wave", "state", "from", "to", "progress", "reason"):
        table.add_column(column)
    for d in s["devices"]:
        prev = "-" if d["previous"] is None else f"v{d['previous']}"
        table.add_row(d["device"], str(d["wave"]), d["state"], prev, f"v{d['target']}", _progress(d), d["reason"])
    return Group(*lines, table)


@rollout.command("status")
@click.argument("rollout_id", metavar="ID")
@click.option("--watch", is_flag=True, help="follow it live (download progress too) until it ends")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="--watch's refresh, s")
@_hub_options
@_json_option
@click.pass_context
def status(
    ctx: click.Context, *, rollout_id: str, watch: bool, interval: float, hub_url: str, token: str | None, as_json: bool
) -> None:
    """One rollout: its state and every device's wave, state and reason. With --watch it exits 0
    when the rollout completes and 1 when it ends aborted or cancelled."""
    with _client(ctx) as client:
        s = client.rollout(rollout_id)
        if not watch:
            if as_json:
                emit_json(s)
            else:
                console.print(_status_table(s))
            return
        if as_json:  # one JSON document per line, each time something changed
            last = None
            while True:
                if s != last:
                    sys.stdout.write(json.dumps(s, sort_keys=True) + "\n")
                    sys.stdout.flush()
                    last = s
                if s["state"] in ENDED:
                    break
                time.sleep(interval)
                s = client.rollout(rollout_id)
        else:
            with Live(_status_table(s), console=console, auto_refresh=False) as live:
                while s["state"] not in ENDED:
                    time.sleep(interval)
                    s = client.rollout(rollout_id)
                    live.update(_status_table(s), refresh=True)
    if s["state"] != "completed":
        console.print(f"rollout {rollout_id} ended {s['state']}: {s.get('reason') or 'see the table'}", soft_wrap=True)
        ctx.exit(1)


@rollout.command("list")
@_hub_options
@_json_option
@click.pass_context
def list_(ctx: click.Context, hub_url: str, token: str | None, as_json: bool) -> None:
    """Every rollout, newest first."""
    with _client(ctx) as client:
        found = client.rollouts()
    if as_json:
        emit_json(found)
        return
    if not found:
        console.print("no rollout yet: `edgekit deploy NAME:VERSION --to all` starts one")
        return
    table = Table(title="rollouts")
    for column in ("id", "kind", "model", "version", "state", "devices", "created", "reason"):
        table.add_column(column)
    for r in found:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["counts"].items()))
        version = "-" if r["version"] is None else str(r["version"])
        table.add_row(r["id"], r["kind"], r["model"], version, r["state"], counts, r["created"], r["reason"])
    console.print(table)


def _control(action: str) -> click.Command:
    @click.command(action)
    @click.argument("rollout_id", metavar="ID")
    @_hub_options
    @_json_option
    @click.pass_context
    def command(ctx: click.Context, rollout_id: str, hub_url: str, token: str | None, as_json: bool) -> None:
        with _client(ctx) as client:
            s = client.control(rollout_id, action)
        if as_json:
            emit_json(s)
        else:
            console.print(f"rollout {rollout_id} is {s['state']}", soft_wrap=True)

    command.help = {
        "pause": "Pause a running rollout: no further device starts; those in progress finish.",
        "resume": "Resume a paused rollout (the time paused does not count against --device-timeout).",
        "cancel": "Cancel a rollout: no further device starts; those in progress finish what they do.",
    }[action]
    return command


for _action in ("pause", "resume", "cancel"):
    rollout.add_command(_control(_action))

COMMANDS = [deploy, rollback, rollout]
