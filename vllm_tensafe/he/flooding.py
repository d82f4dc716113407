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
from vllm_tensafe.he.profiles import flood_step_bits
from vllm_tensafe.he.residues import mul_pow2
from vllm_tensafe.he.ring import row_blocks

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
    k = flood_step_bits(sigma)
    if k > _FAST_STEP_BITS:
        n = ring.n * count  # low does not fit an int64: the general residue path
        hi = np.rint(normals(n) * (sigma / 2.0**k)).astype(np.int64)
        flood = ring.residues_of(hi)  # (L, n)
        mul_pow2(flood, k, ring.q)
        ring.add(flood, _uniform_centred(ring, k, n))
        return np.ascontiguousarray(flood.reshape(ring.primes, count, ring.n).transpose(1, 0, 2))
    out = np.empty((count, ring.primes, ring.n), dtype=np.uint64)
    for block in row_blocks(count, ring.n):  # a few floods at a time: temporaries in cache
        rows = block.stop - block.start
        size = rows * ring.n
        # One keystream draw: words for the Gaussians (Box-Muller pairs), then the low parts.
        words = random_words(2 * size)
        hi = np.rint(normals_from_words(words[:size]) * (sigma / 2.0**k)).astype(np.int64)
        if k:
            low = (words[size:] >> np.uint64(64 - k)).view(np.int64) - np.int64(1 << (k - 1))
        else:
            low = np.zeros(size, dtype=np.int64)
        shape = (rows, ring.n)
        out[block] = flood_residues(ring, hi.reshape(shape), low.reshape(shape), k)
    return out


# Up to this k, F mod q is one float-assisted reduction (flood_residues); beyond it (the
# default profile's prefill groups at scale 2^146 have k = 70) the general path, unblocked.
_FAST_STEP_BITS = 62


def normals_from_words(words: np.ndarray) -> np.ndarray:
    """2h uint64 words -> 2h independent N(0, 1) (Box-Muller: the first h words give the radii,
    the last h the angles; the cosines come first). As torch_ring.normal_from_words."""
    h = words.size // 2
    u = (words[: 2 * h] >> np.uint64(11)).astype(np.float64)
    u *= _INV_2_53
    radius = np.log1p(-u[:h])  # 1 - u in (0, 1]: log never sees 0
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle = u[h:]
    angle *= _TWO_PI
    out = np.empty(2 * h)
    np.cos(angle, out=out[:h])
    np.sin(angle, out=out[h:])
    out[:h] *= radius
    out[h:] *= radius
    return out


def flood_residues(ring: Ring, hi: np.ndarray, low: np.ndarray, k: int) -> np.ndarray:
    """(..., L, N) residues of F = hi * 2^k + low for int64 hi, low (..., N) with
    |hi| < 2^50, |low| <= 2^(k-1) and k <= 62 (as torch_ring.flood_residues).

    Per prime q (< 2^62): c = 2^k mod q; the float64 quotient of hi * c + low by q is within
    1/2 of the true one (|hi * c / q| < 2^50), so the wrapping int64 difference
    hi * c + low - floor(quotient) * q lies in [-q, 2q) and two corrections make it exact.
    """
    out = np.empty((*hi.shape[:-1], ring.primes, hi.shape[-1]), dtype=np.int64)
    hi_f = hi.astype(np.float64)
    low_f = low.astype(np.float64)
    quotient = np.empty_like(hi_f)
    for prime, q in enumerate(ring.moduli):
        c = pow(2, k, q)
        row = out[..., prime, :]
        np.multiply(hi, np.int64(c), out=row)  # wraps: exact mod 2^64
        row += low
        np.multiply(hi_f, c / q, out=quotient)
        quotient += low_f * (1.0 / q)
        np.floor(quotient, out=quotient)
        row -= quotient.astype(np.int64) * np.int64(q)
        row += np.where(row < 0, np.int64(q), np.int64(0))
        row -= np.where(row >= q, np.int64(q), np.int64(0))
    return out.view(np.uint64)


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
