"""Profiles: names, security and the noise/flooding budget the docs derive."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal

from vllm_tensafe.errors import HEError
from vllm_tensafe.he import DEFAULT_PROFILE, PROFILES, PublicContext, SecretKeySet, get_profile
from vllm_tensafe.he.keys import secret_embedding_max
from vllm_tensafe.he.profiles import HEProfile
from vllm_tensafe.settings import PROFILE_NAMES


def test_names_match_settings() -> None:
    assert tuple(PROFILES) == PROFILE_NAMES
    assert DEFAULT_PROFILE == "default"
    with pytest.raises(HEError, match="unknown HE profile"):
        get_profile("turbo")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_budget(name: str) -> None:
    p = get_profile(name)
    assert p.security_bits >= 128
    assert p.slot_count == p.poly_modulus_degree // 2
    assert p.flood_sigma >= 2.0**40 * p.noise_bound
    # Every accepted scale leaves room for deltas far above the stated |delta| <= 8, before
    # the decryption wraps and in the 64-bit reply; the reply's rounding is below the flood.
    for bits in p.accepted_scale_bits:
        assert min(p.value_bound_at(bits), p.reply_value_bound(bits)) >= 2.0**8
        assert p.reply_exponent(bits) >= 1
    assert math.sqrt(p.poly_modulus_degree / 2) * 2.0**-p.reply_scale_bits < p.tolerance / 20
    # The flood stays far below the stated tolerance (7 sigma covers every slot ever released).
    assert 7 * p.flood_sigma < p.tolerance / 4
    assert math.isfinite(p.noise_bound) and p.describe()["name"] == name


def test_fresh_noise_within_the_model(secret: SecretKeySet, ctx: PublicContext) -> None:
    """The noise bound the flooding is sized for holds for a real key (measured)."""
    p = ctx.profile
    assert secret_embedding_max(secret.secret_key, ctx) <= p.secret_embedding_bound
    decryptor = seal.Decryptor(ctx.context, secret.secret_key)
    real = []
    for _ in range(8):
        ct = seal.Ciphertext(ctx.context)
        ctx.encryptor.encrypt_zero(ct)
        ct.scale = 1.0  # decode the raw noise polynomial
        plain = seal.Plaintext()
        decryptor.decrypt(ct, plain)
        real.append(np.array(ctx.encoder.decode_double(plain)))
    noise = np.concatenate(real)
    assert noise.std() <= p.fresh_noise_sigma
    assert np.abs(noise).max() <= 12 * p.fresh_noise_sigma  # NOISE_TAIL


def test_key_outside_the_noise_model_is_refused(
    secret: SecretKeySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.secret"
    secret.save(path)
    monkeypatch.setattr(HEProfile, "secret_embedding_bound", property(lambda self: 1.0))
    with pytest.raises(HEError, match="noise flooding"):
        SecretKeySet.load(path)
