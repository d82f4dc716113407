"""The key holder refuses foreign ciphertexts and floods every reply; the IND-CPA-D attack."""

from __future__ import annotations

import logging
import os
import struct

import numpy as np
import pytest
import tenseal.sealapi as seal

from tests.he.helpers import (
    ciphertext_blob,
    data_moduli,
    ntt,
    recover_secret,
    secret_key_coefficients,
)
from vllm_tensafe.errors import ForeignCiphertextError, HEError
from vllm_tensafe.he import (
    LocalKeyHolder,
    PublicContext,
    SecretKeySet,
    encrypt_matrix,
    generate_keys,
)
from vllm_tensafe.he.keyholder import UNBOUND_DIGEST, AdapterRef
from vllm_tensafe.he.keys import check_seal_blob
from vllm_tensafe.he.packing import ciphertext_to_bytes


def _ref(name: str, key_id: str) -> AdapterRef:
    return AdapterRef(name, key_id, UNBOUND_DIGEST)


def product_ciphertext(ctx: PublicContext, value: float = 1.0) -> seal.Ciphertext:
    """A legitimate product: Enc(B') (scale Delta_B) times a U plaintext (scale Delta_U)."""
    matrix = encrypt_matrix(ctx, np.full((64, 1), 0.25))
    plain = seal.Plaintext()
    ctx.encoder.encode(value, ctx.parms_id, ctx.profile.u_scale, plain)
    out = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(matrix.ciphertexts[0][0], plain, out)
    return out


def test_decrypts_protocol_ciphertexts(local_holder: LocalKeyHolder, ctx: PublicContext) -> None:
    (values,) = local_holder.decrypt(
        _ref("a", ctx.key_id), [ciphertext_to_bytes(product_ciphertext(ctx))]
    )
    assert values.shape == (ctx.slot_count,)
    assert np.abs(values - 0.25).max() < 1e-6
    grid = ctx.profile.grid
    assert np.all(values / grid == np.round(values / grid))  # rounded to the fixed grid


def test_flooding_is_fresh_and_on_by_default(secret: SecretKeySet, ctx: PublicContext) -> None:
    holder = LocalKeyHolder(secret)
    assert holder.flooding
    ct = product_ciphertext(ctx, 3.0)
    # The flood moves low-order bits; compare before the grid rounding hides it.
    flooded = [holder._flooder.flooded(ct) for _ in range(2)]
    plain = seal.Plaintext()
    decoded = []
    for c in flooded:
        holder._decryptor.decrypt(c, plain)
        decoded.append(np.array(ctx.encoder.decode_double(plain)))
    diff = decoded[0] - decoded[1]
    sigma = ctx.profile.flood_sigma
    assert 0.5 * sigma < diff.std() / np.sqrt(2) < 2 * sigma


def test_refuses_wrong_key_id(local_holder: LocalKeyHolder, ctx: PublicContext) -> None:
    blob = ciphertext_to_bytes(product_ciphertext(ctx))
    with pytest.raises(ForeignCiphertextError, match="declare key"):
        local_holder.decrypt(_ref("a", "ab" * 32), [blob])


def test_refuses_ciphertext_of_another_key(
    local_holder: LocalKeyHolder,
    ctx: PublicContext,
    other_keys: tuple[SecretKeySet, PublicContext],
) -> None:
    foreign = ciphertext_to_bytes(product_ciphertext(other_keys[1]))
    # Declared honestly: refused by key id. Declared as ours: decrypts to noise mod q, refused.
    with pytest.raises(ForeignCiphertextError):
        local_holder.decrypt(_ref("a", other_keys[1].key_id), [foreign])
    with pytest.raises(ForeignCiphertextError, match="outside the protocol range"):
        local_holder.decrypt(_ref("a", ctx.key_id), [foreign])


