"""The key holder: what it accepts, what it returns, and the IND-CPA-D attack on its replies."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import tenseal.sealapi as seal

from tests.he.helpers import (
    data_moduli,
    ref,
    secret_key_coefficients,
    unflooded,
    wire_ciphertext,
)
from vllm_tensafe.errors import ForeignCiphertextError, HEError
from vllm_tensafe.he import PublicContext, SecretKeySet, encrypt_matrix, generate_keys
from vllm_tensafe.he.keys import check_seal_blob
from vllm_tensafe.he.ring import Ring
from vllm_tensafe.keyholder import LocalKeyHolder
from vllm_tensafe.keyholder.wire import (
    AdapterRef,
    ciphertext_size,
    decode_request,
    encode_ciphertext,
    encode_request,
)


def product_ciphertext(ctx: PublicContext, value: float = 1.0) -> seal.Ciphertext:
    """A legitimate product: Enc(B') (scale Delta_B) times a U plaintext (scale Delta_U)."""
    matrix = encrypt_matrix(ctx, np.full((64, 1), 0.25))
    plain = seal.Plaintext()
    ctx.encoder.encode(value, ctx.parms_id, ctx.profile.u_scale, plain)
    out = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(matrix.ciphertexts[0][0], plain, out)
    return out


def decoded(ctx: PublicContext, reply: np.ndarray, scale_bits: int) -> np.ndarray:
    """What the host makes of a reply it did not pad: centre, divide by Delta', decode."""
    ring = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
    m = ctx.profile.reply_exponent(scale_bits)
    return ring.decode(ring.centred(reply, m), ring.reply_scale(scale_bits, m))


def test_replies_are_switched_polynomials(local_holder: LocalKeyHolder, ctx: PublicContext) -> None:
    blob = encode_ciphertext(product_ciphertext(ctx))
    (reply,) = local_holder.decrypt(ref(ctx), [blob])
    assert reply.dtype == np.uint64 and reply.shape == (ctx.profile.poly_modulus_degree,)
    values = decoded(ctx, reply, ctx.profile.product_scale_bits)
    assert np.abs(values - 0.25).max() < 1e-6


def test_flooding_is_fresh_and_on_by_default(secret: SecretKeySet, ctx: PublicContext) -> None:
    holder = LocalKeyHolder(secret)
    assert holder._flood
    blob = encode_ciphertext(product_ciphertext(ctx, 3.0))
    bits = ctx.profile.product_scale_bits
    first, second = (decoded(ctx, holder.decrypt(ref(ctx), [blob])[0], bits) for _ in range(2))
    diff = first - second
    sigma = ctx.profile.flood_sigma
    assert 0.5 * sigma < diff.std() / np.sqrt(2) < 2 * sigma
    # The same request without the flood gives the same reply twice.
    quiet = unflooded(secret)
    assert np.array_equal(quiet.decrypt(ref(ctx), [blob])[0], quiet.decrypt(ref(ctx), [blob])[0])


def test_refuses_wrong_key_id(local_holder: LocalKeyHolder, ctx: PublicContext) -> None:
    blob = encode_ciphertext(product_ciphertext(ctx))
    with pytest.raises(ForeignCiphertextError, match="declare key"):
        local_holder.decrypt(AdapterRef("a", "ab" * 32, "cd" * 32), [blob])


def test_refuses_non_protocol_ciphertexts(local_holder: LocalKeyHolder, ctx: PublicContext) -> None:
    profile = ctx.profile
    fresh = encrypt_matrix(ctx, np.ones((64, 1))).ciphertexts[0][0]  # scale Delta_B only
    good = encode_ciphertext(product_ciphertext(ctx))
    moduli = np.array(data_moduli(ctx), dtype=np.uint64)
    residues = np.frombuffer(good, dtype="<u8", offset=2).reshape(2, len(moduli), -1).copy()
    unreduced = residues.copy()
    unreduced[1, 0, 7] = moduli[0]  # one residue equal to its prime
    cases = {
        "scale 2^90": encode_ciphertext(fresh),
        "bytes": good[:-8],
        "NTT flag 0": good[:1] + b"\x00" + good[2:],
        "not reduced": wire_ciphertext(unreduced, profile.product_scale_bits),
    }
    for reason, blob in cases.items():
        with pytest.raises(ForeignCiphertextError, match=re.escape(reason)):
            local_holder.decrypt(ref(ctx), [blob])
    # Nothing is returned when any ciphertext of the batch is refused.
    with pytest.raises(ForeignCiphertextError):
        local_holder.decrypt(ref(ctx), [good, cases["bytes"]])
    # The in-process path checks the SEAL objects the same way.
    half = seal.Plaintext()
    ctx.encoder.encode(1.0, ctx.parms_id, profile.product_scale**0.5, half)
    small = seal.Ciphertext(ctx.context)
    ctx.encryptor.encrypt(half, small)
    squared = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply(small, small, squared)  # right scale, but 3 polynomials
    lower = seal.Ciphertext(ctx.context)
    ctx.evaluator.mod_switch_to_next(small, lower)  # one prime fewer
    for reason, ct in {"scale": fresh, "3 polynomials": squared, "level": lower}.items():
        with pytest.raises(ForeignCiphertextError, match=reason):
            local_holder.decrypt_ciphertexts(ref(ctx), [ct])
    _, precise_ctx = generate_keys("precise")
    wide = encode_ciphertext(product_ciphertext(precise_ctx))  # N = 16384
    with pytest.raises(ForeignCiphertextError):
        local_holder.decrypt(ref(ctx), [wide])


def test_request_codec_round_trip_and_refusals(ctx: PublicContext) -> None:
    blob = bytes(ciphertext_size(ctx.profile))
    body = encode_request(ref(ctx, "sql-adapter"), [blob, blob])
    got, blobs = decode_request(body, 4)
    assert got == ref(ctx, "sql-adapter") and [bytes(b) for b in blobs] == [blob, blob]
    with pytest.raises(HEError, match=r"1\.\.1"):
        decode_request(body, 1)
    with pytest.raises(HEError, match="truncated"):
        decode_request(body[:-1], 4)
    with pytest.raises(HEError, match="bad magic"):
        decode_request(b"GARBAGE!" + body[8:], 4)


def test_zstd_bomb_is_refused_before_seal_sees_it(ctx: PublicContext) -> None:
    # Packages still carry SEAL's own serialisation: a zstd frame of RLE blocks, 4 bytes each,
    # 128 KiB inflated each.
    block = ((128 * 1024) << 3 | 1 << 1).to_bytes(3, "little") + b"\x00"
    last = ((128 * 1024) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\x00"
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x58]) + block * 20000 + last
    blob = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, 2, 0, 16 + len(frame)) + frame
    with pytest.raises(HEError, match="inflates"):
        check_seal_blob(blob, ctx.profile.ciphertext_bytes, "ciphertext")


