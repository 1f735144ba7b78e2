"""`edgekit serve` and `edgekit score`: the runtime's commands, reachable from the toolkit CLI."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
