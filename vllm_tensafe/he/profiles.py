"""CKKS parameter profiles for HE-LoRA.

A profile fixes everything both parties must agree on: ring degree, modulus chain, the scale of
B' (``b_scale_bits``), of the host's U plaintexts (``u_scale_bits``), the key holder's flooding
and the scale of its modulus-switched replies (``reply_scale_bits``). The numbers are derived in
docs/he-scheme.md; the properties below are the same formulas, so code and document cannot
drift apart.

This module imports nothing from TenSEAL: settings and CLIs can list profiles cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_tensafe.errors import HEError

DEFAULT_PROFILE = "default"

# Tail factor of the per-slot noise bound: P(|N(0, s^2)| > 12 s) < 2^-100, so the bound holds
# for every slot of every ciphertext a key holder will ever see (union bound over 2^60 slots).
# The std it multiplies is itself a worst-slot bound (see fresh_noise_sigma).
NOISE_TAIL = 12.0

# Largest total modulus (bits) at 128-bit security, HomomorphicEncryption.org standard (SEAL's
# CoeffModulus::MaxBitCount with sec_level_type::tc128).
_MAX_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
_MAX_BITS_192 = {4096: 75, 8192: 152, 16384: 305, 32768: 611}


def flood_step_bits(sigma: float) -> int:
    """k of the flood F = hi * 2^k + u (flooding.py, torch_ring.FloodParameters): with
    hi = round(sigma * g / 2^k) hi keeps about 46 significant bits, exact in float64."""
    return max(0, math.floor(math.log2(sigma)) - 45) if sigma > 0 else 0


@dataclass(frozen=True)
class HEProfile:
    """One CKKS parameter set. All ``*_bits`` are base-2 exponents."""

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    b_scale_bits: int
    u_scale_bits: int
    flood_bits: int
    security_bits: int
    # Largest per-token L2 norm of U the flooding is sized for; the delta engine scales a
    # token group down (and its result back up) when U is larger, so the bound always holds.
    u_norm_bits: int = 9
    # The key holder returns each decryption modulus-switched to scale ~2**reply_scale_bits
    # (ring.py): coefficients of at most 64 bits, rounding error 2^-reply_scale_bits per
    # coefficient, far below the flood.
    reply_scale_bits: int = 32
    # Max absolute delta error this profile is documented and tested for (|delta| <= 8,
    # per-token ||U||_2 <= 2**u_norm_bits, ||B' row||_2 <= 1); see docs/he-scheme.md.
    tolerance: float = 1e-5
    # Tiled products as GEMMs (delta.py): per-token combinations with weights at
    # 2**tile_u_scale_bits, each multiplied by its tile's 0/1 selector encoded at
    # 2**tile_scale_bits. None: this profile has no room for it (the SEAL path is used).
    tile_u_scale_bits: int | None = None
    tile_scale_bits: int | None = None

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in _MAX_BITS_128 or len(self.coeff_mod_bit_sizes) < 2:
            raise HEError(
                f"profile {self.name!r}: unsupported ring degree {n} or modulus chain",
                "use a power of two from 4096 to 32768 and at least one data prime plus the "
                "special prime",
            )
        total = sum(self.coeff_mod_bit_sizes)
        table = _MAX_BITS_192 if self.security_bits >= 192 else _MAX_BITS_128
        if self.security_bits < 128 or total > table[n]:
            raise HEError(
                f"profile {self.name!r}: {total} modulus bits at N={n} do not give "
                f"{self.security_bits}-bit security",
                f"keep the total at or below {table[n]} bits",
            )
        if self.flood_bits < 40:
            raise HEError(
                f"profile {self.name!r}: flood_bits={self.flood_bits} is below 40",
                "flooding must exceed the noise bound by at least 2^40 (IND-CPA-D)",
            )
        if not 24 <= self.reply_scale_bits <= 40:
            raise HEError(
                f"profile {self.name!r}: reply_scale_bits={self.reply_scale_bits} outside 24..40",
                "replies need 2^-24 resolution and room for the delta in 64 bits",
            )
        # Every accepted scale must leave room for a delta of at least 2^8 both before the
        # decryption wraps mod Q and in the 64-bit reply, and a reply exponent m >= 1.
        for bits in self.accepted_scale_bits:
            if (
                self.reply_exponent(bits) < 1
                or min(self.value_bound_at(bits), self.reply_value_bound(bits)) < 2.0**8
            ):
                raise HEError(
                    f"profile {self.name!r}: scale 2^{bits} does not fit "
                    f"{self.data_modulus_bits} data-modulus bits and 64-bit replies",
                    "lower b_scale_bits/u_scale_bits (or the tile scales) or add a prime",
                )

    # --- sizes ---------------------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> int:
        """Primes of a fresh ciphertext (the last prime is SEAL's special prime)."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def ciphertext_bytes(self) -> int:
        """Raw size of one fresh or product ciphertext (2 polys, data level)."""
        return 2 * self.data_primes * self.poly_modulus_degree * 8

    # --- scales --------------------------------------------------------------------------

    @property
    def b_scale(self) -> float:
        return 2.0**self.b_scale_bits

    @property
    def u_scale(self) -> float:
        return 2.0**self.u_scale_bits

    @property
    def product_scale_bits(self) -> int:
        return self.b_scale_bits + self.u_scale_bits

    @property
    def product_scale(self) -> float:
        """Scale of a product with scalar (one token per ciphertext) weights."""
        return 2.0**self.product_scale_bits

    @property
    def tiled_product_scale_bits(self) -> int | None:
        if self.tile_u_scale_bits is None or self.tile_scale_bits is None:
            return None
        return self.b_scale_bits + self.tile_u_scale_bits + self.tile_scale_bits

    @property
    def accepted_scale_bits(self) -> tuple[int, ...]:
        """log2 of every scale a protocol ciphertext can have."""
        tiled = self.tiled_product_scale_bits
        return (self.product_scale_bits,) if tiled is None else (self.product_scale_bits, tiled)

    @property
    def accepted_scales(self) -> tuple[float, ...]:
        """Every scale a protocol ciphertext can have (exact powers of two)."""
        return tuple(2.0**bits for bits in self.accepted_scale_bits)

    def reply_exponent(self, scale_bits: int) -> int:
        """m of the key holder's modulus switch S_m for a ciphertext of scale 2**scale_bits:
        the reply has scale 2^(scale_bits + m) / Q, about 2^reply_scale_bits."""
        return self.reply_scale_bits + self.data_modulus_bits - scale_bits

    def reply_value_bound(self, scale_bits: int) -> float:
        """Largest |slot value| a reply of that scale carries without wrapping mod 2^64."""
        bits = min(self.reply_exponent(scale_bits), 64)
        return 2.0 ** (bits - 2 - self.reply_scale_bits)

    @property
    def u_norm_bound(self) -> float:
        return 2.0**self.u_norm_bits

    @property
    def value_bound(self) -> float:
        """Largest |slot value| a legitimate product can decrypt to without wrapping mod q.

        A decryption beyond it means a foreign or malformed ciphertext (or a delta so large that
        the result is meaningless); the key holder refuses it.
        """
        return self.value_bound_at(self.product_scale_bits)

    def value_bound_at(self, scale_bits: float) -> float:
        """``value_bound`` for a ciphertext of scale 2**scale_bits."""
        return 2.0 ** (self.data_modulus_bits - 2 - scale_bits)

    # --- noise and flooding (value space, i.e. after dividing by the product scale) ------

    @property
    def secret_embedding_bound(self) -> float:
        """Bound on |s(zeta)| at every primitive 2N-th root zeta, for the secret key s.

        s is ternary with P(s_i != 0) = 2/3, so |s(zeta)| has rms sqrt(2N/3) and the largest of
        the N/2 slots is ~3x that. Key generation rejects the ~1 in 2000 keys above 4x (and a
        key holder refuses to load one), so the bound is a fact about every key in use.
        """
        return 4.0 * math.sqrt(2.0 * self.poly_modulus_degree / 3.0)

    @property
    def fresh_noise_sigma(self) -> float:
        """Bound on the std of the real part of any slot of a fresh encryption's noise.

        SEAL encrypts at the key level and divides by the special prime, so the noise is the
        rounding term r0 + r1*s (r uniform in [-1/2, 1/2]): sigma(r1) is complex Gaussian with
        E|.|^2 = N/12 per slot and multiplies sigma(s) slot-wise, so the real part of a slot
        has std sqrt(N/24) * (|s(zeta)| + 1). Measured: docs/he-scheme.md.
        """
        return math.sqrt(self.poly_modulus_degree / 24.0) * (self.secret_embedding_bound + 1.0)

    @property
    def rerandomisation_noise_sigma(self) -> float:
        """Std of the real part of a slot of the noise a re-randomisation adds, value space.

        The host adds (pk0 v, pk1 v + e1) (conceal.py): decryption gains e v + e1 s with v
        and s ternary (P(!= 0) = 2/3), e (SEAL's, std 3.2) and e1 (std sqrt(21/2)): per
        coefficient std sqrt(3.2^2 + 10.5) * sqrt(2N/3); a slot's real part sums N
        coefficients, std sqrt(N/2) of that, over the smallest product scale.
        """
        n = self.poly_modulus_degree
        per_coefficient = math.sqrt(3.2**2 + 10.5) * math.sqrt(2.0 * n / 3.0)
        return math.sqrt(n / 2.0) * per_coefficient / self.product_scale

    @property
    def noise_bound(self) -> float:
        """Per-slot bound on the key-dependent noise of a legitimate request, value space.

        Product noise = sum_j (Delta_U u_j) * sigma(e_j) / (Delta_B Delta_U), the e_j
        independent; with ||u||_2 at most 2^u_norm_bits its real part has std at most
        2^u_norm_bits * fresh_noise_sigma / Delta_B. The re-randomisation adds its own
        (about 2^-45 of it for ``default``). NOISE_TAIL of the sum bound it.
        """
        product = self.fresh_noise_sigma * self.u_norm_bound / self.b_scale
        return NOISE_TAIL * (product + self.rerandomisation_noise_sigma)

    @property
    def flood_sigma(self) -> float:
        """Std of the key holder's flooding noise per slot (real part), value space."""
        return 2.0**self.flood_bits * self.noise_bound

    def flood_coefficient_sigma(self, scale_bits: int) -> float:
        """The flood's std per polynomial coefficient at scale 2**scale_bits: a slot's real
        part sums N independent coefficients (std sqrt(N/2) of one), so this gives each slot
        std ``flood_sigma``."""
        return self.flood_sigma * 2.0**scale_bits / math.sqrt(self.poly_modulus_degree / 2.0)

    def describe(self) -> dict[str, object]:
        """JSON-able summary (for docs, manifests and `key-holder serve` logs)."""
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "security_bits": self.security_bits,
            "slot_count": self.slot_count,
            "b_scale_bits": self.b_scale_bits,
            "u_scale_bits": self.u_scale_bits,
            "product_scale_bits": self.product_scale_bits,
            "tiled_product_scale_bits": self.tiled_product_scale_bits,
            "flood_bits": self.flood_bits,
            "u_norm_bits": self.u_norm_bits,
            "reply_scale_bits": self.reply_scale_bits,
            "noise_bound_log2": round(math.log2(self.noise_bound), 2),
            "flood_sigma_log2": round(math.log2(self.flood_sigma), 2),
            "value_bound_log2": round(math.log2(self.value_bound), 2),
            "tolerance": self.tolerance,
        }


