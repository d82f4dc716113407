"""Exact RNS ring arithmetic of HE-LoRA (wire protocol v2) in torch, on any device.

The host's and the local key holder's work on CKKS ciphertexts is integer arithmetic in
R_Q = Z_Q[X]/(X^N + 1), Q = q_0 ... q_{L-1}, plus one FFT to decode. Everything here works on
residues in *coefficient* form (SEAL keeps NTT form; ``coefficient_residues`` converts once, at
load): integer-weight combinations commute with the NTT, and in coefficient form the two
products with a small polynomial (c1 * s to decrypt, pk * v to re-randomise) are negacyclic
convolutions that float64 FFTs compute exactly (below). No NTT runs on the device.

Conventions: residues are int64 tensors (..., L, N) with values in [0, q_l) (every data prime is
below 2^61); 64-bit words that are unsigned in docs/v2-math (G_l, Phi_l, the switched reply y)
are stored as int64 with the same bit pattern. torch's int64 ``+``, ``*`` and ``<<`` wrap modulo
2^64 on CPU and CUDA; ``>>`` is arithmetic, so every logical shift below is a shift followed by
a mask.

Exactness arguments, one per operation:

* ``reduce_digits`` (Horner over digits d_k with |d_k| < 2^53): per step the quotient of
  (acc * 2^b + d) / q is estimated in float64 with an error far below 1 (acc < q rounds to 53
  bits: relative 2^-53, and the quotient is < 2^(b+1)), so the estimate is off by at most one;
  the difference acc * 2^b + d - est * q lies in (-q, 2q) and wrapping int64 arithmetic computes
  it exactly; one conditional add or subtract of q finishes. The same step with d = 0 and b <= 48
  multiplies by a power of two (``mul_pow2``, as residues.mul_pow2 on the CPU).
* ``ProductTables`` (integer GEMM): weights |w| <= 2^weight_bits are split into A limbs of WB bits
  (the top limb signed), residues into K limbs of RB bits; the tables hold the limbs of
  (D_j * 2^(WB a) mod q), so one float64 GEMM yields K digit sums, each a sum of
  rank * A products below 2^(WB + RB): ``limb_plan`` picks the limbs so that every digit sum is
  an integer below 2^53, which float64 GEMMs (any summation order, FMA or not) add exactly.
* ``NegacyclicFFT`` (a * b mod X^N + 1, b with |b_i| <= 1, a residues): a is split into 30-bit
  limbs (two for the profiles' primes of at most 60 bits), so each limb product has integer
  coefficients |c_i| <= 2^30 * N = 2^43 (N = 8192). The product is computed with the folding of
  X^N + 1 = (X^(N/2) - i)(X^(N/2) + i): one complex FFT of size N/2 per real polynomial. float64
  FFT convolution errors are bounded by about ||a||_2 ||b||_2 * 2^-53 * 3 log2(N/2)
  <= 2^36.5 * 2^6.5 * 2^-53 * 2^5.2 = 2^-4.8 (0.036), below 1/2, so rounding recovers every
  coefficient exactly (the tests check the distance to the nearest integer on worst-case inputs
  as well: every limb 2^30 - 1 times the all-ones polynomial). Two limbs instead of three
  (20 bits) cut the per-token decryption's FFTs by a third.
* ``ModulusSwitch`` (S_m of docs/v2-math): exact 64 x 64 -> 128-bit products from 32-bit halves.
* ``CkksDecoder``: the canonical embedding at SEAL's slot roots zeta^(3^j mod 2N) as one complex
  FFT of size N/2 of the folded polynomial; only real parts are returned (they do not depend on
  the choice of zeta or its conjugate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from vllm_tensafe.errors import HEError
from vllm_tensafe.he.profiles import flood_step_bits

MASK32 = (1 << 32) - 1
FFT_LIMB_BITS = 30
# float64 integers are exact below 2^53.
EXACT_BITS = 53
_U64 = 1 << 64


def to_signed64(value: int) -> int:
    """The int64 with the bit pattern of the unsigned 64-bit ``value``."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