def test_refuses_non_protocol_shapes(local_holder: LocalKeyHolder, ctx: PublicContext) -> None:
    fresh = encrypt_matrix(ctx, np.ones((64, 1))).ciphertexts[0][0]  # scale Delta_B only
    product = product_ciphertext(ctx)
    half = seal.Plaintext()
    ctx.encoder.encode(1.0, ctx.parms_id, ctx.profile.product_scale**0.5, half)
    small = seal.Ciphertext(ctx.context)
    ctx.encryptor.encrypt(half, small)
    squared = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply(small, small, squared)  # right scale, but 3 polynomials
    lower = seal.Ciphertext(ctx.context)
    ctx.evaluator.mod_switch_to_next(small, lower)  # one prime fewer
    _, precise_ctx = generate_keys("precise")
    wide = product_ciphertext(precise_ctx)  # N = 16384
    cases = {
        "scale": fresh,
        "3 polynomials": squared,
        "level": lower,
    }
    for reason, ct in cases.items():
        with pytest.raises(ForeignCiphertextError):
            local_holder.decrypt(_ref("a", ctx.key_id), [ciphertext_to_bytes(ct)])
        with pytest.raises(ForeignCiphertextError, match=reason):  # the in-process path too
            local_holder._decrypt_ciphertexts(_ref("a", ctx.key_id), [ct])
    with pytest.raises(ForeignCiphertextError):
        local_holder.decrypt(_ref("a", ctx.key_id), [ciphertext_to_bytes(wide)])
    with pytest.raises(ForeignCiphertextError):
        local_holder.decrypt(_ref("a", ctx.key_id), [os.urandom(5000)])
    # Nothing is returned when any ciphertext of the batch is refused.
    good = ciphertext_to_bytes(product)
    with pytest.raises(ForeignCiphertextError):
        local_holder.decrypt(_ref("a", ctx.key_id), [good, ciphertext_to_bytes(fresh)])


def test_zstd_bomb_is_refused_before_seal_sees_it(ctx: PublicContext) -> None:
    # A zstd frame of RLE blocks: 4 bytes each, 128 KiB inflated each.
    block = ((128 * 1024) << 3 | 1 << 1).to_bytes(3, "little") + b"\x00"
    last = ((128 * 1024) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\x00"
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x58]) + block * 20000 + last
    blob = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, 2, 0, 16 + len(frame)) + frame
    with pytest.raises(HEError, match="inflates"):
        check_seal_blob(blob, ctx.profile.ciphertext_bytes, "ciphertext")


def _crafted_queries(ctx: PublicContext, multiplier: int) -> list[bytes]:
    """c0 = 0 and c1 = K or K * X^(N/2): the decryptions are K*s and K*X^(N/2)*s."""
    n = ctx.profile.poly_modulus_degree
    moduli = np.array(data_moduli(ctx), dtype=object)
    zero = np.zeros((len(moduli), n), dtype=np.uint64)
    constant = np.array([[multiplier % int(q)] * n for q in moduli], dtype=np.uint64)
    monomial = np.zeros(n, dtype=object)
    monomial[n // 2] = multiplier
    shifted = ntt(ctx, monomial)
    scale = ctx.profile.product_scale  # exactly what the key holder expects
    return [
        ciphertext_blob(ctx, np.stack([zero, constant]), scale),
        ciphertext_blob(ctx, np.stack([zero, shifted]), scale),
    ]


def _attack(holder: LocalKeyHolder, ctx: PublicContext, multiplier: int) -> np.ndarray:
    first, second = holder.decrypt(_ref("attack", ctx.key_id), _crafted_queries(ctx, multiplier))
    unit = ctx.profile.product_scale / multiplier
    return recover_secret(ctx.profile.poly_modulus_degree, first, second, unit)


def test_unflooded_key_holder_leaks_the_secret_key(
    secret: SecretKeySet, ctx: PublicContext, caplog: pytest.LogCaptureFixture
) -> None:
    """The host plays attacker: two crafted ciphertexts, and the raw replies give s exactly."""
    with caplog.at_level(logging.WARNING):
        holder = LocalKeyHolder(secret, flooding=False)
    assert "WITHOUT noise flooding" in caplog.text
    recovered = _attack(holder, ctx, 1)
    assert np.array_equal(recovered, secret_key_coefficients(secret))


def test_flooding_defeats_the_same_attack(secret: SecretKeySet, ctx: PublicContext) -> None:
    truth = secret_key_coefficients(secret)
    recovered = _attack(LocalKeyHolder(secret), ctx, 1)
    assert not np.array_equal(recovered, truth)
    # No better than guessing: about a third of a ternary key matches by chance (all zeros).
    assert np.mean(recovered == truth) < 0.5


def test_known_limit_scaled_crafted_ciphertexts_defeat_flooding(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    """Documented limit (docs/he-scheme.md, "What flooding does not stop").

    Flooding hides the noise of ciphertexts a host computes honestly. A host that crafts
    c1 = K with K large lifts K*s above the flood; the key holder cannot tell such a
    ciphertext from a legitimate product. This test pins the limit so that nobody believes
    otherwise; it must change when a well-formedness check lands.
    """
    recovered = _attack(LocalKeyHolder(secret), ctx, 1 << 100)
    assert np.array_equal(recovered, secret_key_coefficients(secret))
