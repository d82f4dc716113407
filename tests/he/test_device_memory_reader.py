"""What a reader of the device's memory gets from the local-key-holder engine (torch, CPU tensors
here; the same buffers live in GPU memory on CUDA).

docs/gpu-he.md and docs/threat-model.md (item 4) say that with the local key holder the key is in
the worker's memory. These tests attack the default mode (B' kept encrypted, every token
decrypted with the key) with nothing but what sits in the engine's device buffers and what any
prefill leaves beside them, and recover B' both ways: so against a reader of device memory the
default protects no more than ``fold_secret`` (which keeps Dec(B') there), it only costs more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.he.test_torch_ring import _fused_qv
from tests.he.torch_ring_reference import crt
from vllm_tensafe.he import PublicContext, SecretKeySet
from vllm_tensafe.he.gpu_engine import GpuDeltaEngine
from vllm_tensafe.he.ring import Ring

RANK = 4


@pytest.fixture(scope="module")
def loaded(ctx: PublicContext, secret: SecretKeySet) -> tuple:
    """The default engine (B' encrypted) with one q/v adapter (q 96 and v 32 rows) in slot 0."""
    d_in, (lq, lv), (mq, mv) = _fused_qv(ctx, np.random.default_rng(21), rank=RANK)
    engine = GpuDeltaEngine.from_matrices(
        secret, [mq, mv], output_slices=[96, 32], d_in=d_in, max_rank=RANK, device="cpu"
    )
    engine.load(0, [mq, mv], [lq.a_mixed, lv.a_mixed])
    assert not engine.fold_secret  # the default: what the attack is about
    return engine, (lq, lv), (mq, mv), d_in


def test_the_key_beside_the_ciphertexts_decrypts_them(loaded: tuple, ctx: PublicContext) -> None:
    """From two device buffers alone (the key's FFT spectrum and the GEMM table of the
    columns): rebuild each column ciphertext, decrypt it, decode it: B' in the clear."""
    engine, (lq, _), (mq, _), _ = loaded
    spectrum, table = engine._s_spectrum, engine.table  # what a dump of device memory holds
    assert spectrum is not None
    plan, ring = engine.plan, engine.ring
    size = engine.polys * ring.moduli.count * ring.n
    cpu_ring = Ring(ctx.context, ctx.parms_id, ring.n)
    big_q = math.prod(cpu_ring.moduli)
    for j in range(RANK):
        # Row j of slot 0, weight limb 0 (a-major rows): the K residue limbs of column j.
        row = table[0, j].reshape(plan.residue_limbs, size).long()
        residues = sum(row[k] << (plan.residue_limb_bits * k) for k in range(plan.residue_limbs))
        ct = residues.reshape(engine.polys, ring.moduli.count, ring.n)
        plain = ring.decrypt(ct, spectrum).numpy().view(np.uint64)  # c0 + c1 s
        lifted = [v - big_q if v > big_q // 2 else v for v in crt(plain, cpu_ring.moduli)]
        values = cpu_ring.decode(np.array(lifted, dtype=np.float64), ctx.profile.b_scale)
        got = values[mq.slot_offset : mq.slot_offset + mq.d_out]
        assert np.abs(got - lq.b_mixed[:, j]).max() < 1e-4 * max(1.0, np.abs(lq.b_mixed).max())


def test_a_prefill_of_rank_tokens_gives_b_by_least_squares(loaded: tuple) -> None:
    """During any prefill the activations x, A' (plaintext) and the deltas of every token are
    in device memory at once; with at least r tokens of one adapter, B' = D U^+."""
    engine, (lq, lv), _, d_in = loaded
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3 * RANK, d_in))
    deltas = engine.compute(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64))
    d = deltas.double().numpy()
    for lora, cols in ((lq, slice(0, 96)), (lv, slice(96, 128))):
        u = x @ lora.a_mixed.T  # (T, r): U, as the engine's project() computes it
        b_hat = np.linalg.lstsq(u, d[:, cols], rcond=None)[0].T
        assert np.abs(b_hat - lora.b_mixed).max() < 1e-3 * max(1.0, np.abs(lora.b_mixed).max())
