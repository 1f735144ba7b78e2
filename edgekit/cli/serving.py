"""`edgekit serve` and `edgekit score`: the runtime's own commands, reachable from the toolkit CLI.

They are the very click commands of `edgekit-runtime`, so both CLIs take the same options and
behave the same; the toolkit has rich installed, so `score` shows a rich progress bar.
"""

from __future__ import annotations

import click

from edgekit_runtime.cli import score, serve

COMMANDS: list[click.Command] = [serve, score]
