"""The `edgekit` command line: one group, commands from this package and from plugins.

Errors raised as EdgekitError become one line on stderr and the error's exit code, never a
traceback. `edgekit convert` comes from the edgekit-ml-converters distribution through the
`edgekit.commands` entry point group, so the toolkit runs without TensorFlow.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import NoReturn

import click

from edgekit import __version__
from edgekit.errors import MissingDependencyError
from edgekit_runtime.cli import ErrorMappingGroup

_PLUGIN_HINTS = {
    "convert": "edgekit-ml-converters",
}


def _missing(name: str, dist: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True}, add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: tuple[str, ...]) -> NoReturn:
        msg = f"`edgekit {name}` needs the {dist} package: pip install {dist}"
        raise MissingDependencyError(msg)

    stub.help = f"(needs {dist}: pip install {dist})"
    return stub


@click.group(cls=ErrorMappingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: convert, serve, update and watch ML models on edge devices."""


def _register() -> None:
    from edgekit.cli import broker, bundles, profiles, serving, signing

    cli.add_command(profiles.profiles)
    cli.add_command(signing.keys)
    cli.add_command(signing.sign)
    cli.add_command(broker.broker_config)
    cli.add_command(bundles.inspect)
    cli.add_command(bundles.bench)
    for command in serving.COMMANDS:
        cli.add_command(command)
    from edgekit.cli import demo, fleet, hub, rollouts, watch

    cli.add_command(hub.hub)
    cli.add_command(demo.demo)
    for command in (*fleet.COMMANDS, *rollouts.COMMANDS, *watch.COMMANDS):
        cli.add_command(command)
    found: set[str] = set()
    for ep in entry_points(group="edgekit.commands"):
        try:
            command = ep.load()
        except ImportError as e:
            cli.add_command(_missing(ep.name, f"{_PLUGIN_HINTS.get(ep.name, ep.value)} ({e})"))
            continue
        cli.add_command(command, ep.name)
        found.add(ep.name)
    for name, dist in _PLUGIN_HINTS.items():
        if name not in found:
            cli.add_command(_missing(name, dist))


_register()


def main() -> None:
    cli(prog_name="edgekit")
    sys.exit(0)
