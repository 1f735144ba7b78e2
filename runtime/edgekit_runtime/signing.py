"""Bundle signatures: Ed25519 over a statement of the sha256 of every member, Mender's scheme.

``manifest.sig`` holds a signed statement: the signer's key id and the sha256 of every other member
of the bundle (``manifest.json``, the model, the golden samples). Verifying recomputes the hashes of
the members as they are (in a ``.ekb`` or an installed folder), so one changed, added or removed
byte anywhere a device reads is refused, not only a changed manifest. Private keys stay on the
workstation (``edgekit keys generate`` / ``edgekit sign``); hubs and devices hold public keys only.

Key files (docs/signing.md):

- private: one line ``edgekit-ed25519-private <base64 of the 32-byte seed>``, mode 0600;
- public: one line ``edgekit-ed25519-public <base64 of the 32-byte key>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgekit_runtime.bundle import MANIFEST, SIGNATURE, Bundle, sha256_bytes
from edgekit_runtime.errors import InvalidInputError, NotFoundError, SignatureError

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "PublicKey",
    "SigningKey",
    "generate_keys",
    "load_public_key",
    "load_signing_key",
    "member_hashes",
    "sign_bundle",
    "signer_of",
    "verify_bundle",
]

PRIVATE_KEY_FILE = "edgekit-signing.key"
PUBLIC_KEY_FILE = "edgekit-signing.pub"
_PRIVATE_TAG = "edgekit-ed25519-private"
_PUBLIC_TAG = "edgekit-ed25519-public"
_STATEMENT_SCHEMA = 1
# Signed bytes start with this, so a signature made for a bundle can never pass for anything else.
_DOMAIN = b"edgekit bundle signature v1\n"
_MAX_SIG_BYTES = 1 << 20


def key_id(public: bytes) -> str:
    """A short, stable name of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    origin: str = ""

    @property
    def id(self) -> str:
        return key_id(self.raw)


@dataclass(frozen=True)
class SigningKey:
    seed: bytes
    origin: str = ""

    @property
    def public(self) -> PublicKey:
        from nacl.signing import SigningKey as NaclSigningKey

        return PublicKey(bytes(NaclSigningKey(self.seed).verify_key), self.origin)


def _read_key(path: Path, tag: str, what: str) -> bytes:
    try:
        text = path.read_text()
    except FileNotFoundError:
        msg = f"{path}: no such {what} key file; create a pair with `edgekit keys generate DIR`"
        raise NotFoundError(msg) from None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{path}: unreadable {what} key file ({e})"
        raise InvalidInputError(msg) from None
    parts = text.split()
    if len(parts) != 2 or parts[0] != tag:
        other = _PUBLIC_TAG if tag == _PRIVATE_TAG else _PRIVATE_TAG
        hint = f" (this is a {'public' if what == 'private' else 'private'} key)" if parts[:1] == [other] else ""
        msg = f"{path}: not an edgekit {what} key{hint}; expected one line '{tag} <base64>'"
        raise InvalidInputError(msg)
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        msg = f"{path}: the {what} key is not 32 bytes of base64; the file is damaged, use a fresh copy"
        raise InvalidInputError(msg)
    return raw


def load_signing_key(path: str | Path) -> SigningKey:
    path = Path(path)
    return SigningKey(_read_key(path, _PRIVATE_TAG, "private"), str(path))


def load_public_key(path: str | Path) -> PublicKey:
    path = Path(path)
    return PublicKey(_read_key(path, _PUBLIC_TAG, "public"), str(path))


