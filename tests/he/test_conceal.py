"""The host's concealment: a correct encryption of zero with the stated noise, never reused."""

from __future__ import annotations

import math

import numpy as np
import tenseal.sealapi as seal

from tests.he.adversary import KeyHolderAdversary
from vllm_tensafe.he import PublicContext, SecretKeySet
from vllm_tensafe.he.conceal import Concealer, _CoverMaker
from vllm_tensafe.he.residues import ciphertext_from_residues
from vllm_tensafe.he.ring import ERROR_SIGMA, Ring


def _ring(ctx: PublicContext) -> Ring:
    return Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)


def test_encryption_of_zero_decrypts_to_the_stated_noise(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    """Dec(pk0 v, pk1 v + e1) = e v + e1 s: per coefficient std sqrt(3.2^2 + 10.5) *
    sqrt(2N/3) (profiles.rerandomisation_noise_sigma), far below the products' noise."""
    concealer = Concealer(ctx, _ring(ctx))
    maker: _CoverMaker = concealer._inline
    adversary = KeyHolderAdversary(secret)
    n = ctx.profile.poly_modulus_degree
    samples = []
    for _ in range(4):
        zero, _ = maker.encryption_of_zero(maker.ring.uniform(1))
        ct = ciphertext_from_residues(ctx.context, ctx.parms_id, zero, 2.0**40)
        samples.append(np.array([float(v) for v in adversary.decrypt(ct)]))
    noise = np.concatenate(samples)
    expected = math.sqrt(3.2**2 + ERROR_SIGMA**2) * math.sqrt(2 * n / 3)
    assert 0.8 * expected < noise.std() < 1.25 * expected
    assert np.abs(noise).max() < 12 * expected
    # In value space, over the smallest product scale, that is the profile's figure.
    per_slot = expected * math.sqrt(n / 2) / ctx.profile.product_scale
    assert math.isclose(per_slot, ctx.profile.rerandomisation_noise_sigma, rel_tol=1e-12)
    assert ctx.profile.rerandomisation_noise_sigma < 2.0**-40 * ctx.profile.noise_bound


def test_concealed_ciphertext_still_decrypts_to_the_product_plus_pad(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    ring = _ring(ctx)
    adversary = KeyHolderAdversary(secret)
    plain = seal.Plaintext()
    ctx.encoder.encode(0.75, ctx.parms_id, ctx.profile.product_scale, plain)
    ct = seal.Ciphertext(ctx.context)
    ctx.encryptor.encrypt(plain, ct)
    before = adversary.decrypt(ct)
    concealed = Concealer(ctx, ring).conceal(ct)
    from vllm_tensafe.keyholder.wire import decode_ciphertext

    after = adversary.decrypt(decode_ciphertext(ctx, concealed.blob, "concealed"))
    m = ctx.profile.reply_exponent(ctx.profile.product_scale_bits)
    # S_m(D + R) - rho == S_m(D) up to the switch's rounding, whatever R was.
    big = ring.modulus

    def switched(values: np.ndarray) -> np.ndarray:
        return np.array([((int(v) % big) << m) // big for v in values], dtype=object)

    difference = (switched(after) - switched(before) - concealed.pad_switch.astype(object)) % (
        1 << 64
    )
    off = np.array([min(int(d), (1 << 64) - int(d)) for d in difference])
    assert off.max() <= 2


def test_covers_are_fresh_for_every_ciphertext(ctx: PublicContext) -> None:
    """Inline and prefetched covers alike: no two ciphertexts ever share a pad or a c1 part."""
    for prefetch in (0, 4):
        concealer = Concealer(ctx, _ring(ctx), prefetch=prefetch)
        pads, c1s = set(), set()
        for _ in range(12):
            cover = concealer._take()
            pads.add(cover.c0.tobytes())
            c1s.add(cover.c1.tobytes())
        assert len(pads) == len(c1s) == 12
