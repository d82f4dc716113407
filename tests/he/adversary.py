"""A key holder that tries to read the users' U out of the host's decrypt requests.

It has everything the adapter owner running a key holder has: the secret key, the public key,
the package's ciphertexts and their exact decryptions, the public selector plaintexts, and the
engine's code (so it knows which ciphertexts a request combines). Two attacks, each returning
its best estimate of the integer weights w (U = w / 2^u_scale_bits) or None:

(a) the linear solve on c1: c1 of a request is sum_k w_k c1(basis_k) when nothing re-randomised
    it; solve K coordinates mod one prime, check the rest;
(b) least squares outside the slot-message subspace: slot messages are real, so they are fixed
    by the ring automorphism sigma: X -> X^-1; D - sigma(D) of the decrypted request keeps
    sum_k w_k (P_k - sigma(P_k)) (the basis decryptions' noise, which the owner knows exactly)
    plus the mask's own non-real part. A mask encoded at 2^a and scaled up by 2^shift (the
    engine's former fast path) is a multiple of 2^shift, so reducing mod 2^shift removes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.he import PublicContext, SecretKeySet
from vllm_tensafe.he.residues import ciphertext_residues, plaintext_residues
from vllm_tensafe.he.ring import Ring


def _solve_mod(matrix: list[list[int]], rhs: list[int], q: int) -> list[int] | None:
    """Gaussian elimination mod the prime q; None if singular."""
    n = len(matrix)
    a = [[*row, b] for row, b in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col] % q), None)
        if pivot is None:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        inv = pow(a[col][col], -1, q)
        a[col] = [v * inv % q for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [(v - f * w) % q for v, w in zip(a[r], a[col], strict=True)]
    return [a[r][n] for r in range(n)]


class KeyHolderAdversary:
    def __init__(self, secret: SecretKeySet) -> None:
        self.ctx: PublicContext = secret.public_context()
        self.ring = Ring(self.ctx.context, self.ctx.parms_id, self.ctx.profile.poly_modulus_degree)
        self._decryptor = seal.Decryptor(self.ctx.context, secret.secret_key)
        self.q0 = self.ring.moduli[0]

    # --- what the key holder can compute -----------------------------------------------------

    def decrypt(self, ct: Any) -> np.ndarray:
        """c0 + c1 s as centred integers (Python ints, coefficient form)."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        ntt = plaintext_residues(plain, self.ring.primes).copy()
        coeffs = self.ring.transform(ntt[None], to_ntt=False)[0]
        return self.crt(coeffs)

    def crt(self, residues: np.ndarray) -> np.ndarray:
        ring = self.ring
        big = ring.modulus
        total = np.zeros(ring.n, dtype=object)
        for prime, q in enumerate(ring.moduli):
            c = pow(big // q, -1, q)
            x = residues[prime].astype(object)
            total = total + (x * c % q) * (big // q)
        total = total % big
        return np.where(total > big // 2, total - big, total)

    @staticmethod
    def sigma(poly: np.ndarray) -> np.ndarray:
        """X -> X^-1 on Z[X]/(X^N + 1): coefficient i moves to N - i with a sign flip."""
        out = np.empty_like(poly)
        out[0] = poly[0]
        out[1:] = -poly[:0:-1]
        return out

    def basis_products(self, columns: Sequence[Any], selectors: Sequence[Any] | None) -> list[Any]:
        """The ciphertexts a request is an integer combination of: the columns themselves
        (one token per ciphertext) or selector_t * column_j (tiled groups)."""
        if selectors is None:
            return list(columns)
        out = []
        for sel in selectors:
            for col in columns:
                prod = seal.Ciphertext(self.ctx.context)
                self.ctx.evaluator.multiply_plain(col, sel, prod)
                out.append(prod)
        return out

    # --- attack (a) -------------------------------------------------------------------------

    def linear_solve_c1(
        self, request_c1_prime0: np.ndarray, basis: Sequence[Any]
    ) -> np.ndarray | None:
        q = self.q0
        cols = [ciphertext_residues(b)[1, 0].astype(object) for b in basis]
        k = len(cols)
        target = request_c1_prime0.astype(object)
        for start in range(0, 64 * k, k):
            points = range(start, start + k)
            w = _solve_mod(
                [[int(c[i]) for c in cols] for i in points], [int(target[i]) for i in points], q
            )
            if w is not None:
                break
        else:
            return None
        check = range(self.ring.n - 64, self.ring.n)
        for i in check:
            if sum(wj * int(c[i]) for wj, c in zip(w, cols, strict=True)) % q != int(target[i]):
                return None  # no integer combination of the basis explains this c1
        return np.array([wj - q if wj > q // 2 else wj for wj in w], dtype=np.float64)

    # --- attack (b) -------------------------------------------------------------------------

    def least_squares_outside_slots(
        self, decrypted: np.ndarray, basis: Sequence[Any], shifts: Sequence[int | None]
    ) -> list[np.ndarray]:
        """One estimate of w per candidate shift (None: no reduction)."""
        z_full = decrypted - self.sigma(decrypted)
        e = np.stack(
            [np.array(list(self.sigma_free(b)), dtype=np.float64) for b in basis], axis=1
        )  # (N, K)
        out = []
        for shift in shifts:
            if shift is None:
                z = z_full
            else:
                mod = 1 << shift
                z = z_full % mod
                z = np.where(z >= mod // 2, z - mod, z)
            rhs = np.array([float(v) for v in z])
            w, *_ = np.linalg.lstsq(e, rhs, rcond=None)
            out.append(w)
        return out

    def sigma_free(self, ct: Any) -> np.ndarray:
        p = self.decrypt(ct)
        return p - self.sigma(p)


def legacy_masked(ctx: PublicContext, product: Any) -> Any:
    """The request as the engine made it before protocol v2: a uniform slot mask in
    [-2^30, 2^30] encoded at 2^a (fast path) and multiplied by 2^(scale - a), added to c0 only;
    c1 untouched. Kept here as the guard that the attacks above do work."""
    from vllm_tensafe.he.flooding import uniform01
    from vllm_tensafe.he.residues import mul_pow2

    mask_bits = 30
    encode_bits = 62 - mask_bits - 3 + int(math.log2(ctx.profile.poly_modulus_degree / 2) // 2)
    mask = (2.0 * uniform01(ctx.slot_count) - 1.0) * 2.0**mask_bits
    plain = seal.Plaintext()
    ctx.encoder.encode(mask.tolist(), ctx.parms_id, 2.0**encode_bits, plain)
    q = np.array(
        [m.value() for m in ctx.context.get_context_data(ctx.parms_id).parms().coeff_modulus()],
        dtype=np.uint64,
    )[:, None]
    shift = round(math.log2(product.scale)) - encode_bits
    mul_pow2(plaintext_residues(plain, len(q)), shift, q)
    plain.scale = product.scale
    out = seal.Ciphertext(ctx.context)
    ctx.evaluator.add_plain(product, plain, out)
    return out


def legacy_shift(ctx: PublicContext, scale_bits: int) -> int:
    encode_bits = 62 - 30 - 3 + int(math.log2(ctx.profile.poly_modulus_degree / 2) // 2)
    return scale_bits - encode_bits
