"""`edgekit profiles list|show`: bundled profiles and users' own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgekit.cli import cli
from edgekit.profiles import bundled_profiles, load_profile

BUNDLED = {"android-arm64", "coral-edgetpu", "cortex-m", "generic-cpu", "jetson-orin", "raspberrypi", "x86-server"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_every_bundled_profile_is_valid() -> None:
    assert set(bundled_profiles()) == BUNDLED
    for name, path in bundled_profiles().items():
        profile = load_profile(name)
        assert profile.name == name == path.stem
        assert profile.references, f"{name}: cite the vendor docs"


def test_list_table_and_json() -> None:
    r = invoke("profiles", "list")
    assert r.exit_code == 0
    for name in BUNDLED:
        assert name in r.output
    r = invoke("profiles", "list", "--json")
    assert {p["name"] for p in json.loads(r.stdout)} == BUNDLED


def test_show_by_name_and_by_file(tmp_path: Path) -> None:
    r = invoke("profiles", "show", "coral-edgetpu", "--json")
    data = json.loads(r.stdout)
    assert data["conversion"]["quantization"] == "int8-only"
    assert data["constraints"]["full_integer"] is True
    own = tmp_path / "mine.toml"
    own.write_text(bundled_profiles()["generic-cpu"].read_text().replace('name = "generic-cpu"', 'name = "mine"'))
    r = invoke("profiles", "show", str(own))
    assert r.exit_code == 0
    assert "mine" in r.output


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("threads = 2", "threads = 'two'"), "runtime.threads"),
        (("[conversion]", "[conversion]\nspeed = 'fast'"), "conversion.speed"),
        (('quantization = "float32"', 'quantization = "int4"'), "conversion"),
    ],
)
def test_bad_profile_names_key_and_file(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(bundled_profiles()["generic-cpu"].read_text().replace(*edit, 1))
    r = invoke("profiles", "show", str(path))
    assert r.exit_code == 10
    assert str(path) in r.output
    assert key in r.output


def test_unknown_profile() -> None:
    r = invoke("profiles", "show", "nope")
    assert r.exit_code == 10
    assert "unknown profile 'nope'" in r.output


def test_help_lists_every_command() -> None:
    r = invoke("--help")
    assert r.exit_code == 0
    for command in ("convert", "inspect", "bench", "profiles"):
        assert command in r.output
    r = invoke("convert", "--help")
    assert r.exit_code == 0
    assert "--synthetic-calibration" in r.output
    assert "--no-strict" in r.output
