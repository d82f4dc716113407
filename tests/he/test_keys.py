"""Key files: passphrase sealing, refusal of secret material where only public is allowed."""

from __future__ import annotations

import os
import random
import stat
import struct
from pathlib import Path

import pytest

from vllm_tensafe.errors import HEError, OutputExistsError
from vllm_tensafe.he import PublicContext, SecretKeySet, write_keypair
from vllm_tensafe.he.keys import (
    PUBLIC_MAGIC,
    SEAL_FILES,
    TAG_GALOIS_KEYS,
    TAG_SECRET_KEY,
)


def test_passphrase_round_trip(tmp_path: Path) -> None:
    secret_path, public_path = write_keypair(tmp_path / "owner", "default", "correct horse")
    assert secret_path.name == "owner.secret" and public_path.name == "owner.public"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert secret_path.read_bytes().startswith(b"TSHESEC\x00")
    loaded = SecretKeySet.load(secret_path, "correct horse")
    public = PublicContext.from_bytes(public_path.read_bytes())
    assert loaded.key_id == public.key_id == loaded.public_context().key_id
    assert len(public.key_id) == 64 and public.slot_count == 4096


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    secret_path, _ = write_keypair(tmp_path / "k", "fast", "right")
    with pytest.raises(HEError, match="wrong passphrase") as err:
        SecretKeySet.load(secret_path, "wrong")
    assert err.value.fix and "passphrase" in err.value.fix
    with pytest.raises(HEError, match="no passphrase was given"):
        SecretKeySet.load(secret_path)


def test_unencrypted_round_trip_and_save(tmp_path: Path, secret: SecretKeySet) -> None:
    path = tmp_path / "plain.secret"
    secret.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SecretKeySet.load(path)
    assert again.key_id == secret.key_id
    with pytest.raises(HEError, match="empty passphrase"):
        secret.save(tmp_path / "x.secret", "")


def test_secret_file_errors(tmp_path: Path, ctx: PublicContext) -> None:
    with pytest.raises(HEError, match="does not exist"):
        SecretKeySet.load(tmp_path / "missing.secret")
    public = tmp_path / "k.public"
    public.write_bytes(ctx.to_bytes())
    with pytest.raises(HEError, match="public context, not a secret key"):
        SecretKeySet.load(public)
    junk = tmp_path / "junk.secret"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(HEError, match="not a vllm-tensafe secret key file"):
        SecretKeySet.load(junk)
    secret_path, _ = write_keypair(tmp_path / "t", "default", "pw")
    data = bytearray(secret_path.read_bytes())
    data[-40] ^= 1  # tampering is caught by the AEAD tag
    secret_path.write_bytes(bytes(data))
    with pytest.raises(HEError, match=r"wrong passphrase .* altered"):
        SecretKeySet.load(secret_path, "pw")


def test_write_keypair_never_overwrites_a_secret(tmp_path: Path) -> None:
    write_keypair(tmp_path / "k")
    with pytest.raises(OutputExistsError, match="refusing to overwrite"):
        write_keypair(tmp_path / "k")


def test_public_context_refuses_secret_material(tmp_path: Path, secret: SecretKeySet) -> None:
    path = tmp_path / "s.secret"
    secret.save(path)
    with pytest.raises(HEError, match="holds the CKKS secret key"):
        PublicContext.from_bytes(path.read_bytes())
    # A public container with a secret-key (or Galois-key) section smuggled in.
    raw = secret.public_context().to_bytes()
    key_blob = SEAL_FILES.save(secret.secret_key)
    for tag, text in ((TAG_SECRET_KEY, "secret key"), (TAG_GALOIS_KEYS, "Galois")):
        forged = raw + struct.pack("<BI", tag, len(key_blob)) + key_blob
        with pytest.raises(HEError, match=text):
            PublicContext.from_bytes(forged)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        # Seeded, not os.urandom: the same test ids and inputs in every run and worker.
        random.Random(1).randbytes(4096),
        PUBLIC_MAGIC + b"\x01\x00" + random.Random(2).randbytes(64),
        PUBLIC_MAGIC + b"\x02\x00",
    ],
    ids=["empty", "random", "magic-v1-random", "magic-v2-short"],
)
def test_public_context_refuses_malformed_bytes(data: bytes) -> None:
    with pytest.raises(HEError):
        PublicContext.from_bytes(data)


def test_public_context_refuses_truncation_and_size(ctx: PublicContext) -> None:
    raw = ctx.to_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 30):
        with pytest.raises(HEError):
            PublicContext.from_bytes(raw[:cut])
    with pytest.raises(HEError, match="limit"):
        PublicContext.from_bytes(raw, max_size=1000)
    corrupted = bytearray(raw)
    corrupted[len(raw) // 2] ^= 0xFF
    try:
        changed = PublicContext.from_bytes(bytes(corrupted))
    except HEError:
        return
    # A flip that keeps every residue below its prime parses, but the key id changes: the
    # signed manifest pins the key id, so such a context is refused there.
    assert changed.key_id != ctx.key_id


def test_public_context_round_trip(ctx: PublicContext) -> None:
    again = PublicContext.from_bytes(ctx.to_bytes())
    assert again.key_id == ctx.key_id and again.to_bytes() == ctx.to_bytes()
    assert again.profile == ctx.profile
