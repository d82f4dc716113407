"""Noise flooding for the key holder.

Why: a decryption that is returned with CKKS's own noise intact lets whoever made the
ciphertext solve for the secret key (Li and Micciancio, Eurocrypt 2021). The key holder
therefore adds a fresh flood F to every decrypted polynomial, coefficient by coefficient, with
std 2^flood_bits times the noise bound of a legitimate request (profiles.HEProfile.flood_sigma
per slot), *before* anything else is done with it: the modulus switch and everything after are
functions of (m + e + F), statistically close to functions of (m + F). Derivation and limits:
docs/he-scheme.md.

All randomness comes from a CSPRNG (csprng.py: AES-256-CTR keyed from os.urandom): the flood
must be unpredictable to the host, which sees many replies.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from vllm_tensafe.he.csprng import random_words
from vllm_tensafe.he.residues import mul_pow2

if TYPE_CHECKING:
    from vllm_tensafe.he.ring import Ring

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)


def uniform01(n: int) -> np.ndarray:
    """n doubles uniform in [0, 1) with 53 random bits each (CSPRNG)."""
    return (random_words(n) >> np.uint64(11)).astype(np.float64) * _INV_2_53


def complex_normal(n: int) -> np.ndarray:
    """n complex Gaussians, real and imaginary parts independent N(0, 1) (Box-Muller)."""
    u = uniform01(2 * n)
    radius = np.sqrt(-2.0 * np.log1p(-u[:n]))  # 1 - u in (0, 1]: log never sees 0
    angle = _TWO_PI * u[n:]
    return radius * np.exp(1j * angle)


def normals(n: int) -> np.ndarray:
    """n independent N(0, 1) doubles (CSPRNG)."""
    z = complex_normal((n + 1) // 2)
    return np.concatenate([np.real(z), np.imag(z)])[:n]


def flood_coefficients(ring: Ring, sigma: float, count: int) -> np.ndarray:
    """(count, L, N) residues of ``count`` floods with std ``sigma`` per coefficient.

    F_i = hi_i * 2^k + u_i: hi_i = round(sigma * g_i / 2^k), g_i ~ N(0, 1), with k chosen so
    hi keeps about 46 significant bits (exact in float64), and u_i uniform in
    [-2^(k-1), 2^(k-1)): a rounded Gaussian whose density is constant within each step of
    2^k, so shifting it by a noise e changes its distribution by about |e| / sigma
    (statistical distance), whatever the step.
    """
    n = ring.n * count
    k = max(0, math.floor(math.log2(sigma)) - 45) if sigma > 0 else 0
    hi = np.rint(normals(n) * (sigma / 2.0**k)).astype(np.int64)
    flood = ring.residues_of(hi)  # (L, n)
    if k:
        mul_pow2(flood, k, ring.q)
        ring.add(flood, _uniform_centred(ring, k, n))
    return np.ascontiguousarray(flood.reshape(ring.primes, count, ring.n).transpose(1, 0, 2))


def _uniform_centred(ring: Ring, bits: int, n: int) -> np.ndarray:
    """(L, n) residues of n integers uniform in [-2^(bits-1), 2^(bits-1))."""
    acc = np.array([[(q - pow(2, bits - 1, q)) % q] for q in ring.moduli], dtype=np.uint64)
    acc = np.repeat(acc, n, axis=1)
    for start in range(0, bits, 62):
        width = min(62, bits - start)
        words = random_words(n) >> np.uint64(64 - width)
        part = words[None, :] % ring.q
        if start:
            mul_pow2(part, start, ring.q)
        ring.add(acc, part)
    return acc
