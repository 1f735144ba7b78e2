"""`edgekit convert` (registered through the `edgekit.commands` entry point)."""

from __future__ import annotations

import click


@click.command()
@click.argument("model")
def convert(model: str) -> None:
    """Convert MODEL for device profiles (not built yet)."""
    raise click.ClickException("not built yet")
