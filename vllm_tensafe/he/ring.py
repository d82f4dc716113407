"""Polynomials of the CKKS ring as numpy arrays: the arithmetic of wire protocol v2.

Protocol v2 (docs/he-scheme.md, "What the key holder sees") never lets a slot value cross the
trust boundary. The host re-randomises every product ciphertext and pads its c0 with a uniform
polynomial R; the key holder decrypts to a uniform polynomial, floods it and returns it
modulus-switched to 64 bits; the host subtracts its pad's switch and decodes. This module holds
the pieces both sides share, each an exact integer computation where the protocol needs one:

- ``Ring.switch``: the modulus switch S_m(x) = round(CRT(x) * 2^m / Q) mod 2^min(m, 64), from
  RNS residues in coefficient form, with 64 x 64 -> 128-bit products (integer-exact, so every
  implementation gives the same bits);
- ``Ring.decode``: CKKS decoding of an integer polynomial (the canonical embedding at SEAL's
  slot roots, one FFT);
- ``Ring.to_ntt`` / ``Ring.from_ntt``: SEAL's negacyclic NTT over the data primes, run by SEAL
  on a scratch ciphertext (TenSEAL exposes the transforms for ciphertexts only);
- samplers from the CSPRNG (csprng.py): uniform residues, ternary and centred-binomial
  polynomials.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import HEError
from vllm_tensafe.he.csprng import random_bytes, random_words
from vllm_tensafe.he.residues import (
    check_layout,
    ciphertext_residues,
    data_moduli,
    set_ntt_form,
)

_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
# SEAL's CKKS encoder enumerates the slot roots zeta^(3^s mod 2N) (its matrix_reps_index_map).
_SLOT_GENERATOR = 3
# Errors of the re-randomisation: a centred binomial of 2 x 21 bits (as Kyber samples its
# errors: popcounts, no transcendental functions), std sqrt(21/2) = 3.24, the std SEAL and the
# HomomorphicEncryption.org security tables use (3.2), and |e| <= 21.
ERROR_BITS = 21
ERROR_SIGMA = (ERROR_BITS / 2) ** 0.5
_ERROR_MASK = np.uint64((1 << ERROR_BITS) - 1)
# SEAL_CIPHERTEXT_SIZE_MAX: the most polynomials one scratch ciphertext carries.
_MAX_POLYS = 16


# Elements per operand of one vectorised step (256 KiB of uint64: a core's L2 holds the
# temporaries of a step).
_BLOCK_ELEMENTS = 1 << 15


def block_rows(n: int) -> int:
    """Polynomials of n coefficients per block of a batched numpy computation."""
    return max(1, _BLOCK_ELEMENTS // n)


def row_blocks(count: int, n: int) -> Iterator[slice]:
    """Slices of ``count`` polynomials of n coefficients, ``block_rows(n)`` at a time."""
    step = block_rows(n)
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


@dataclass(frozen=True)
class SwitchConstants:
    """S_m's precomputed constants for one exponent m (see ``Ring.switch``)."""

    m: int
    integer: np.ndarray  # (L, 1) uint64: floor(g_l) mod 2^64
    fraction: np.ndarray  # (L, 1) uint64: floor(frac(g_l) * 2^64)
    mask: np.uint64  # M - 1 with M = 2^min(m, 64)


