"""`edgekit keys generate` and `edgekit sign`: Ed25519 keys and bundle signatures, on the workstation.

Private keys never leave it (as with Mender): the hub and the devices are given the public key only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from edgekit.cli._output import console
from edgekit_runtime.bundle import read_bundle
from edgekit_runtime.signing import load_signing_key, sign_bundle, signer_of

__all__ = ["keys", "sign"]


@click.group()
def keys() -> None:
    """Signing keys for bundles."""


@keys.command("generate")
@click.argument("folder", type=click.Path(path_type=Path))
def generate(folder: Path) -> None:
    """Create an Ed25519 pair in FOLDER: edgekit-signing.key (0600, keep it here) and edgekit-signing.pub
    (give it to the hub and the devices). Existing keys are never overwritten."""
    from edgekit_runtime.signing import generate_keys, load_public_key

    private, public = generate_keys(folder)
    console.print(f"private key {private} (mode 0600: keep it on this machine, never on the hub)", soft_wrap=True)
    console.print(f"public key  {public} (key id {load_public_key(public).id}: give it to --trust-key)", soft_wrap=True)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True, help="private key file")
def sign(bundle: Path, key_path: Path) -> None:
    """Sign BUNDLE in place (atomically): the signature covers every member a device reads
    (manifest, model, golden samples). A signature already there is replaced."""
    key = load_signing_key(key_path)
    b = read_bundle(bundle)
    previous = signer_of(b, str(bundle)) if b.signature is not None else None
    signed = dataclasses.replace(b, signature=sign_bundle(b, key))
    signed.write(bundle)
    again = f" (replacing a signature by {previous})" if previous else ""
    console.print(f"signed {bundle} with key {key.public.id}{again}", soft_wrap=True)
