"""`edgekit keys generate` and `edgekit sign` as a user runs them, and `serve --trust-key` refusing
what was not signed by a trusted key."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from edgekit.cli import cli
from tests.toolkit.test_readme import digits_bundle


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_keys_generate_writes_a_private_0600_key_and_never_overwrites(tmp_path: Path) -> None:
    r = invoke("keys", "generate", str(tmp_path / "keys"))
    assert r.exit_code == 0, r.output
    private, public = tmp_path / "keys" / "edgekit-signing.key", tmp_path / "keys" / "edgekit-signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    before = private.read_bytes()
    r = invoke("keys", "generate", str(tmp_path / "keys"))
    assert r.exit_code == 2
    assert r.output.startswith(f"Error: {private} already exists; keys are never overwritten")
    assert private.read_bytes() == before


def test_sign_in_place_then_inspect_says_signed(tmp_path: Path) -> None:
    bundle = digits_bundle(tmp_path / "digits.ekb")
    assert invoke("keys", "generate", str(tmp_path / "k")).exit_code == 0
    r = invoke("sign", str(bundle), "--key", str(tmp_path / "k" / "edgekit-signing.key"))
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"signed {bundle} with key ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.ekb", "k"]  # no temporary file left
    r = CliRunner().invoke(cli, ["inspect", str(bundle), "--json"])
    assert json.loads(r.stdout)["signed"] is True
    r = invoke("sign", str(bundle), "--key", str(tmp_path / "k" / "edgekit-signing.pub"))
    assert r.exit_code == 2
    assert "this is a public key" in r.output


def test_serve_with_trust_key_refuses_an_unsigned_bundle(tmp_path: Path) -> None:
    bundle = digits_bundle(tmp_path / "digits.ekb")
    assert invoke("keys", "generate", str(tmp_path / "k")).exit_code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "edgekit_runtime", "serve", str(bundle), "--port", "0", "--poll-seconds", "0",
         "--trust-key", str(tmp_path / "k" / "edgekit-signing.pub")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 9, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: nothing to serve: digits v1 failed to load: ")
    assert last.endswith("the bundle is not signed; sign it with `edgekit sign BUNDLE --key KEY`")