class Ring:
    """The data level of one CKKS context: N, the data primes q_l, Q = prod q_l."""

    def __init__(self, context: Any, parms_id: Any, poly_modulus_degree: int) -> None:
        check_layout()  # every transform goes through residue views: refuse a foreign layout
        self.context = context
        self.parms_id = parms_id
        self.n = int(poly_modulus_degree)
        self.moduli = [int(q) for q in data_moduli(context, parms_id)]
        if max(self.moduli) >= 1 << 62:
            raise HEError("RNS primes of 62 bits or more are not supported", "use a profile")
        self.q = np.array(self.moduli, dtype=np.uint64)[:, None]  # (L, 1)
        self.q_signed = self.q.astype(np.int64)
        self.modulus = math.prod(self.moduli)
        self.evaluator = seal.Evaluator(context)
        self._switch: dict[int, SwitchConstants] = {}
        self._lock = threading.Lock()
        self._scratch: dict[int, Any] = {}
        # decode: ev[k] = p(zeta^(1 - 2k)) for p's coefficients twisted by zeta^i, so slot s
        # (root zeta^g, g = 3^s mod 2N) is FFT bin k = ((1 - g) mod 2N) / 2.
        two_n = 2 * self.n
        roots = [pow(_SLOT_GENERATOR, s, two_n) for s in range(self.n // 2)]
        self._slot_bins = np.array([((1 - g) % two_n) // 2 for g in roots], dtype=np.int64)
        self._twist = np.exp(1j * np.pi * np.arange(self.n) / self.n)

    @property
    def primes(self) -> int:
        return len(self.moduli)

    # --- the modulus switch ------------------------------------------------------------------

    def switch_constants(self, m: int) -> SwitchConstants:
        """g_l = c_l * 2^m / q_l with c_l = (Q/q_l)^-1 mod q_l, split into integer and
        64-bit fraction; sum_l x_l g_l == CRT(x) * 2^m / Q (mod 2^m) for any residues x."""
        with self._lock:
            constants = self._switch.get(m)
            if constants is None:
                if m < 1:
                    raise HEError(f"reply exponent {m} < 1", "the profile's scales do not fit")
                integer, fraction = [], []
                for q in self.moduli:
                    c = pow(self.modulus // q, -1, q)
                    whole, rest = divmod(c << m, q)
                    integer.append(whole % (1 << 64))
                    fraction.append((rest << 64) // q)
                constants = SwitchConstants(
                    m=m,
                    integer=np.array(integer, dtype=np.uint64)[:, None],
                    fraction=np.array(fraction, dtype=np.uint64)[:, None],
                    mask=np.uint64((1 << min(m, 64)) - 1),
                )
                self._switch[m] = constants
        return constants

    def switch(self, residues: np.ndarray, m: int) -> np.ndarray:
        """S_m of coefficient-form residues (L, N) or (T, L, N) -> (N,) or (T, N) uint64.

        y = round(X * 2^m / Q) mod 2^min(m, 64) for X = CRT(residues) in [0, Q), within one
        unit: the fraction's truncation costs < x_l / 2^64 < 1/8 per prime. Integer-exact as
        defined: y = (sum_l x_l*G_l + sum_l high(x_l*F_l) + carry) mod M, carry =
        floor((sum_l low(x_l*F_l) + 2^63) / 2^64).
        """
        k = self.switch_constants(m)
        x = np.asarray(residues, dtype=np.uint64)
        lead = x.shape[:-2]
        rows = x.reshape(-1, *x.shape[-2:])
        out = np.empty((rows.shape[0], x.shape[-1]), dtype=np.uint64)
        # Blocks of a few polynomials: every temporary stays in the core's cache (one pass over
        # a whole batch per operation is memory-bound, ~4x slower at 32 ciphertexts).
        for block in row_blocks(rows.shape[0], x.shape[-1]):
            out[block] = self._switch_block(rows[block], k)
        return out.reshape(*lead, x.shape[-1])

    @staticmethod
    def _switch_block(x: np.ndarray, k: SwitchConstants) -> np.ndarray:
        shape = (x.shape[0], x.shape[-1])
        total = np.zeros(shape, dtype=np.uint64)
        low_sum = np.zeros(shape, dtype=np.uint64)  # sum of the low halves of low(x_l*F_l)
        mid_sum = np.zeros(shape, dtype=np.uint64)  # sum of their high halves
        # One prime at a time: x_l*F_l from 32-bit halves.
        for prime in range(x.shape[-2]):
            x_l = x[:, prime, :]
            fraction = int(k.fraction[prime, 0])
            f0, f1 = np.uint64(fraction & 0xFFFFFFFF), np.uint64(fraction >> 32)
            x0, x1 = x_l & _M32, x_l >> _S32
            p00, p01, p10, p11 = x0 * f0, x0 * f1, x1 * f0, x1 * f1
            mid = p00 >> _S32
            mid += p01 & _M32
            mid += p10 & _M32  # < 3 * 2^32: no overflow
            total += x_l * k.integer[prime, 0]  # wrapping: mod 2^64 is wanted
            p11 += p01 >> _S32
            p11 += p10 >> _S32
            p11 += mid >> _S32
            total += p11  # high(x_l*F_l)
            p00 &= _M32
            low_sum += p00
            mid &= _M32
            mid_sum += mid
        # carry = floor((sum_l low(x_l*F_l) + 2^63) / 2^64), from the 32-bit halves.
        mid_sum += np.uint64(1 << 31)
        mid_sum += low_sum >> _S32
        total += mid_sum >> _S32
        total &= k.mask
        return total

    def reply_scale(self, scale_bits: int, m: int) -> float:
        """Delta' = 2^(scale_bits + m) / Q, the scale of a switched reply."""
        return math.ldexp(1.0, scale_bits + m) / float(self.modulus)

    @staticmethod
    def centred(y: np.ndarray, m: int) -> np.ndarray:
        """A reply mod M = 2^min(m, 64) as signed integers in [-M/2, M/2) (int64)."""
        bits = min(m, 64)
        if bits == 64:
            return y.view(np.int64)
        signed = y.astype(np.int64)
        return np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)

    # --- decoding ------------------------------------------------------------------------

    def decode(self, coefficients: np.ndarray, scale: float) -> np.ndarray:
        """Real parts of the N/2 slots of integer polynomials (..., N) at ``scale``."""
        twisted = np.asarray(coefficients, dtype=np.float64) * self._twist
        values = np.fft.fft(twisted, axis=-1)
        return values[..., self._slot_bins].real / scale

    # --- NTT through SEAL --------------------------------------------------------------------

    def _scratch_ciphertext(self, size: int) -> Any:
        ct = self._scratch.get(size)
        if ct is None:
            ct = seal.Ciphertext(self.context)
            ct.resize(self.context, self.parms_id, size)
            self._scratch[size] = ct
        return ct

    def transform(self, polys: np.ndarray, *, to_ntt: bool) -> np.ndarray:
        """SEAL's negacyclic NTT (``to_ntt``) or its inverse of (P, L, N) residues.

        Runs on scratch ciphertexts of up to SEAL's 16 polynomials. SEAL refuses a ciphertext
        whose polynomials after the first are all zero ("transparent"), so zero inputs are
        replaced by a non-zero one for the call and their (zero) transforms restored after.
        Not thread-safe per ring: callers serialise (engine and key holder hold locks).
        """
        polys = np.asarray(polys, dtype=np.uint64)
        out = np.zeros_like(polys)
        nonzero = [i for i in range(polys.shape[0]) if polys[i].any()]
        if not nonzero:
            return out
        for start in range(0, len(nonzero), _MAX_POLYS):
            rows = nonzero[start : start + _MAX_POLYS]
            size = max(len(rows), 2)
            ct = self._scratch_ciphertext(size)
            view = ciphertext_residues(ct)
            view[: len(rows)] = polys[rows]
            view[len(rows) :] = polys[rows[0]]
            set_ntt_form(ct, not to_ntt)
            if to_ntt:
                self.evaluator.transform_to_ntt_inplace(ct)
            else:
                self.evaluator.transform_from_ntt_inplace(ct)
            out[rows] = ciphertext_residues(ct)[: len(rows)]
        return out

    # --- sampling (CSPRNG) -----------------------------------------------------------------

    def uniform(self, count: int = 1) -> np.ndarray:
        """(count, L, N) residues uniform in [0, q_l): rejection sampling of the top bits."""
        out = np.empty((count, self.primes, self.n), dtype=np.uint64)
        for block in row_blocks(count, self.n):  # a few polynomials per draw: words in cache
            rows = block.stop - block.start
            for prime, q in enumerate(self.moduli):
                shift = np.uint64(64 - q.bit_length())
                need = rows * self.n
                taken: list[np.ndarray] = []
                have = 0
                while have < need:
                    words = random_words(need - have + 64) >> shift
                    good = words[words < np.uint64(q)]
                    taken.append(good)
                    have += good.size
                out[block, prime, :] = np.concatenate(taken)[:need].reshape(rows, self.n)
        return out

    def ternary(self, count: int = 1) -> np.ndarray:
        """(count, N) int64 coefficients uniform in {-1, 0, 1}."""
        need = count * self.n
        taken: list[np.ndarray] = []
        have = 0
        while have < need:
            raw = np.frombuffer(random_bytes(need - have + 64), dtype=np.uint8)
            good = raw[raw < 255]  # 255 = 3 * 85: the rest is uniform mod 3
            taken.append(good)
            have += good.size
        values = np.concatenate(taken)[:need].astype(np.int64) % 3 - 1
        return values.reshape(count, self.n)

    def errors(self, count: int = 1) -> np.ndarray:
        """(count, N) int64 centred-binomial errors, std ERROR_SIGMA, |e| <= ERROR_BITS."""
        words = random_words(count * self.n)
        plus = np.bitwise_count(words & _ERROR_MASK).astype(np.int64)
        minus = np.bitwise_count((words >> np.uint64(ERROR_BITS)) & _ERROR_MASK).astype(np.int64)
        return (plus - minus).reshape(count, self.n)

    def residues_of(self, coefficients: np.ndarray) -> np.ndarray:
        """Signed int64 coefficients (..., N) with |c| < q -> residues (..., L, N) uint64."""
        c = np.asarray(coefficients, dtype=np.int64)[..., None, :]
        out = np.broadcast_to(c, (*c.shape[:-2], self.primes, c.shape[-1])).view(np.uint64)
        return out + np.where(c < 0, self.q, np.uint64(0))  # wraps to c + q for c < 0

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(x + y) mod q_l in place on x (both reduced; q < 2^62, so the sum does not wrap)."""
        x += y
        q = np.broadcast_to(self.q, x.shape) if x.ndim == 2 else self.q
        # x - q wraps to a huge value exactly when x < q: the minimum is the reduced sum.
        np.minimum(x, x - q, out=x)
        return x
