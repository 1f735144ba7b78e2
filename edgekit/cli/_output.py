"""Shared output helpers: a rich console on stderr for humans, plain JSON on stdout for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


json_option_help = "print a machine-readable JSON document on stdout instead of tables"
