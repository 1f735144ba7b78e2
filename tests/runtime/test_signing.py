"""Bundle signatures: every member covered, tampering anywhere refused, trust enforced by the Runtime
however a version reached the store."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime import Runtime
from edgekit_runtime.bundle import SIGNATURE, read_bundle, read_bundle_dir
from edgekit_runtime.errors import InvalidInputError, NotFoundError, SignatureError, UnavailableError
from edgekit_runtime.signing import (
    PublicKey,
    SigningKey,
    generate_keys,
    load_public_key,
    load_signing_key,
    sign_bundle,
    verify_bundle,
)
from edgekit_runtime.store import install_bundle
from tests.runtime.test_bundle import rezip


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, PublicKey]:
    private, public = generate_keys(tmp_path_factory.mktemp("keys"))
    return load_signing_key(private), load_public_key(public)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return load_signing_key(generate_keys(tmp_path_factory.mktemp("other"))[0])


def signed_copy(src: Path, dst: Path, key: SigningKey) -> Path:
    b = read_bundle(src)
    return dataclasses.replace(b, signature=sign_bundle(b, key)).write(dst)


def test_a_signed_bundle_verifies_from_the_file_and_once_installed(
    bundles: dict[str, Path], tmp_path: Path, store: Path, keypair: tuple[SigningKey, PublicKey]
) -> None:
    key, pub = keypair
    signed = signed_copy(bundles["mlp"], tmp_path / "s.ekb", key)
    assert verify_bundle(read_bundle(signed), [pub]).id == pub.id
    installed = install_bundle(signed, store)
    assert verify_bundle(read_bundle_dir(installed), [pub]).id == pub.id
    statement = json.loads(read_bundle(signed).signature or b"")
    assert sorted(statement["members"]) == ["golden/inputs.npz", "golden/outputs.npz", "manifest.json", "model.tflite"]


@pytest.mark.parametrize("member", ["manifest.json", "golden/inputs.npz", "golden/outputs.npz"])
def test_a_change_to_any_member_is_refused(
    bundles: dict[str, Path], tmp_path: Path, keypair: tuple[SigningKey, PublicKey], member: str
) -> None:
    key, pub = keypair
    signed = signed_copy(bundles["mlp"], tmp_path / "s.ekb", key)
    with zipfile.ZipFile(signed) as z:
        members = {n: z.read(n) for n in z.namelist()}
    if member == "manifest.json":
        m = json.loads(members[member])
        m["validation"]["note"] = "edited"
        members[member] = json.dumps(m).encode()
    else:  # the model: see the test below (a changed model must also change the manifest's hash)
        data = dict(np.load(io.BytesIO(members[member])))
        first = next(iter(data))
        data[first] = data[first] + 1
        buf = io.BytesIO()
        np.savez(buf, **data)
        members[member] = buf.getvalue()
    tampered = tmp_path / "t.ekb"
    with zipfile.ZipFile(tampered, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    with pytest.raises(SignatureError, match=f"{member} differ from what key {pub.id} signed"):
        verify_bundle(read_bundle(tampered), [pub])


def test_a_new_model_with_a_matching_manifest_hash_is_still_refused(
    bundles: dict[str, Path], tmp_path: Path, keypair: tuple[SigningKey, PublicKey]
) -> None:
    key, pub = keypair
    signed = signed_copy(bundles["mlp"], tmp_path / "s.ekb", key)
    other = read_bundle(bundles["mlp_v2"]).model  # a different model, its hash written into the manifest

    def edit(m: dict[str, object]) -> None:
        m["model_sha256"] = hashlib.sha256(other).hexdigest()
        m["model_size_bytes"] = len(other)

    tampered = rezip(signed, tmp_path / "t.ekb", edit=edit, extra={"model.tflite": other})
    with pytest.raises(SignatureError, match=r"manifest\.json, model\.tflite differ"):
        verify_bundle(read_bundle(tampered), [pub])


def test_unsigned_untrusted_and_forged_signatures_are_refused(
    bundles: dict[str, Path], tmp_path: Path, keypair: tuple[SigningKey, PublicKey], other_key: SigningKey
) -> None:
    key, pub = keypair
    with pytest.raises(SignatureError, match="not signed; sign it with `edgekit sign"):
        verify_bundle(read_bundle(bundles["mlp"]), [pub])
    by_other = signed_copy(bundles["mlp"], tmp_path / "o.ekb", other_key)
    with pytest.raises(SignatureError, match=f"signed by key {other_key.public.id}, not trusted here"):
        verify_bundle(read_bundle(by_other), [pub])
    # a statement naming the trusted key but signed by another one
    good = json.loads(sign_bundle(read_bundle(bundles["mlp"]), key))
    forged = json.loads(sign_bundle(read_bundle(bundles["mlp"]), other_key))
    good["signature"] = forged["signature"]
    b = dataclasses.replace(read_bundle(bundles["mlp"]), signature=json.dumps(good).encode())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(b, [pub])
    for junk in (b"", b"not json", b'{"schema_version": 1}', b'{"schema_version": 1, "algorithm": "rsa"}', b"[]"):
        b = dataclasses.replace(read_bundle(bundles["mlp"]), signature=junk)
        with pytest.raises(SignatureError, match=f"{SIGNATURE} is not an edgekit signature"):
            verify_bundle(b, [pub])


def test_key_files_are_checked(tmp_path: Path) -> None:
    private, public = generate_keys(tmp_path / "k")
    with pytest.raises(InvalidInputError, match="this is a private key"):
        load_public_key(private)
    with pytest.raises(InvalidInputError, match="this is a public key"):
        load_signing_key(public)
    with pytest.raises(NotFoundError, match="edgekit keys generate"):
        load_public_key(tmp_path / "none.pub")
    damaged = tmp_path / "d.pub"
    damaged.write_text("edgekit-ed25519-public AAAA\n")
    with pytest.raises(InvalidInputError, match="not 32 bytes"):
        load_public_key(damaged)
    with pytest.raises(InvalidInputError, match="never overwritten"):
        generate_keys(tmp_path / "k")


def test_the_runtime_with_trusted_keys_serves_only_signed_versions(
    bundles: dict[str, Path], store: Path, tmp_path: Path, keypair: tuple[SigningKey, PublicKey], other_key: SigningKey
) -> None:
    key, pub = keypair
    install_bundle(signed_copy(bundles["two"], tmp_path / "two.ekb", key), store)
    install_bundle(bundles["mlp"], store)  # unsigned, dropped into the store by hand
    with Runtime([store], trusted_keys=[pub]) as rt:
        rt.refresh()
        assert rt.get("two").version == 1
        assert f"signed by {pub.id}" in rt.status("two")[0].detail
        with pytest.raises(UnavailableError, match="not signed"):
            rt.get("mlp")
    install_bundle(signed_copy(bundles["mlp_v2"], tmp_path / "v2.ekb", other_key), store)
    with Runtime([store], trusted_keys=[pub]) as rt:
        rt.refresh()
        [v2, v1] = rt.status("mlp")
        assert "not signed" in v1.error_message
        assert v2.error_code == "FAILED_PRECONDITION"
        assert "not trusted here" in v2.error_message
    with Runtime([store]) as rt:  # no trusted keys given: signatures are not checked
        rt.refresh()
        assert rt.get("mlp").version == 2