PROFILES: dict[str, HEProfile] = {
    p.name: p
    for p in (
        # N=8192 at the 128-bit limit (218 bits). Flood std 2^-25: it sets the precision.
        HEProfile(
            name="default",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 60, 60, 38),
            b_scale_bits=90,
            u_scale_bits=34,
            flood_bits=40,
            security_bits=128,
            u_norm_bits=9,
            tolerance=1e-5,
            # 90 + 26 + 30 = 146 bits (value bound 2^32). The selectors' rounding adds
            # ~sqrt(N/12) / 2^30 = 2.4e-8 relative error per slot (std), u's quantisation
            # 2^-27 absolute.
            tile_u_scale_bits=26,
            tile_scale_bits=30,
        ),
        # Two data primes instead of three: every product, encode and decryption is about a
        # third cheaper. The 120-bit data modulus forces smaller scales: ~1e-4 precision
        # (below bf16 resolution) and replies bounded by 2^20. Still >= 128-bit.
        HEProfile(
            name="fast",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 60, 40),
            b_scale_bits=78,
            u_scale_bits=20,
            flood_bits=40,
            security_bits=128,
            u_norm_bits=5,
            tolerance=1e-3,
        ),
        # N=16384: 8192 slots (twice the tokens per ciphertext), larger scales. 240 bits at
        # N=16384 is far inside the 192-bit bound (305).
        HEProfile(
            name="precise",
            poly_modulus_degree=16384,
            coeff_mod_bit_sizes=(60, 60, 60, 60),
            b_scale_bits=100,
            u_scale_bits=40,
            flood_bits=40,
            security_bits=192,
            u_norm_bits=9,
            tolerance=1e-6,
        ),
    )
}


def get_profile(name: str) -> HEProfile:
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise HEError(
            f"unknown HE profile {name!r}",
            f"use one of {', '.join(PROFILES)}",
        ) from None
