"""Mixing: A' = R A, B' = s B R^-1 with a fresh random invertible R per module.

B' A' = s B A, so the served function is unchanged, but the host (which sees A' in
plaintext) learns only the row space of A, not A itself. R is drawn as Q1 diag(d) Q2 with
Haar-random orthogonal Q1, Q2 and |d| in [1/2, 2]: its condition number is at most 4, so
neither A' nor B' loses precision, and R^-1 = Q2^T diag(1/d) Q1^T is exact to rounding
(no general matrix inversion). Using two orthogonal factors (not Q diag(d) alone) makes
R^T R a random SPD matrix, so A'^T A' does not reveal A^T A either.

The generator is seeded from ``secrets`` (the OS CSPRNG), never from a fixed or time seed.
"""

from __future__ import annotations

import secrets

import numpy as np

MAX_CONDITION = 4.0


def new_generator() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(256))


def _haar_orthogonal(rng: np.random.Generator, r: int) -> np.ndarray:
    q, upper = np.linalg.qr(rng.standard_normal((r, r)))
    # Sign fix makes the distribution Haar (plain QR output is biased).
    return q * np.sign(np.diag(upper))


def random_mixing(rng: np.random.Generator, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, R^-1) for a random well-conditioned r x r matrix."""
    q1, q2 = _haar_orthogonal(rng, r), _haar_orthogonal(rng, r)
    d = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=r)) * rng.choice([-1.0, 1.0], size=r)
    mix = (q1 * d) @ q2
    inverse = (q2.T / d) @ q1.T
    return mix, inverse


def mix_factors(
    a: np.ndarray, b: np.ndarray, scaling: float, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """(A', B') from PEFT's A (r, d_in) and B (d_out, r); ``rng=None`` means no mixing.

    The scaling s is always folded into B', so the host computes delta = B' (A' x) with no
    separate scale.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if rng is None:
        return a64, scaling * b64
    mix, inverse = random_mixing(rng, a64.shape[0])
    return mix @ a64, scaling * (b64 @ inverse)
