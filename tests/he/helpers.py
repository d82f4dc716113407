"""Test helpers: LoRA data, and the tools of a host that crafts its own ciphertexts."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import _sealapi_cpp
import numpy as np

from vllm_tensafe.he.keys import SEAL_FILES, PublicContext, SecretKeySet

_HEADER = struct.Struct("<HBBBBHQ")


@dataclass
class Lora:
    """A PEFT-style LoRA module and its mixed (A', B') form."""

    a_mixed: np.ndarray  # r x d_in, plaintext at the host
    b_mixed: np.ndarray  # d_out x r, encrypted
    scaling: float
    a: np.ndarray
    b: np.ndarray

    def u(self, x: np.ndarray) -> np.ndarray:
        return x @ self.a_mixed.T

    def delta(self, x: np.ndarray) -> np.ndarray:
        """The reference: s * B (A x), computed from the unmixed weights."""
        return self.scaling * (x @ self.a.T) @ self.b.T


def make_lora(
    rng: np.random.Generator, d_out: int, rank: int, *, rslora: bool, d_in: int = 48
) -> Lora:
    alpha = 2.0 * rank
    scaling = alpha / np.sqrt(rank) if rslora else alpha / rank
    a = rng.normal(size=(rank, d_in)) / np.sqrt(d_in)
    # B sized so that delta has std ~1 (|delta| <= 8): the tolerance is stated for |delta| <= 8.
    b = rng.normal(size=(d_out, rank)) / (scaling * np.sqrt(rank))
    q, _ = np.linalg.qr(rng.normal(size=(rank, rank)))
    mix = q * rng.uniform(0.5, 2.0, size=rank)  # random invertible, well conditioned
    return Lora(mix @ a, scaling * b @ np.linalg.inv(mix), scaling, a, b)


def seal_version_minor(ctx: PublicContext) -> int:
    return SEAL_FILES.save(ctx.parms)[4]


def ciphertext_blob(ctx: PublicContext, polys: np.ndarray, scale: float) -> bytes:
    """An uncompressed SEAL ciphertext with the given NTT-form residues (size x L x N)."""
    size, primes, n = polys.shape
    minor = seal_version_minor(ctx)
    data = np.ascontiguousarray(polys, dtype="<u8").tobytes()
    inner = _HEADER.pack(0xA15E, 16, 4, minor, 0, 0, 16 + 8 + len(data))
    inner += struct.pack("<Q", size * primes * n) + data
    payload = struct.pack("<4Q", *ctx.parms_id) + bytes([1])
    payload += struct.pack("<QQQdQ", size, n, primes, scale, 1) + inner
    return _HEADER.pack(0xA15E, 16, 4, minor, 0, 0, 16 + len(payload)) + payload


def data_moduli(ctx: PublicContext) -> list[int]:
    return [m.value() for m in ctx.context.first_context_data().parms().coeff_modulus()]


def ntt(ctx: PublicContext, coeffs: np.ndarray) -> np.ndarray:
    """SEAL's negacyclic NTT of an integer polynomial, per data prime (L x N)."""
    n = ctx.profile.poly_modulus_degree
    log_n = n.bit_length() - 1
    rows = []
    for q in data_moduli(ctx):
        tables = _sealapi_cpp.util.NTTTables(log_n, _sealapi_cpp.Modulus(q))
        residues = [int(c) % q for c in coeffs]
        rows.append(_sealapi_cpp.util.ntt_negacyclic_harvey(residues, tables))
    return np.array(rows, dtype=np.uint64)


def secret_key_coefficients(secret: SecretKeySet) -> np.ndarray:
    """The real secret key s (ternary coefficients) — what the attacker wants."""
    ctx = secret.public_context()
    n = ctx.profile.poly_modulus_degree
    q = data_moduli(ctx)[0]
    plain = secret.secret_key.data()
    residues = [plain[i] for i in range(n)]  # first RNS component, NTT form
    tables = _sealapi_cpp.util.NTTTables(n.bit_length() - 1, _sealapi_cpp.Modulus(q))
    coeffs = np.array(
        [c % q for c in _sealapi_cpp.util.inverse_ntt_negacyclic_harvey(residues, tables)],
        dtype=object,
    )
    centered = np.array([int(c) - q if c > q // 2 else int(c) for c in coeffs], dtype=np.int64)
    assert set(np.unique(centered)) <= {-1, 0, 1}
    return centered


def slot_exponents(n: int) -> np.ndarray:
    """SEAL's CKKS slot j is the evaluation at zeta^(3^j mod 2N), zeta = exp(i pi / N)."""
    out = np.empty(n // 2, dtype=np.int64)
    pos = 1
    for j in range(n // 2):
        out[j] = pos
        pos = pos * 3 % (2 * n)
    return out


def recover_secret(
    n: int, real_parts: np.ndarray, real_parts_shifted: np.ndarray, unit: float
) -> np.ndarray:
    """s from Re sigma(K s) and Re sigma(K X^(N/2) s) at every slot (both divided by unit).

    sigma(X^(N/2)) at zeta^k is i^k: +i when k = 1 mod 4, -i when k = 3 mod 4, so the second
    query gives -Im or +Im of sigma(s). With all N/2 complex slots (and their conjugates) the
    inverse canonical embedding is one FFT of length 2N.
    """
    k = slot_exponents(n)
    re = real_parts * unit
    im = np.where(k % 4 == 1, -1.0, 1.0) * real_parts_shifted * unit
    spectrum = np.zeros(2 * n, dtype=np.complex128)
    spectrum[k] = re + 1j * im
    spectrum[2 * n - k] = re - 1j * im
    coeffs = np.fft.fft(spectrum)[:n].real / n
    return np.rint(coeffs).astype(np.int64)
