"""The `edgekit` command line: one group, commands from this package and from plugins.

Errors raised as EdgekitError become one line on stderr and the error's exit code, never a
traceback. `edgekit convert` comes from the edgekit-ml-converters distribution through the
`edgekit.commands` entry point group, so the toolkit runs without TensorFlow.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import Any, NoReturn

import click

from edgekit import __version__
from edgekit.errors import EdgekitError, MissingDependencyError

_PLUGIN_HINTS = {
    "convert": "edgekit-ml-converters",
}


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


class EdgekitGroup(click.Group):
    """A click group that turns edgekit's errors into one clear line and their exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            raise _Failure(e.message, e.exit_code) from e
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get("EDGEKIT_DEBUG"):
                raise
            msg = f"internal error: {type(e).__name__}: {e} (set EDGEKIT_DEBUG=1 for the traceback and report it)"
            raise _Failure(msg, 70) from e


def _missing(name: str, dist: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True}, add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: tuple[str, ...]) -> NoReturn:
        msg = f"`edgekit {name}` needs the {dist} package: pip install {dist}"
        raise MissingDependencyError(msg)

    stub.help = f"(needs {dist}: pip install {dist})"
    return stub


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: convert, serve, update and watch ML models on edge devices."""


def _register() -> None:
    from edgekit.cli import bundles, profiles, serving

    cli.add_command(profiles.profiles)
    cli.add_command(bundles.inspect)
    cli.add_command(bundles.bench)
    for command in serving.COMMANDS:
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