def to_unsigned64(value: int) -> int:
    return value % _U64


# --- modular helpers (int64 residues, q broadcast as (L, 1)) ---------------------------------


def reduce_once(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x in (-q, 2q) -> x mod q in [0, q)."""
    x = x + ((x >> 63) & q)  # x < 0: + q
    t = x - q
    return t + ((t >> 63) & q)  # t < 0: x was already below q


def signed_to_residue(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Signed x with |x| < q -> x mod q."""
    return x + ((x >> 63) & q)


@dataclass(frozen=True)
class Moduli:
    """The data primes of one level on one device."""

    values: tuple[int, ...]
    n: int
    device: torch.device

    def __post_init__(self) -> None:
        if not self.values or any(not (1 << 40) < q < (1 << 61) for q in self.values):
            raise HEError(
                "RNS primes must lie between 2^40 and 2^61 for the torch ring arithmetic",
                "use a vllm-tensafe profile",
            )
        if self.n < 4 or self.n & (self.n - 1):
            raise HEError(f"ring degree {self.n} is not a power of two", "use a profile")

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def q(self) -> torch.Tensor:
        """(L, 1) int64."""
        return torch.tensor(self.values, dtype=torch.int64, device=self.device).view(-1, 1)

    @property
    def product(self) -> int:
        return math.prod(self.values)

    @property
    def bits(self) -> int:
        return max(q.bit_length() for q in self.values)


class ResidueArithmetic:
    """Exact modular steps over one set of primes (constants kept on the device)."""

    def __init__(self, moduli: Moduli) -> None:
        self.moduli = moduli
        self.q = moduli.q
        self.qf = self.q.double()
        self.inv_q = 1.0 / self.qf

    def reduce_digits(self, digits: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
        """sum_k digits[k] * 2^(bits k) mod q (digits float64 or int64 integers, |d| < 2^53,
        each broadcastable to (..., L, N)); Horner from the top digit."""
        acc: torch.Tensor | None = None
        scale = float(1 << bits)
        for digit in reversed(digits):
            d_int = digit.long() if digit.is_floating_point() else digit
            d_float = digit if digit.is_floating_point() else digit.double()
            if acc is None:
                est = torch.floor(d_float * self.inv_q).long()
                acc = reduce_once(d_int - est * self.q, self.q)
                continue
            est = torch.floor((acc.double() * scale + d_float) * self.inv_q).long()
            acc = reduce_once((acc << bits) + d_int - est * self.q, self.q)
        assert acc is not None
        return acc

    def mul_pow2(self, x: torch.Tensor, shift: int) -> torch.Tensor:
        """x * 2^shift mod q for residues x (steps of at most 48 bits)."""
        while shift > 0:
            step = min(shift, 48)
            est = torch.floor(x.double() * (float(1 << step) * self.inv_q)).long()
            x = reduce_once((x << step) - est * self.q, self.q)
            shift -= step
        return x

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return reduce_once(a + b, self.q)

    def sub(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return reduce_once(a - b, self.q)


# --- exact integer-weight combinations (the host's products) ---------------------------------


@dataclass(frozen=True)
class LimbPlan:
    """How weights and residues are split so that every GEMM digit sum stays below 2^53."""

    weight_limbs: int  # A
    weight_limb_bits: int  # WB
    residue_limbs: int  # K
    residue_limb_bits: int  # RB
    weight_bits: int
    rank: int

    def digit_bound(self) -> int:
        """Largest |digit sum| of a GEMM over ``rank`` columns."""
        a, wb, rb = self.weight_limbs, self.weight_limb_bits, self.residue_limb_bits
        top = 1 << max(0, self.weight_bits - wb * (a - 1))
        per_column = (a - 1) * ((1 << wb) - 1) + top
        return self.rank * per_column * ((1 << rb) - 1)


def limb_plan(weight_bits: int, rank: int, residue_bits: int) -> LimbPlan:
    """The cheapest exact split for weights |w| <= 2^weight_bits combining ``rank`` columns
    of residues below 2^residue_bits: fewest residue limbs first (they set the GEMM output's
    size, i.e. the memory traffic per token), then fewest weight limbs."""
    for k in range(2, 6):
        rb = -(-residue_bits // k)
        for a in range(1, 8):
            wb = -(-(weight_bits + 1) // a)  # the top limb keeps the sign
            plan = LimbPlan(a, wb, k, rb, weight_bits, rank)
            if plan.digit_bound() < 1 << EXACT_BITS:
                return plan
    raise HEError(
        f"no exact limb split for rank {rank} with weights of {weight_bits} bits",
        "lower the LoRA rank per ciphertext (at most a few hundred columns)",
    )


class ProductTables:
    """Fixed residue vectors D_j (rank, ..., L, N) prepared for exact combinations
    sum_j w_tj D_j mod q with int64 weights |w| <= 2^plan.weight_bits.

    ``table`` is float64 (A * rank, K * size): row a * rank + j holds the K residue limbs of
    D_j * 2^(WB a) mod q, so one GEMM with the weight limbs (T, A * rank) gives K digit sums per
    residue, reduced exactly by ``ResidueArithmetic.reduce_digits``.
    """

    def __init__(self, arith: ResidueArithmetic, plan: LimbPlan) -> None:
        self.arith = arith
        self.plan = plan

    def build(self, residues: torch.Tensor) -> torch.Tensor:
        """(rank, ..., L, N) int64 residues -> (A * rank, K * size) float64 table."""
        plan = self.plan
        rank = residues.shape[0]
        rows = []
        mask = (1 << plan.residue_limb_bits) - 1
        for a in range(plan.weight_limbs):
            shifted = self.arith.mul_pow2(residues, plan.weight_limb_bits * a)
            limbs = [
                ((shifted >> (plan.residue_limb_bits * k)) & mask).double()
                for k in range(plan.residue_limbs)
            ]
            rows.append(torch.stack(limbs, dim=1).reshape(rank, -1))  # (rank, K * size)
        return torch.cat(rows, dim=0)

    def weight_limbs(self, weights: torch.Tensor) -> torch.Tensor:
        """int64 weights (..., rank) -> float64 limbs (..., A * rank), a-major."""
        plan = self.plan
        mask = (1 << plan.weight_limb_bits) - 1
        limbs = [
            ((weights >> (plan.weight_limb_bits * a)) & mask) for a in range(plan.weight_limbs - 1)
        ]
        limbs.append(weights >> (plan.weight_limb_bits * (plan.weight_limbs - 1)))
        return torch.cat(limbs, dim=-1).double()

    def reduce(self, digits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """GEMM output (..., K * size) -> residues (..., *shape) with shape = (..., L, N)."""
        k = self.plan.residue_limbs
        lead = digits.shape[:-1]
        parts = digits.reshape(*lead, k, *shape).unbind(dim=len(lead))
        return self.arith.reduce_digits(parts, self.plan.residue_limb_bits)

    def combine(
        self, weights: torch.Tensor, table: torch.Tensor, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """sum_j weights[t, j] D_j mod q for (T, rank) int64 weights -> (T, *shape)."""
        return self.reduce(self.weight_limbs(weights) @ table, shape)


# --- negacyclic products with small polynomials -----------------------------------------------


class NegacyclicFFT:
    """Exact a * b mod (X^N + 1, q) for residue polynomials a and small integer b (|b_i| <= 1
    for the bound in the module docstring), with float64 complex FFTs of size N/2."""

    def __init__(self, arith: ResidueArithmetic) -> None:
        self.arith = arith
        n = arith.moduli.n
        self.n = n
        j = torch.arange(n // 2, dtype=torch.float64, device=arith.moduli.device)
        angle = math.pi * j / n
        self.twist = torch.polar(torch.ones_like(angle), angle)  # psi^j, psi = exp(i pi / N)
        self.untwist = self.twist.conj()
        self.limbs = -(-arith.moduli.bits // FFT_LIMB_BITS)

    def spectrum(self, b: torch.Tensor) -> torch.Tensor:
        """(..., N) real polynomial -> (..., N/2) complex spectrum of its folding."""
        h = self.n // 2
        b = b.double()
        return torch.fft.fft(torch.complex(b[..., :h], b[..., h:]) * self.twist)

    def limb_spectra(self, a: torch.Tensor) -> torch.Tensor:
        """(..., L, N) residues -> (..., L, limbs, N/2) spectra of their 30-bit limbs."""
        mask = (1 << FFT_LIMB_BITS) - 1
        limbs = torch.stack([(a >> (FFT_LIMB_BITS * k)) & mask for k in range(self.limbs)], dim=-2)
        return self.spectrum(limbs)

    def from_spectra(self, product: torch.Tensor) -> torch.Tensor:
        """(..., L, limbs, N/2) spectra of limb products -> (..., L, N) residues mod q."""
        folded = torch.fft.ifft(product) * self.untwist
        coeffs = torch.cat([folded.real, folded.imag], dim=-1)  # (..., L, limbs, N)
        exact = torch.round(coeffs).long()
        return self.arith.reduce_digits(exact.unbind(dim=-2), FFT_LIMB_BITS)

    def multiply(self, a: torch.Tensor, b_spectrum: torch.Tensor) -> torch.Tensor:
        """a (..., L, N) residues times b given by ``spectrum(b)`` (broadcast (..., N/2))."""
        return self.from_spectra(self.limb_spectra(a) * b_spectrum.unsqueeze(-2).unsqueeze(-2))

    def max_rounding_distance(self, product: torch.Tensor) -> float:
        """For tests: the largest distance of an FFT limb product to the nearest integer."""
        folded = torch.fft.ifft(product) * self.untwist
        coeffs = torch.cat([folded.real, folded.imag], dim=-1)
        return float((coeffs - torch.round(coeffs)).abs().max())


# --- forward NTT in SEAL's layout ---------------------------------------------------------------


def bit_reverse(value: int, bits: int) -> int:
    return int(format(value, f"0{bits}b")[::-1], 2) if bits else 0


class ForwardNTT:
    """SEAL's negacyclic NTT of coefficient-form residues: output j of prime l is
    a(psi_l^(2 br(j) + 1)) mod q_l, psi_l SEAL's primitive 2N-th root (NTTTables.get_root) and
    br the bit reversal of log2 N bits; so its results are SEAL's NTT form bit for bit.

    Cooley-Tukey butterflies, one stage at a time over every polynomial of a batch; the twiddle
    products use Shoup's method (W' = floor(W 2^64 / q), r = W y - hi(y W') q in [0, 2q)).
    """

    def __init__(self, arith: ResidueArithmetic, roots: Sequence[int]) -> None:
        self.arith = arith
        moduli = arith.moduli
        n, log_n = moduli.n, moduli.n.bit_length() - 1
        if len(roots) != moduli.count:
            raise HEError("one NTT root per prime", "pass SEAL's NTTTables roots")
        self.n = n
        device = moduli.device
        self.stages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        m = 1
        while m < n:
            twiddles, lows, highs = [], [], []
            for q, root in zip(moduli.values, roots, strict=True):
                row = [pow(root, bit_reverse(m + i, log_n), q) for i in range(m)]
                shoup = [(w << 64) // q for w in row]
                twiddles.append(row)
                lows.append([v & MASK32 for v in shoup])
                highs.append([v >> 32 for v in shoup])
            as_tensor = lambda rows: torch.tensor(rows, dtype=torch.int64, device=device)  # noqa: E731
            self.stages.append(
                (as_tensor(twiddles).unsqueeze(-1), as_tensor(lows).unsqueeze(-1),
                 as_tensor(highs).unsqueeze(-1))
            )  # fmt: skip
            m *= 2

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """(..., L, N) coefficient residues -> (..., L, N) NTT-form residues."""
        q = self.arith.q.unsqueeze(-1)  # (L, 1, 1)
        lead = a.shape[:-1]
        m = 1
        for w, w_lo, w_hi in self.stages:
            t = self.n // (2 * m)
            pairs = a.reshape(*lead, m, 2, t)
            x, y = pairs[..., 0, :], pairs[..., 1, :]
            y0, y1 = y & MASK32, y >> 32  # y < 2^61
            low = y0 * w_lo
            mid1 = y1 * w_lo
            mid2 = y0 * w_hi
            carry = ((low >> 32) & MASK32) + (mid1 & MASK32) + (mid2 & MASK32)
            hi = y1 * w_hi + (mid1 >> 32) + ((mid2 >> 32) & MASK32) + (carry >> 32)
            r = y * w - hi * q  # in [0, 2q), exact in wrapping int64
            r = r - q
            wy = r + ((r >> 63) & q)
            a = torch.stack([reduce_once(x + wy, q), reduce_once(x - wy, q)], dim=-2)
            a = a.reshape(*lead, self.n)
            m *= 2
        return a


# --- modulus switch S_m -------------------------------------------------------------------------


def reply_exponent(data_bits: int, scale_bits: int, reply_scale_bits: int = 32) -> int:
    """m = reply_scale_bits + B - S (docs/v2-math)."""
    return reply_scale_bits + data_bits - scale_bits


def switch_constants(moduli: Sequence[int], m: int) -> list[tuple[int, int]]:
    """(G_l, Phi_l) as unsigned 64-bit integers, from the exact rationals g_l = c_l 2^m / q_l."""
    big_q = math.prod(moduli)
    out = []
    for q in moduli:
        c = pow(big_q // q, -1, q)
        numerator = c << m if m >= 0 else c
        whole, rest = divmod(numerator, q)
        if m < 0:  # not used by any profile; kept exact for completeness
            raise HEError(f"reply exponent m={m} is negative", "use a vllm-tensafe profile")
        out.append((whole % _U64, (rest << 64) // q))
    return out


def mul_128(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of the 128-bit product of x in [0, 2^60] and y (an unsigned 64-bit pattern)."""
    x0, x1 = x & MASK32, x >> 32
    y0, y1 = y & MASK32, (y >> 32) & MASK32
    low = x0 * y0  # < 2^64: wraps into the sign bit, read back with masks
    mid1 = x1 * y0  # < 2^60
    mid2 = x0 * y1  # < 2^64
    top = x1 * y1  # < 2^60
    t = ((low >> 32) & MASK32) + (mid1 & MASK32) + (mid2 & MASK32)
    lo = (low & MASK32) | ((t & MASK32) << 32)
    hi = top + (mid1 >> 32) + ((mid2 >> 32) & MASK32) + (t >> 32)
    return hi, lo


class ModulusSwitch:
    """S_m: coefficient residues (..., L, N) -> (..., N) int64 words, y mod M (docs/v2-math)."""

    def __init__(self, moduli: Moduli, m: int) -> None:
        self.moduli = moduli
        self.m = m
        self.m_bits = min(m, 64)
        constants = switch_constants(moduli.values, m)
        device = moduli.device
        self.g = torch.tensor(
            [to_signed64(g) for g, _ in constants], dtype=torch.int64, device=device
        ).view(-1, 1)
        self.phi = torch.tensor(
            [to_signed64(p) for _, p in constants], dtype=torch.int64, device=device
        ).view(-1, 1)
        self.mask = None if self.m_bits == 64 else (1 << self.m_bits) - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hi, lo = mul_128(x, self.phi)
        whole = (x * self.g).sum(dim=-2) + hi.sum(dim=-2)
        low_sum = (lo & MASK32).sum(dim=-2)
        high_sum = ((lo >> 32) & MASK32).sum(dim=-2) + (1 << 31) + (low_sum >> 32)
        y = whole + (high_sum >> 32)  # + carry = floor((sum lo + 2^63) / 2^64)
        return y if self.mask is None else y & self.mask

    def wrap(self, y: torch.Tensor) -> torch.Tensor:
        """Reduce words mod M (after a subtraction)."""
        return y if self.mask is None else y & self.mask

    def centre(self, z: torch.Tensor) -> torch.Tensor:
        """z mod M -> the representative in [-M/2, M/2) (int64)."""
        if self.mask is None:
            return z  # the int64 reading of a 64-bit word is already centred
        half = 1 << (self.m_bits - 1)
        return z - ((z >= half).long() << self.m_bits)

    def delta_prime(self, scale_bits: int) -> float:
        """Delta' = 2^(S+m) / Q: coefficient i of the value polynomial is z_i / Delta'."""
        return float(Fraction(1 << (scale_bits + self.m), self.moduli.product))


# --- decoding -------------------------------------------------------------------------------------


def slot_positions(n: int) -> list[int]:
    """For SEAL's slot j: the index u with zeta^(3^j mod 2N) = psi^(4u+1) or its conjugate."""
    out = []
    pos = 1
    for _ in range(n // 2):
        out.append((pos - 1) // 4 if pos % 4 == 1 else (2 * n - pos - 1) // 4)
        pos = pos * 3 % (2 * n)
    return out


class CkksDecoder:
    """Real parts of SEAL's CKKS decoding of real polynomials, batched, on the device."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        j = torch.arange(n // 2, dtype=torch.float64, device=device)
        angle = math.pi * j / n
        self.twist = torch.polar(torch.ones_like(angle), angle)
        self.positions = torch.tensor(slot_positions(n), dtype=torch.int64, device=device)

    def evaluations(self, coeffs: torch.Tensor) -> torch.Tensor:
        """(..., N) float64 coefficients -> (..., N/2) m(psi^(4u+1)) for u < N/2."""
        h = self.n // 2
        folded = torch.complex(coeffs[..., :h], coeffs[..., h:]) * self.twist
        return torch.fft.ifft(folded) * h

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        """(..., N) float64 coefficients -> (..., N/2) real parts of the slots, SEAL's order."""
        return self.evaluations(coeffs).real[..., self.positions]


# --- randomness -----------------------------------------------------------------------------------

_INV_2_53 = 1.0 / float(1 << 53)


def uniform01_from_words(words: torch.Tensor) -> torch.Tensor:
    """64-bit words -> doubles in [0, 1) with 53 random bits (as flooding.uniform01)."""
    return ((words >> 11) & ((1 << 53) - 1)).double() * _INV_2_53


def normal_from_words(words: torch.Tensor) -> torch.Tensor:
    """(..., 2h) words -> (..., 2h) independent N(0, 1) (Box-Muller, as flooding.complex_normal:
    the first h are the real parts, the last h the imaginary parts)."""
    u = uniform01_from_words(words)
    h = words.shape[-1] // 2
    radius = torch.sqrt(-2.0 * torch.log1p(-u[..., :h]))
    angle = (2.0 * math.pi) * u[..., h:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


@dataclass(frozen=True)
class FloodParameters:
    """F_i = hi_i * 2^k + u_i with hi_i = round(sigma_c g_i / 2^k) (docs/v2-math, step 2)."""

    sigma_c: float
    k: int

    @classmethod
    def for_sigma(cls, sigma_c: float) -> FloodParameters:
        """sigma_c: the std per coefficient (profiles.HEProfile.flood_coefficient_sigma)."""
        return cls(sigma_c, flood_step_bits(sigma_c))  # the key holder's rule too

    @property
    def hi_scale(self) -> float:
        return self.sigma_c / 2.0**self.k

    def high_parts(self, normals: torch.Tensor) -> torch.Tensor:
        return torch.round(normals * self.hi_scale).long()

    def low_parts_from_words(self, words: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return torch.zeros_like(words)
        return (words & ((1 << self.k) - 1)) - (1 << (self.k - 1))


def flood_residues(
    arith: ResidueArithmetic, hi: torch.Tensor, low: torch.Tensor, k: int
) -> torch.Tensor:
    """F mod q_l for F = hi * 2^k + low, hi and low (..., N) int64 with |hi|, |low| < 2^53
    -> (..., L, N) residues."""
    q = arith.q
    high = signed_to_residue(hi.unsqueeze(-2), q)
    high = arith.mul_pow2(high, k)
    return reduce_once(high + signed_to_residue(low.unsqueeze(-2), q), q)
