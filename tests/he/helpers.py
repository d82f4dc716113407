"""Test helpers: LoRA data, and the tools of a host that crafts its own ciphertexts."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import _sealapi_cpp
import numpy as np

from vllm_tensafe.he.keys import PublicContext, SecretKeySet
from vllm_tensafe.keyholder.local import LocalKeyHolder
from vllm_tensafe.keyholder.wire import AdapterRef

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


def data_moduli(ctx: PublicContext) -> list[int]:
    return [m.value() for m in ctx.context.first_context_data().parms().coeff_modulus()]


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


def wire_ciphertext(polys: np.ndarray, scale_bits: int, ntt_form: bool = True) -> bytes:
    """A request ciphertext in wire format v2 with the given residues (2 x L x N)."""
    head = bytes([scale_bits, 1 if ntt_form else 0])
    return head + np.ascontiguousarray(polys, dtype="<u8").tobytes()


def unflooded(secret: SecretKeySet) -> LocalKeyHolder:
    """A key holder WITHOUT noise flooding: its replies give the secret key away. The attack
    tests use it to show what flooding prevents; no shipped code path can make one."""
    holder = LocalKeyHolder(secret)
    holder._flood = False
    return holder


def ref(ctx: PublicContext, name: str = "a") -> AdapterRef:
    """The AdapterRef of a test adapter under ``ctx`` (any fixed manifest digest)."""
    return AdapterRef(name, ctx.key_id, "ab" * 32)
