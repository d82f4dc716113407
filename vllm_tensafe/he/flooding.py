"""Noise flooding and output rounding for the key holder, and the host's masks.

Why: a decryption that is returned with CKKS's own noise intact lets whoever made the
ciphertext solve for the secret key (Li and Micciancio, Eurocrypt 2021). The key holder
therefore adds fresh Gaussian noise, 2^flood_bits times the noise bound of a legitimate
product (profiles.HEProfile.flood_sigma), *before* decryption as an exact plaintext, so what
leaves it is a deterministic function of (m + e + F) and statistically close to a function of
(m + F). Derivation and limits: docs/he-scheme.md.

All randomness comes from a CSPRNG (csprng.py: AES-256-CTR keyed from os.urandom): both the
flood and the mask must be unpredictable to the other party, which sees many outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.he.csprng import random_words
from vllm_tensafe.he.keys import PublicContext

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


def uniform_mask(n: int, bound: float) -> np.ndarray:
    """The host's mask: n values uniform in [-bound, bound)."""
    return (2.0 * uniform01(n) - 1.0) * bound


def round_to_grid(values: np.ndarray, grid: float) -> np.ndarray:
    """Round to multiples of ``grid`` (exact in float64 while |values / grid| < 2^53)."""
    return np.round(values / grid) * grid


class Flooder:
    """Adds F = encode(sigma * z), z complex Gaussian per slot, to a ciphertext.

    Encoding N/2 i.i.d. complex Gaussian slots gives a polynomial whose N coefficients are
    i.i.d. (rounded) Gaussians: the canonical embedding restricted to one slot of each
    conjugate pair is a scaled orthogonal map. So F smudges the noise in every coefficient, not
    only in the real parts that are released.
    """

    def __init__(self, ctx: PublicContext, sigma: float | None = None) -> None:
        self.ctx = ctx
        self.sigma = ctx.profile.flood_sigma if sigma is None else sigma
        self._plain = seal.Plaintext()

    def flooded_many(self, cts: Sequence[Any]) -> list[Any]:
        return [self.flooded(ct) for ct in cts]

    def flooded(self, ct: Any) -> Any:
        """A new ciphertext decrypting to Dec(ct) + F (ct is left untouched)."""
        ctx = self.ctx
        noise = complex_normal(ctx.slot_count) * self.sigma
        ctx.encoder.encode(noise.tolist(), ct.parms_id(), ct.scale, self._plain)
        out = seal.Ciphertext(ctx.context)
        ctx.evaluator.add_plain(ct, self._plain, out)
        return out
