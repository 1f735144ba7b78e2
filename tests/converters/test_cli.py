"""`edgekit convert`'s command line itself: its help text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from click.testing import Result

Invoke = Callable[..., Result]


def _help(invoke: Invoke) -> str:
    """`convert --help` with click's line wrapping undone."""
    r = invoke("convert", "--help")
    assert r.exit_code == 0
    return " ".join(r.output.split())


def test_help_shows_a_percent_sign_once(cli_invoke: Invoke) -> None:
    text = _help(cli_invoke)
    assert "%%" not in text
    assert "20% held out of --calibration" in text


def test_version_option_has_help(cli_invoke: Invoke) -> None:
    assert "--version INTEGER RANGE integer version in the manifest" in _help(cli_invoke)


def test_error_lines_start_at_once_on_a_real_stderr(tmp_path: Path) -> None:
    """A pipe, not CliRunner: the live progress display once left a blank line before the error."""
    import subprocess
    import sys

    for args in (["convert", str(tmp_path / "nosuch.keras"), "--profile", "raspberrypi"], ["inspect", "nosuch.ekb"]):
        run = subprocess.run(
            [sys.executable, "-c", "from edgekit.cli import main; main()", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode != 0
        assert run.stdout == ""
        assert run.stderr.startswith("Error: "), repr(run.stderr[:80])
        assert len(run.stderr.splitlines()) == 1, run.stderr
