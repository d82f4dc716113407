"""The integer-GEMM products over RNS residues: bit-identical to SEAL's, and the delta engine
gives the same deltas on every path."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from tests.he.helpers import make_lora, ref
from vllm_tensafe.he import DeltaEngine, PublicContext, SecretKeySet
from vllm_tensafe.he.lincomb import MAX_RANK, LinearCombiner, ResidueColumns, fits
from vllm_tensafe.he.packing import encrypt_matrix, fused_layouts
from vllm_tensafe.he.residues import check_layout, ciphertext_residues, set_ntt_form
from vllm_tensafe.keyholder import LocalKeyHolder


def _seal_combination(ctx: PublicContext, columns: list, weights: np.ndarray) -> seal.Ciphertext:
    """sum_j w_j * ct_j with SEAL: a constant plaintext is round(value * scale) exactly."""
    plain = seal.Plaintext()
    acc = seal.Ciphertext(ctx.context)
    tmp = seal.Ciphertext(ctx.context)
    first = True
    for w, ct in zip(weights, columns, strict=True):
        ctx.encoder.encode(float(w), ctx.parms_id, 1.0, plain)
        if first:
            ctx.evaluator.multiply_plain(ct, plain, acc)
            first = False
        else:
            ctx.evaluator.multiply_plain(ct, plain, tmp)
            ctx.evaluator.add_inplace(acc, tmp)
    return acc


@pytest.mark.parametrize("rank", [1, 8, 64])
def test_gemm_is_bit_identical_to_seal(
    ctx: PublicContext, rng: np.random.Generator, rank: int
) -> None:
    matrix = encrypt_matrix(ctx, rng.normal(size=(200, rank)) * 0.1)
    columns = [column[0] for column in matrix.ciphertexts]
    combiner = LinearCombiner(ctx)
    residue_columns = ResidueColumns(columns)
    # Weights of both signs up to the scalar path's largest (2^43: u_scale 2^34, |u| 2^9),
    # small ones (two 20-bit limbs) and a zero.
    weights = np.stack(
        [
            rng.integers(-(1 << 43), 1 << 43, size=rank),
            rng.integers(-(1 << 30), 1 << 30, size=rank),
            np.zeros(rank, dtype=np.int64),
        ]
    )
    weights[1, 0] = -1
    assert fits(weights)
    digits = combiner.digits(weights, residue_columns)
    results = combiner.combine(digits, residue_columns.shape, 2.0**90)
    for t in range(2):  # the all-zero row cannot be checked against SEAL (transparent)
        expected = _seal_combination(ctx, columns, weights[t])
        assert np.array_equal(ciphertext_residues(results[t]), ciphertext_residues(expected))
        assert results[t].is_ntt_form() and results[t].scale == 2.0**90
    assert not ciphertext_residues(results[2]).any()


def test_fits_bounds() -> None:
    assert fits(np.zeros((0, 4), dtype=np.int64))
    assert not fits(np.ones((1, MAX_RANK + 1), dtype=np.int64))
    assert fits(np.full((1, 64), 1 << 42, dtype=np.int64))
    assert not fits(np.full((1, 128), 1 << 43, dtype=np.int64))  # L1 norm 2^50


def test_residue_views_write_through(ctx: PublicContext, secret: SecretKeySet) -> None:
    check_layout()
    plain = seal.Plaintext()
    ctx.encoder.encode(0.75, ctx.parms_id, 2.0**40, plain)
    ct = seal.Ciphertext(ctx.context)
    ctx.encryptor.encrypt(plain, ct)
    copy = seal.Ciphertext(ctx.context)
    copy.resize(ctx.context, ctx.parms_id, 2)
    ciphertext_residues(copy)[...] = ciphertext_residues(ct)
    set_ntt_form(copy, True)
    copy.scale = ct.scale
    out = seal.Plaintext()
    seal.Decryptor(ctx.context, secret.secret_key).decrypt(copy, out)
    assert abs(ctx.encoder.decode_double(out)[0] - 0.75) < 1e-6
    view = ciphertext_residues(ct)
    assert view.shape == (2, ctx.profile.data_primes, ctx.profile.poly_modulus_degree)
    assert view[0, 0, 0] == ct.dyn_array().at(0)


@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_engine_paths_agree(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator, tokens: int
) -> None:
    """SEAL products only (gemm off) and the GEMM paths give the same deltas, fused or not."""
    tiles = fused_layouts([[("q", 896), ("v", 128)]], ctx.slot_count)
    loras = [make_lora(rng, d, 8, rslora=False) for d in (896, 128)]
    mats = [
        encrypt_matrix(ctx, lo.b_mixed, slot_offset=tiles[n][0], tile_width=tiles[n][1])
        for lo, n in zip(loras, "qv", strict=True)
    ]
    xs = [rng.normal(size=(tokens, 48)) for _ in loras]
    items = [(lo.u(x), m) for lo, x, m in zip(loras, xs, mats, strict=True)]
    results = {}
    for name, min_rank, tiled in (("seal", 1 << 30, False), ("gemm", 1, True)):
        engine = DeltaEngine(ctx, LocalKeyHolder(secret))
        engine.gemm_min_rank = min_rank
        engine.gemm_tiled = tiled
        results[name] = engine.compute(ref(engine.ctx, "a"), items)
        assert (engine.stats.gemm_products > 0) == (name == "gemm")
    for lo, x, seal_delta, gemm_delta in zip(
        loras, xs, results["seal"], results["gemm"], strict=True
    ):
        for delta in (seal_delta, gemm_delta):
            assert np.abs(delta - lo.delta(x)).max() <= ctx.profile.tolerance


def test_tiled_gemm_precision_at_the_stated_range(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator
) -> None:
    """The tile selectors' rounding is relative to |delta|: at |delta| ~ 8 the tiled GEMM path
    still stays well inside the profile's tolerance (a coarser selector scale would not)."""
    engine = DeltaEngine(ctx, LocalKeyHolder(secret))
    b = rng.normal(size=(896, 8))
    u = rng.uniform(-64, 64, size=(16, 8))
    b *= 7.9 / np.abs(u @ b.T).max()
    (delta,) = engine.compute(ref(engine.ctx, "a"), [(u, encrypt_matrix(ctx, b))])
    assert engine.stats.gemm_products > 0
    assert np.abs(delta - u @ b.T).max() <= ctx.profile.tolerance / 2


def test_limbs_replace_the_seal_objects(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator
) -> None:
    """Once the GEMM limbs exist the SEAL ciphertexts are dropped (memory 3x, not 4x); the
    SEAL path and serialisation rebuild them bit for bit."""
    b = rng.normal(size=(896, 8)) * 0.1
    matrix = encrypt_matrix(ctx, b)
    before = matrix.to_bytes()
    u = rng.normal(size=(1, 8))
    gemm = DeltaEngine(ctx, LocalKeyHolder(secret))
    (first,) = gemm.compute(ref(gemm.ctx, "a"), [(u, matrix)])
    assert gemm.stats.gemm_products == 8
    assert all(column[0] is None for column in matrix._ciphertexts)  # released
    rebuilt = matrix.ciphertexts  # the public view rebuilds them
    assert rebuilt[3][0].scale == ctx.profile.b_scale
    assert matrix.to_bytes() == before
    seal_only = DeltaEngine(ctx, LocalKeyHolder(secret))
    seal_only.gemm_min_rank, seal_only.gemm_tiled = 1 << 30, False
    (second,) = seal_only.compute(ref(seal_only.ctx, "a"), [(u, matrix)])
    for delta in (first, second):
        assert np.abs(delta - u @ b.T).max() <= ctx.profile.tolerance
