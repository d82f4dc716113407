"""Independent references for the torch ring arithmetic: Python big integers and SEAL.

Nothing here uses vllm_tensafe.he.torch_ring: the modulus switch is the definition of
docs/v2-math written out with Python integers, products, decryptions, NTTs and decodings are
SEAL's own.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.he.keys import PublicContext, SecretKeySet
from vllm_tensafe.he.residues import (
    ciphertext_from_residues,
    ciphertext_residues,
    data_moduli,
    plaintext_residues,
    set_ntt_form,
)

_U64 = 1 << 64


def switch_reference(x: np.ndarray, moduli: list[int], m: int) -> np.ndarray:
    """S_m of docs/v2-math with Python integers: (L, N) residues -> (N,) uint64."""
    big_q = math.prod(moduli)
    total = np.zeros(x.shape[-1], dtype=object)
    lo_sum = np.zeros(x.shape[-1], dtype=object)
    for row, q in zip(x, moduli, strict=True):
        c = pow(big_q // q, -1, q)
        g = Fraction(c * 2**m, q)
        whole = math.floor(g)
        phi = math.floor((g - whole) * _U64)
        xs = row.astype(object)
        total += (xs * (whole % _U64)) % _U64
        product = xs * phi
        total += product // _U64
        lo_sum += product % _U64
    total += (lo_sum + 2**63) // _U64
    y = total % (1 << min(m, 64))
    return np.array([int(v) for v in y], dtype=np.uint64)


def crt(x: np.ndarray, moduli: list[int]) -> list[int]:
    """(L, N) residues -> the N integers in [0, Q)."""
    big_q = math.prod(moduli)
    out = [0] * x.shape[-1]
    for row, q in zip(x, moduli, strict=True):
        factor = (big_q // q) * pow(big_q // q, -1, q)
        for i, r in enumerate(row.tolist()):
            out[i] += int(r) * factor
    return [v % big_q for v in out]


def moduli(ctx: PublicContext) -> list[int]:
    return data_moduli(ctx.context, ctx.parms_id)


def to_coefficients(ctx: PublicContext, ntt_residues: np.ndarray) -> np.ndarray:
    """SEAL's inverse NTT of (L, N) NTT-form residues (through a 2-polynomial ciphertext: SEAL
    refuses transparent ones)."""
    ct = ciphertext_from_residues(
        ctx.context, ctx.parms_id, np.stack([ntt_residues, ntt_residues]), 1.0
    )
    ctx.evaluator.transform_from_ntt_inplace(ct)
    return np.array(ciphertext_residues(ct)[0], copy=True)


def to_ntt(ctx: PublicContext, coefficients: np.ndarray) -> np.ndarray:
    """SEAL's NTT of (L, N) coefficient-form residues."""
    ct = ciphertext_from_residues(
        ctx.context, ctx.parms_id, np.stack([coefficients, coefficients]), 1.0
    )
    set_ntt_form(ct, False)
    ctx.evaluator.transform_to_ntt_inplace(ct)
    return np.array(ciphertext_residues(ct)[0], copy=True)


def residues_of(ctx: PublicContext, values: np.ndarray) -> np.ndarray:
    """Signed integer coefficients (N,) -> (L, N) residues."""
    return np.stack([np.array([int(v) % q for v in values], dtype=np.uint64) for q in moduli(ctx)])


def ntt_plaintext(ctx: PublicContext, coefficients: np.ndarray, scale: float) -> Any:
    """An NTT-form SEAL plaintext at the data level holding (L, N) coefficient residues."""
    plain = seal.Plaintext()
    ctx.encoder.encode(0.5, ctx.parms_id, 2.0**20, plain)  # allocates the NTT-form buffer
    plaintext_residues(plain, len(moduli(ctx)))[...] = to_ntt(ctx, coefficients)
    plain.scale = scale
    return plain


def seal_decrypt_coefficients(secret: SecretKeySet, ct: Any) -> np.ndarray:
    """SEAL Decryptor (c0 + c1 s, NTT form), then SEAL's inverse NTT: (L, N) residues."""
    ctx = secret.public_context()
    plain = seal.Plaintext()
    seal.Decryptor(ctx.context, secret.secret_key).decrypt(ct, plain)
    return to_coefficients(ctx, np.array(plaintext_residues(plain, len(moduli(ctx)))))


def seal_decode(ctx: PublicContext, z: np.ndarray, scale: float) -> np.ndarray:
    """SEAL's CKKS decoding of the integer polynomial z (N,) at ``scale`` (real parts)."""
    return np.asarray(ctx.encoder.decode_double(ntt_plaintext(ctx, residues_of(ctx, z), scale)))


def seal_rerandomise(
    ctx: PublicContext, ct_ntt: np.ndarray, v: np.ndarray, e: np.ndarray
) -> np.ndarray:
    """(c0, c1) + (pk0 v + e0, pk1 v + e1) with SEAL's NTT-form product: (2, L, N) NTT."""
    primes = len(moduli(ctx))
    pk = np.array(ciphertext_residues(ctx.public_key.data())[:, :primes], copy=True)
    pk_ct = ciphertext_from_residues(ctx.context, ctx.parms_id, pk, 1.0)
    v_plain = ntt_plaintext(ctx, residues_of(ctx, v), 1.0)
    pkv = seal.Ciphertext(ctx.context)
    ctx.evaluator.multiply_plain(pk_ct, v_plain, pkv)
    noise = ciphertext_from_residues(
        ctx.context,
        ctx.parms_id,
        np.stack([to_ntt(ctx, residues_of(ctx, e[0])), to_ntt(ctx, residues_of(ctx, e[1]))]),
        1.0,
    )
    ctx.evaluator.add_inplace(pkv, noise)
    base = ciphertext_from_residues(ctx.context, ctx.parms_id, ct_ntt, 1.0)
    ctx.evaluator.add_inplace(base, pkv)
    return np.array(ciphertext_residues(base), copy=True)
