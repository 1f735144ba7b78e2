"""`edgekit profiles list|show`: the bundled device profiles and users' own profile files."""

from __future__ import annotations

import click
from rich.table import Table

from edgekit.cli._output import console, emit_json, json_option_help
from edgekit.profiles import bundled_profiles, load_profile


@click.group()
def profiles() -> None:
    """List and show device profiles."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help=json_option_help)
def list_profiles(as_json: bool) -> None:
    """List the bundled device profiles."""
    loaded = [load_profile(path) for path in bundled_profiles().values()]
    if as_json:
        emit_json(
            [
                {
                    "name": p.name,
                    "format": p.conversion.format,
                    "quantization": p.conversion.quantization,
                    "target": p.target.description,
                }
                for p in loaded
            ]
        )
        return
    table = Table(title="device profiles")
    for col in ("name", "format", "quantization", "target"):
        table.add_column(col)
    for p in loaded:
        table.add_row(p.name, p.conversion.format, p.conversion.quantization, p.target.description)
    console.print(table)


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help=json_option_help)
def show_profile(name: str, as_json: bool) -> None:
    """Show one profile (a bundled NAME or a path to a .toml file), validated."""
    profile = load_profile(name)
    data = profile.model_dump(mode="json")
    if as_json:
        emit_json(data)
        return
    for section, values in data.items():
        if isinstance(values, dict):
            table = Table(title=section, show_header=False)
            table.add_column("key", style="bold")
            table.add_column("value")
            for key, value in values.items():
                table.add_row(key, str(value))
            console.print(table)
        else:
            console.print(f"[bold]{section}[/bold]: {values}")
