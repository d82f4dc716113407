"""Exact integer linear combinations of ciphertexts as float64 GEMMs over RNS residues.

When one token's coefficients multiply whole ciphertexts (one token per ciphertext group, or a
module that fills the slots), the host's product

    Enc(delta_t) = sum_j round(u_tj * 2^u_scale_bits) * Enc(B'_j)

is a public linear combination with integer weights: for every RNS prime q it is the matrix
product (T x r integers) @ (r x residues) mod q. No HE-library call is needed (SEAL encoding a
constant and multiplying by it computes exactly the same residues, one product at a time).

Exactness: residues (< 2^60) are split into three 20-bit limbs and the weights into three
20-bit limbs, so every digit sum C_s (weight limb + residue limb = s, s = 0..4) of the float64
GEMMs is an integer below 2^53 when the rank of one combination is at most MAX_RANK. Then
S = sum_s C_s 2^(20 s) and S mod q = S - floor(S / q) q: the quotient is estimated in float64
(off by at most one while ||w||_1 < 2^49, so the estimate's error stays below 1/2), the
difference is computed exactly in wrapping uint64 arithmetic (it is small, so mod 2^64 is
enough), and one conditional add or subtract of q finishes it. ``fits`` checks both bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_tensafe.errors import HEError
from vllm_tensafe.he.residues import (
    ciphertext_from_residues,
    ciphertext_residues,
    data_moduli,
    reduce_once,
)

LIMB_BITS = 20
LIMBS = 3
DIGITS = 2 * LIMBS - 1
# Digit sums: rank * 3 * 2^40 (+ the small top limb) < 2^53.
MAX_RANK = 1024
# Quotient estimate: 5 float64 terms of at most ||w||_1 each, error < 1/2.
MAX_WEIGHT_L1 = 1 << 49
_LIMB_MASK = (1 << LIMB_BITS) - 1


def fits(weights: np.ndarray) -> bool:
    """Whether ``combine`` is exact for these (T, rank) integer weights."""
    if weights.shape[-1] > MAX_RANK:
        return False
    return weights.size == 0 or float(np.abs(weights).sum(axis=-1).max()) < MAX_WEIGHT_L1


class ResidueColumns:
    """The residues of one chunk's column ciphertexts, as float64 limbs (rank, 3 * residues).

    24 bytes per residue, three times SEAL's own 8: built on first use, they replace the
    matrix's SEAL objects (EncryptedMatrix.residue_columns).
    """

    def __init__(self, ciphertexts: list[Any]) -> None:
        residues = np.stack([ciphertext_residues(ct).reshape(-1) for ct in ciphertexts])
        self.shape = ciphertext_residues(ciphertexts[0]).shape
        self.rank = len(ciphertexts)
        self.size = residues.shape[1]
        self.scale = ciphertexts[0].scale
        self.parms_id = ciphertexts[0].parms_id()
        # Column j's row holds its limb 0, limb 1, limb 2 one after the other: one GEMM of
        # the weight limbs against it gives every (weight limb, residue limb) product.
        self.limbs = np.concatenate(
            [
                ((residues >> np.uint64(LIMB_BITS * i)) & np.uint64(_LIMB_MASK)).astype(np.float64)
                for i in range(LIMBS)
            ],
            axis=1,
        )

    def ciphertext(self, j: int, ctx: Any) -> Any:
        """Column j as a SEAL ciphertext again (exact: the limbs hold every residue bit)."""
        row = self.limbs[j].reshape(LIMBS, self.size).astype(np.uint64)
        residues = row[0] | (row[1] << np.uint64(LIMB_BITS)) | (row[2] << np.uint64(2 * LIMB_BITS))
        return ciphertext_from_residues(
            ctx.context, self.parms_id, residues.reshape(self.shape), self.scale
        )


def weight_limbs(weights: np.ndarray) -> np.ndarray:
    """Signed int64 weights (T, r) -> (limbs, T, r) float64 limbs of 20 bits, all but the
    top one non-negative; two limbs when every |w| < 2^39 (the top keeps the sign), else
    three."""
    count = 2 if weights.size == 0 or int(np.abs(weights).max()) < (1 << 39) else LIMBS
    limbs = [((weights >> (LIMB_BITS * i)) & _LIMB_MASK).astype(np.float64) for i in range(count)]
    limbs[-1] = (weights >> (LIMB_BITS * (count - 1))).astype(np.float64)  # arithmetic shift
    return np.stack(limbs)


class LinearCombiner:
    """sum over members of weights @ columns, per token, as SEAL ciphertexts of ``scale``."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        moduli = data_moduli(ctx.context, ctx.parms_id)
        if max(moduli) >= 1 << 61:
            raise HEError(
                "RNS primes above 61 bits are not supported", "use a vllm-tensafe profile"
            )
        self.q = np.array(moduli, dtype=np.uint64)[:, None]  # (primes, 1)
        # 2^(20 s) / q per digit and prime, for the quotient estimate.
        self.inverse_places = np.stack(
            [float(1 << (LIMB_BITS * d)) / self.q.astype(np.float64) for d in range(DIGITS)]
        )  # (DIGITS, primes, 1)

    def digits(
        self, weights: np.ndarray, columns: ResidueColumns, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Add the digit sums C_s of (T, r) int64 weights to ``out`` (DIGITS, T, residues)."""
        w = weight_limbs(weights)  # (A, T, r), A = 2 or 3 weight limbs
        count, tokens, rank = w.shape
        product = (w.reshape(count * tokens, rank) @ columns.limbs).reshape(
            count, tokens, LIMBS, columns.size
        )
        if out is None:
            out = np.zeros((DIGITS, tokens, columns.size))
        for a in range(count):
            for k in range(LIMBS):
                out[a + k] += product[a, :, k]
        return out

    def combine(self, digits: np.ndarray, shape: tuple[int, ...], scale: float) -> list[Any]:
        """Digit sums (DIGITS, T, residues) -> one ciphertext per token."""
        tokens = digits.shape[1]
        d = digits.reshape(DIGITS, tokens, shape[0], -1, shape[-1])  # (s, T, poly, prime, N)
        quotient = np.floor(np.einsum("stpln,sln->tpln", d, self.inverse_places))
        total = d[0].astype(np.int64).view(np.uint64)
        for s in range(1, DIGITS):
            if LIMB_BITS * s < 64:
                total += d[s].astype(np.int64).view(np.uint64) << np.uint64(LIMB_BITS * s)
        total -= quotient.astype(np.int64).view(np.uint64) * self.q
        reduce_once(total, self.q.astype(np.int64))
        context, parms_id = self.ctx.context, self.ctx.parms_id
        return [ciphertext_from_residues(context, parms_id, total[t], scale) for t in range(tokens)]