def generate_keys(folder: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 pair in ``folder``: the private key 0600, the public key 0644. Never overwrites."""
    from nacl.signing import SigningKey as NaclSigningKey

    folder = Path(folder)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for p in (private, public):
        if p.exists() or p.is_symlink():
            msg = f"{p} already exists; keys are never overwritten: choose another folder or move it away"
            raise InvalidInputError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create {folder}: {e.strerror}"
        raise InvalidInputError(msg) from e
    key = NaclSigningKey.generate()
    seed, verify = bytes(key), bytes(key.verify_key)
    _write_new(private, f"{_PRIVATE_TAG} {base64.b64encode(seed).decode()}\n", 0o600)
    try:
        _write_new(public, f"{_PUBLIC_TAG} {base64.b64encode(verify).decode()}\n", 0o644)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return private, public


def _write_new(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        msg = f"{path} already exists; keys are never overwritten"
        raise InvalidInputError(msg) from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def member_hashes(bundle: Bundle) -> dict[str, str]:
    """sha256 of every member a device reads, from the bytes as they were read."""
    m = bundle.manifest
    hashes = {MANIFEST: sha256_bytes(bundle.manifest_bytes or m.to_json()), m.model_file: sha256_bytes(bundle.model)}
    if m.golden is not None:
        gin, gout = bundle.golden_members()
        hashes[m.golden.inputs] = sha256_bytes(gin)
        hashes[m.golden.outputs] = sha256_bytes(gout)
    return hashes


def _statement(kid: str, members: dict[str, str]) -> bytes:
    body = {"algorithm": "ed25519", "key_id": kid, "members": members, "schema_version": _STATEMENT_SCHEMA}
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_bundle(bundle: Bundle, key: SigningKey) -> bytes:
    """The ``manifest.sig`` member for ``bundle`` signed with ``key``."""
    from nacl.signing import SigningKey as NaclSigningKey

    kid = key.public.id
    members = member_hashes(bundle)
    signature = NaclSigningKey(key.seed).sign(_statement(kid, members)).signature
    doc = {
        "algorithm": "ed25519",
        "key_id": kid,
        "members": members,
        "schema_version": _STATEMENT_SCHEMA,
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class _Statement:
    key_id: str
    members: dict[str, str]
    signature: bytes


def _parse(raw: bytes, where: str) -> _Statement:
    bad = f"{where}: {SIGNATURE} is not an edgekit signature; re-sign the bundle with `edgekit sign`"
    if len(raw) > _MAX_SIG_BYTES:
        raise SignatureError(bad)
    try:
        doc = json.loads(raw)
        if doc.get("schema_version") != _STATEMENT_SCHEMA or doc.get("algorithm") != "ed25519":
            raise SignatureError(bad)
        members = doc["members"]
        kid = doc["key_id"]
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise SignatureError(bad) from None
    if (
        not isinstance(kid, str)
        or not isinstance(members, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in members.items())
    ):
        raise SignatureError(bad)
    return _Statement(kid, members, signature)


def signer_of(bundle: Bundle, where: str = "bundle") -> str:
    """The key id a bundle claims to be signed by (not verified); SignatureError when unsigned."""
    if bundle.signature is None:
        msg = f"{where}: the bundle is not signed; sign it with `edgekit sign BUNDLE --key KEY`"
        raise SignatureError(msg)
    return _parse(bundle.signature, where).key_id


def verify_bundle(bundle: Bundle, trusted: Iterable[PublicKey], where: str = "bundle") -> PublicKey:
    """Check that a trusted key signed exactly these members; the key that did, else SignatureError."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    keys = {k.id: k for k in trusted}
    kid = signer_of(bundle, where)
    statement = _parse(bundle.signature or b"", where)
    key = keys.get(kid)
    if key is None:
        known = ", ".join(sorted(keys)) or "none"
        msg = f"{where}: signed by key {kid}, not trusted here (trusted: {known}); trust its .pub with --trust-key"
        raise SignatureError(msg)
    try:
        VerifyKey(key.raw).verify(_statement(kid, statement.members), statement.signature)
    except BadSignatureError:
        msg = f"{where}: the signature does not verify with key {kid}: the bundle was tampered with after signing"
        raise SignatureError(msg) from None
    actual = member_hashes(bundle)
    if actual != statement.members:
        changed = sorted(n for n in set(actual) | set(statement.members) if actual.get(n) != statement.members.get(n))
        msg = f"{where}: {', '.join(changed)} differ from what key {kid} signed: the bundle was changed after signing"
        raise SignatureError(msg)
    return key
