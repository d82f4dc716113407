"""The host's delta equals s*B*A*x within the profile's tolerance; masks hide it from the key
holder; one key-holder call per compute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from tests.he.helpers import make_lora, ref
from vllm_tensafe.errors import ForeignCiphertextError, HEError
from vllm_tensafe.he import DeltaEngine, PublicContext, SecretKeySet, encrypt_matrix, generate_keys
from vllm_tensafe.he.packing import fused_layouts
from vllm_tensafe.keyholder import LocalKeyHolder

# (d_out, rank, tokens, rslora): every value of each axis, the big corners once.
# 5000 > 4096 slots: two chunks. 4096: exactly one token per ciphertext.
CASES = [
    (64, 1, 1, False),
    (64, 16, 64, True),
    (128, 4, 7, False),
    (128, 64, 64, True),
    (896, 8, 64, False),
    (896, 64, 1, True),
    (4096, 16, 7, False),
    (4096, 64, 64, True),
    (5000, 8, 7, True),
    (5000, 1, 64, False),
    (5000, 16, 64, True),
]


@pytest.mark.parametrize(("d_out", "rank", "tokens", "rslora"), CASES)
def test_delta_matches_lora(
    engine: DeltaEngine,
    ctx: PublicContext,
    rng: np.random.Generator,
    d_out: int,
    rank: int,
    tokens: int,
    rslora: bool,
) -> None:
    lora = make_lora(rng, d_out, rank, rslora=rslora)
    x = rng.normal(size=(tokens, lora.a.shape[1]))
    x *= min(1.0, 7.5 / np.abs(lora.delta(x)).max())  # keep |delta| in the stated range
    matrix = encrypt_matrix(ctx, lora.b_mixed)
    (delta,) = engine.compute(
        ref(engine.ctx, "adapter-a"), [(lora.u(x).astype(np.float32), matrix)]
    )
    expected = lora.delta(x)
    assert delta.shape == (tokens, d_out)
    assert delta.dtype == np.float32
    assert np.abs(expected).max() <= 8  # the range the tolerance is stated for
    assert np.abs(delta - expected).max() <= ctx.profile.tolerance


@pytest.mark.parametrize("profile", ["fast", "precise"])
def test_other_profiles(profile: str, rng: np.random.Generator) -> None:
    secret, ctx = generate_keys(profile)
    engine = DeltaEngine(ctx, LocalKeyHolder(secret))
    lora = make_lora(rng, 896, 8, rslora=False)
    x = rng.normal(size=(9, lora.a.shape[1]))
    (delta,) = engine.compute(
        ref(engine.ctx, "a"), [(lora.u(x), encrypt_matrix(ctx, lora.b_mixed))]
    )
    assert np.abs(delta - lora.delta(x)).max() <= ctx.profile.tolerance


def test_several_items_one_key_holder_call(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator
) -> None:
    calls: list[int] = []

    class Counting(LocalKeyHolder):
        def _decrypt_checked(self, ciphertexts: Sequence[Any]) -> list[np.ndarray]:
            calls.append(len(ciphertexts))
            return super()._decrypt_checked(ciphertexts)

    engine = DeltaEngine(ctx, Counting(secret))
    loras = [make_lora(rng, d, r, rslora=False) for d, r in ((128, 8), (896, 4), (5000, 2))]
    xs = [rng.normal(size=(t, 48)) for t in (5, 0, 3)]
    items = [(lo.u(x), encrypt_matrix(ctx, lo.b_mixed)) for lo, x in zip(loras, xs, strict=True)]
    deltas = engine.compute(ref(engine.ctx, "a"), items)
    assert len(calls) == 1
    assert calls[0] == 1 + 0 + 3 * 2  # k=32 -> 1; T=0 -> none; 3 tokens x 2 chunks
    for lo, x, delta in zip(loras, xs, deltas, strict=True):
        assert delta.shape == (x.shape[0], lo.b.shape[0])
        assert np.abs(delta - lo.delta(x)).max(initial=0.0) <= ctx.profile.tolerance
    assert engine.stats.decrypt_calls == 1 and engine.stats.ciphertexts_sent == calls[0]


def test_empty_and_zero_inputs(engine: DeltaEngine, ctx: PublicContext) -> None:
    matrix = encrypt_matrix(ctx, np.ones((64, 4)) * 0.1)
    assert engine.compute(ref(engine.ctx, "a"), []) == []
    (empty,) = engine.compute(ref(engine.ctx, "a"), [(np.zeros((0, 4)), matrix)])
    assert empty.shape == (0, 64)
    # All-zero U (e.g. padding tokens) is exactly zero and needs no decryption.
    (zero,) = engine.compute(ref(engine.ctx, "a"), [(np.zeros((3, 4)), matrix)])
    assert zero.shape == (3, 64) and not zero.any()
    u = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    (partial,) = engine.compute(ref(engine.ctx, "a"), [(u, matrix)])
    assert np.abs(partial - u @ (np.ones((64, 4)) * 0.1).T).max() <= ctx.profile.tolerance


def test_large_u_is_rescaled_not_wrong(
    engine: DeltaEngine, ctx: PublicContext, rng: np.random.Generator
) -> None:
    b = rng.normal(size=(128, 16)) * 0.01
    u = rng.normal(size=(7, 16)) * 400  # ||u|| ~ 1600 > 2^u_norm_bits = 512
    (delta,) = engine.compute(ref(engine.ctx, "a"), [(u, encrypt_matrix(ctx, b))])
    factor = np.linalg.norm(u, axis=1).max() / ctx.profile.u_norm_bound
    assert factor > 1
    assert np.abs(delta - u @ b.T).max() <= ctx.profile.tolerance * factor


def test_input_validation(
    engine: DeltaEngine, ctx: PublicContext, other_keys: tuple[SecretKeySet, PublicContext]
) -> None:
    matrix = encrypt_matrix(ctx, np.ones((64, 4)))
    with pytest.raises(HEError, match="shape"):
        engine.compute(ref(engine.ctx, "a"), [(np.ones((2, 3)), matrix)])
    with pytest.raises(HEError, match="NaN"):
        engine.compute(ref(engine.ctx, "a"), [(np.full((2, 4), np.nan), matrix)])
    with pytest.raises(HEError, match="pair"):
        engine.compute(ref(engine.ctx, "a"), [matrix])  # type: ignore[list-item]
    foreign = encrypt_matrix(other_keys[1], np.ones((64, 4)))
    with pytest.raises(ForeignCiphertextError):
        engine.compute(ref(engine.ctx, "a"), [(np.ones((2, 4)), foreign)])


@pytest.mark.parametrize(("tokens", "ciphertexts"), [(1, 1), (3, 1), (7, 3)])
def test_fused_layer_one_ciphertext_per_token_group(
    ctx: PublicContext,
    secret: SecretKeySet,
    rng: np.random.Generator,
    tokens: int,
    ciphertexts: int,
) -> None:
    """q, k, v packed into one tile of 1152 slots: their products add into one ciphertext per
    3 tokens, and every module still gets exactly its own delta."""
    tiles = fused_layouts([[("q", 896), ("k", 128), ("v", 128)]], ctx.slot_count)
    assert tiles == {"q": (0, 1152), "k": (896, 1152), "v": (1024, 1152)}
    loras = [make_lora(rng, d, 8, rslora=False) for d in (896, 128, 128)]
    mats = [
        encrypt_matrix(ctx, lo.b_mixed, slot_offset=tiles[n][0], tile_width=tiles[n][1])
        for lo, n in zip(loras, "qkv", strict=True)
    ]
    assert all(m.tokens_per_ciphertext == 3 for m in mats)
    engine = DeltaEngine(ctx, LocalKeyHolder(secret))
    xs = [rng.normal(size=(tokens, 48)) for _ in loras]
    deltas = engine.compute(
        ref(engine.ctx, "a"), [(lo.u(x), m) for lo, x, m in zip(loras, xs, mats, strict=True)]
    )
    assert engine.stats.ciphertexts_sent == ciphertexts
    for lo, x, delta in zip(loras, xs, deltas, strict=True):
        assert np.abs(delta - lo.delta(x)).max() <= ctx.profile.tolerance
    # A subset of the layer (k not targeted) and a different token count per call still work;
    # items with different token counts are never fused.
    (dq, dv) = engine.compute(
        ref(engine.ctx, "a"), [(loras[0].u(xs[0]), mats[0]), (loras[2].u(xs[2][:1]), mats[2])]
    )
    assert np.abs(dq - loras[0].delta(xs[0])).max() <= ctx.profile.tolerance
    assert np.abs(dv - loras[2].delta(xs[2][:1])).max() <= ctx.profile.tolerance


def test_fused_norm_bound_covers_the_concatenated_u(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator
) -> None:
    """Products that share a ciphertext are scaled by the norm of their concatenated U: the
    noise the key holder floods for is that of the sum."""
    tiles = fused_layouts([[("q", 64), ("v", 64)]], ctx.slot_count)
    b = [rng.normal(size=(64, 4)) * 0.01 for _ in range(2)]
    mats = [
        encrypt_matrix(ctx, bi, slot_offset=tiles[n][0], tile_width=tiles[n][1])
        for bi, n in zip(b, "qv", strict=True)
    ]
    seen: list[float] = []

    class Recording(DeltaEngine):
        def _products(self, group: np.ndarray, mat: Any) -> list[Any]:
            seen.append(float(np.linalg.norm(group, axis=1).max()))
            return super()._products(group, mat)

    u = [np.full((1, 4), 200.0), np.full((1, 4), 200.0)]  # each 400, together ~566 > 512
    engine = Recording(ctx, LocalKeyHolder(secret))
    deltas = engine.compute(ref(engine.ctx, "a"), list(zip(u, mats, strict=True)))
    assert np.sqrt(sum(s * s for s in seen)) <= ctx.profile.u_norm_bound * (1 + 1e-9)
    factor = np.sqrt(2) * 400 / ctx.profile.u_norm_bound
    for ui, bi, d in zip(u, b, deltas, strict=True):
        assert np.abs(d - ui @ bi.T).max() <= ctx.profile.tolerance * factor