# --- IND-CPA-D: the host attacks the key holder's replies ----------------------------------


def _crafted_query(ctx: PublicContext, multiplier: int) -> bytes:
    """c0 = 0 and c1 = K (a constant polynomial: K in every NTT slot): decrypts to K*s."""
    moduli = data_moduli(ctx)
    n = ctx.profile.poly_modulus_degree
    zero = np.zeros((len(moduli), n), dtype=np.uint64)
    constant = np.array([[multiplier % q] * n for q in moduli], dtype=np.uint64)
    # exactly the scale the key holder expects of a product
    return wire_ciphertext(np.stack([zero, constant]), ctx.profile.product_scale_bits)


def _attack(holder: LocalKeyHolder, ctx: PublicContext, lift_bits: int) -> np.ndarray:
    """The host's best guess of s from one reply to c1 = K, K chosen so that the switch maps
    K*s to 2^lift_bits * s: s = round(centred(reply) / 2^lift_bits)."""
    ring = Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)
    m = ctx.profile.reply_exponent(ctx.profile.product_scale_bits)
    multiplier = round(ring.modulus * 2**lift_bits / 2**m)
    (reply,) = holder.decrypt(ref(ctx, "attack"), [_crafted_query(ctx, multiplier)])
    return np.rint(ring.centred(reply, m) / 2.0**lift_bits).astype(np.int64)


def test_unflooded_key_holder_leaks_the_secret_key(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    """The host plays attacker: one crafted ciphertext, and the raw reply gives s exactly."""
    recovered = _attack(unflooded(secret), ctx, 0)
    assert np.array_equal(recovered, secret_key_coefficients(secret))


def test_flooding_defeats_the_same_attack(secret: SecretKeySet, ctx: PublicContext) -> None:
    truth = secret_key_coefficients(secret)
    recovered = _attack(LocalKeyHolder(secret), ctx, 0)
    assert not np.array_equal(recovered, truth)
    # No better than guessing: about a third of a ternary key matches by chance (all zeros).
    assert np.mean(recovered == truth) < 0.5


def test_known_limit_scaled_crafted_ciphertexts_defeat_flooding(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    """Documented limit (docs/he-scheme.md, "What flooding does not stop").

    Flooding hides the noise of ciphertexts a host computes honestly. A host that crafts
    c1 = K with K large lifts K*s above the flood; the key holder cannot tell such a
    ciphertext from a legitimate product (under protocol v2 every request decrypts to a
    uniform polynomial). This test pins the limit so that nobody believes otherwise; what
    bounds the damage is one CKKS key per adapter (docs/threat-model.md).
    """
    recovered = _attack(LocalKeyHolder(secret), ctx, 8)
    assert np.array_equal(recovered, secret_key_coefficients(secret))
