"""Signing keys, key ids, trust store."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vllm_tensafe.errors import KeyFileError, OutputExistsError
from vllm_tensafe.tssp.signing import (
    TrustStore,
    key_id,
    load_signing_key,
    sign_manifest,
    signature_valid,
    write_signing_keypair,
)


def test_keypair_files(tmp_path: Path) -> None:
    key_path, pub_path = write_signing_keypair(tmp_path / "k")
    assert key_path.name == "k.key" and pub_path.name == "k.pub"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key = load_signing_key(key_path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()
    assert TrustStore.from_files([pub_path]).key_ids == {key_id(key.public_key())}


def test_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    key_path, _ = write_signing_keypair(tmp_path / "k")
    before = key_path.read_bytes()
    with pytest.raises(OutputExistsError, match=r"refusing to overwrite"):
        write_signing_keypair(tmp_path / "k")
    assert key_path.read_bytes() == before
    write_signing_keypair(tmp_path / "k", force=True)
    assert key_path.read_bytes() != before
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_passphrase(tmp_path: Path) -> None:
    key_path, _ = write_signing_keypair(tmp_path / "k", passphrase="correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in key_path.read_bytes()
    load_signing_key(key_path, "correct horse")
    with pytest.raises(KeyFileError, match=r"no passphrase was given"):
        load_signing_key(key_path)
    with pytest.raises(KeyFileError, match=r"wrong passphrase"):
        load_signing_key(key_path, "battery staple")
    plain, _ = write_signing_keypair(tmp_path / "p")
    with pytest.raises(KeyFileError, match=r"not encrypted"):
        load_signing_key(plain, "x")


def test_signature_domain_separated(tmp_path: Path) -> None:
    key = load_signing_key(write_signing_keypair(tmp_path / "k")[0])
    sig = sign_manifest(key, b"{}")
    assert signature_valid(key.public_key(), b"{}", sig)
    assert not signature_valid(key.public_key(), b"{} ", sig)
    # A plain signature over the same bytes (no domain prefix) does not pass.
    assert not signature_valid(key.public_key(), b"{}", key.sign(b"{}"))


def test_trust_store_bad_files_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    with pytest.raises(KeyFileError, match=r"garbage.pub"):
        TrustStore.from_files([garbage])
    with pytest.raises(KeyFileError, match=r"missing.pub"):
        TrustStore.from_files([tmp_path / "missing.pub"])
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match=r"not an Ed25519 key"):
        TrustStore.from_files([ec_pub])
    key_path, _ = write_signing_keypair(tmp_path / "k")
    with pytest.raises(KeyFileError, match=r"k\.key"):
        TrustStore.from_files([key_path])  # a private key is not a trusted public key file
    huge = tmp_path / "huge.pub"
    huge.write_bytes(b"A" * 100_000)
    with pytest.raises(KeyFileError, match=r"huge.pub"):
        TrustStore.from_files([huge])
    assert len(TrustStore.from_files([])) == 0
