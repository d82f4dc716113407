"""The key holder's numpy arithmetic in blocks and on several threads: the same bits as the
definitions (Python integers) and as a one-thread key holder."""

from __future__ import annotations

import hashlib
import math
import os
import threading

import numpy as np
import pytest

from tests.he.helpers import ref, wire_ciphertext
from tests.he.torch_ring_reference import crt, switch_reference
from vllm_tensafe.he import PublicContext, SecretKeySet
from vllm_tensafe.he.flooding import flood_coefficients, flood_residues
from vllm_tensafe.he.profiles import flood_step_bits
from vllm_tensafe.he.ring import Ring, block_rows
from vllm_tensafe.keyholder import LocalKeyHolder


@pytest.fixture(scope="module")
def ring(ctx: PublicContext) -> Ring:
    return Ring(ctx.context, ctx.parms_id, ctx.profile.poly_modulus_degree)


def _residues(ring: Ring, rng: np.random.Generator, count: int) -> np.ndarray:
    rows = [rng.integers(0, q, size=(count, ring.n), dtype=np.uint64) for q in ring.moduli]
    x = np.stack(rows, 1)
    edges = np.array([[0, q - 1, q // 2, 1] for q in ring.moduli], dtype=np.uint64)
    x[0, :, :4] = edges  # the extremes of every prime
    return x


def test_switch_in_blocks_is_the_definition(ring: Ring, ctx: PublicContext) -> None:
    rng = np.random.default_rng(11)
    count = 2 * block_rows(ring.n) + 1  # two full blocks and a partial one
    x = _residues(ring, rng, count)
    for bits in ctx.profile.accepted_scale_bits:
        m = ctx.profile.reply_exponent(bits)
        got = ring.switch(x, m)
        assert got.shape == (count, ring.n) and got.dtype == np.uint64
        # Every row as a single polynomial gives the same bits; rows of every block (first,
        # middle, last) against the Python-integer definition.
        for row in range(count):
            assert np.array_equal(got[row], ring.switch(x[row], m))
        for row in (0, block_rows(ring.n), count - 1):
            cols = slice(0, 512)
            want = switch_reference(x[row][:, cols], ring.moduli, m)
            assert np.array_equal(got[row, cols], want)
    # Leading dimensions are kept: (2, 3, L, N) -> (2, 3, N).
    m = ctx.profile.reply_exponent(ctx.profile.product_scale_bits)
    stacked = x[:6].reshape(2, 3, ring.primes, ring.n)
    assert np.array_equal(ring.switch(stacked, m).reshape(6, ring.n), ring.switch(x[:6], m))


@pytest.mark.parametrize("k", [0, 1, 48, 62])
def test_flood_residues_are_exact(ring: Ring, k: int) -> None:
    rng = np.random.default_rng(k)
    size = 2048
    hi = rng.integers(-(1 << 50) + 1, 1 << 50, size=(2, size))
    hi[0, :4] = [(1 << 50) - 1, -(1 << 50) + 1, 0, -1]
    if k:
        low = rng.integers(-(1 << (k - 1)), 1 << (k - 1), size=(2, size))
        low[0, 4:6] = [-(1 << (k - 1)), (1 << (k - 1)) - 1]
    else:
        low = np.zeros((2, size), dtype=np.int64)
    got = flood_residues(ring, hi, low, k)
    assert got.shape == (2, ring.primes, size) and got.dtype == np.uint64
    for prime, q in enumerate(ring.moduli):
        for t in range(2):
            want = [(int(h) * 2**k + int(u)) % q for h, u in zip(hi[t], low[t], strict=True)]
            assert got[t, prime].tolist() == want


def test_flood_coefficients_in_blocks(ring: Ring, ctx: PublicContext) -> None:
    """Several blocks of floods: reduced residues of one integer per coefficient, with the
    stated spread, and fresh in every block."""
    sigma = ctx.profile.flood_coefficient_sigma(ctx.profile.product_scale_bits)
    assert flood_step_bits(sigma) <= 62  # the profile's flood takes the exact fast path
    count = block_rows(ring.n) + 1
    flood = flood_coefficients(ring, sigma, count)
    assert flood.shape == (count, ring.primes, ring.n)
    assert all((flood[:, p] < q).all() for p, q in enumerate(ring.moduli))
    big_q = math.prod(ring.moduli)
    values = []
    for row in (0, count - 1):  # the first block and the last
        lifted = crt(flood[row][:, :2048], ring.moduli)
        values.extend(v - big_q if v > big_q // 2 else v for v in lifted)
    spread = float(np.std(np.array(values, dtype=np.float64)))
    assert abs(spread / sigma - 1.0) < 0.05
    assert max(abs(v) for v in values) < 7 * sigma
    assert not np.array_equal(flood[0], flood[-1])


def _quiet(secret: SecretKeySet, workers: int) -> LocalKeyHolder:
    holder = LocalKeyHolder(secret, workers=workers)
    holder._flood = False  # deterministic replies, to compare bit for bit
    return holder


def _batch(ctx: PublicContext, count: int, seed: int) -> list[bytes]:
    """Request ciphertexts with uniform residues, alternating the accepted scales."""
    rng = np.random.default_rng(seed)
    profile = ctx.profile
    qs = np.array(Ring(ctx.context, ctx.parms_id, profile.poly_modulus_degree).moduli)
    scales = profile.accepted_scale_bits
    blobs = []
    for i in range(count):
        polys = np.stack(
            [
                np.stack([rng.integers(0, q, size=profile.poly_modulus_degree) for q in qs])
                for _ in range(2)
            ]
        ).astype(np.uint64)
        blobs.append(wire_ciphertext(polys, scales[i % len(scales)]))
    return blobs


def test_workers_reply_as_one_thread(secret: SecretKeySet, ctx: PublicContext) -> None:
    blobs = _batch(ctx, 2 * block_rows(ctx.profile.poly_modulus_degree) + 3, seed=5)
    one, several = _quiet(secret, 1), _quiet(secret, 3)
    try:
        want = one.decrypt(ref(ctx), blobs)
        got = several.decrypt(ref(ctx), blobs)
        assert len(got) == len(blobs)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        # A single ciphertext and a single block take the inline path: the same replies.
        assert np.array_equal(several.decrypt(ref(ctx), blobs[:1])[0], want[0])
        assert several.ciphertexts_decrypted == len(blobs) + 1
    finally:
        one.close()
        several.close()


def test_concurrent_requests_get_their_own_replies(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    """Requests from several threads at once (the service's decrypt threads) share the
    workers; every request gets the replies of its own ciphertexts."""
    holder = _quiet(secret, 2)
    batches = [_batch(ctx, 3 + i, seed=100 + i) for i in range(4)]
    reference = _quiet(secret, 1)
    want = [reference.decrypt(ref(ctx), batch) for batch in batches]
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            got[i] = holder.decrypt(ref(ctx), batches[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i, replies in enumerate(want):
        assert all(np.array_equal(a, b) for a, b in zip(got[i], replies, strict=True))
    holder.close()
    reference.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_decrypts_with_its_own_workers(
    secret: SecretKeySet, ctx: PublicContext
) -> None:
    holder = _quiet(secret, 2)
    blobs = _batch(ctx, 2 * block_rows(ctx.profile.poly_modulus_degree) + 1, seed=9)
    want = holder.decrypt(ref(ctx), blobs)  # the parent's threads exist now
    digest = hashlib.sha256(b"".join(r.tobytes() for r in want)).digest()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: same holder object, new process
        try:
            replies = holder.decrypt(ref(ctx), blobs)
            os.write(write, hashlib.sha256(b"".join(r.tobytes() for r in replies)).digest())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    holder.close()
    assert got == digest


def test_uniform_residues_in_blocks(ring: Ring) -> None:
    """The pad R of outgoing ciphertexts, drawn a few polynomials at a time: reduced, uniform
    in every block (mean ~q/2, every top-bit bucket filled evenly), fresh per block."""
    count = 2 * block_rows(ring.n) + 1
    pads = ring.uniform(count)
    assert pads.shape == (count, ring.primes, ring.n)
    for prime, q in enumerate(ring.moduli):
        rows = pads[:, prime, :]
        assert (rows < q).all()
        for block in (rows[0], rows[block_rows(ring.n)], rows[-1]):
            fraction = block.astype(np.float64) / q
            assert abs(fraction.mean() - 0.5) < 0.02
            counts = np.bincount((fraction * 8).astype(np.int64), minlength=8)
            assert counts.min() > 0.8 * ring.n / 8
    assert not np.array_equal(pads[0], pads[-1])
