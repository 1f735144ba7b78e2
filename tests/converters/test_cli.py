"""`edgekit convert`'s command line itself: its help text."""

from __future__ import annotations

from collections.abc import Callable

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
