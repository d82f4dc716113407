"""The RNS residues inside SEAL ciphertexts, as numpy views.

TenSEAL's ``sealapi`` binds SEAL's objects but hands their polynomials out only one element at
a time (``dyn_array().at(i)``, ~35 ms per ciphertext) or through zstd-compressed files. The
integer-GEMM products (lincomb.py) read every residue of B' and write every residue of their
results, so they work on them in place: ``ciphertext_residues`` is a numpy view over the
ciphertext's own buffer.

The view relies on SEAL 4.x's member layout behind pybind11's simple holder (Ciphertext:
parms_id, is_ntt_form, size, N, L, scale, correction factor, DynArray). ``check_layout``
compares every field it reads with the public accessors, and a write through the pointer with
what SEAL reads back, on a throwaway object before the first view is made; a TenSEAL build
that lays them out differently gets ``LayoutError``, never a read on a guess.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import HEError

_U64 = ctypes.c_uint64
# pybind11 instance: PyObject_HEAD (refcount, type), then the value pointer.
_VALUE_POINTER_OFFSET = 16
# SEAL 4.x Ciphertext members (bytes from the object's start).
_CT_NTT = 32
_CT_SIZE = 40
_CT_DEGREE = 48
_CT_PRIMES = 56
_CT_SCALE = 64
_CT_DATA_SIZE = 104
_CT_DATA_PTR = 112
# SEAL 4.x Plaintext members.
_PT_COEFF_COUNT = 32
_PT_SCALE = 40
_PT_DATA_SIZE = 72
_PT_DATA_PTR = 80

_FIX_LAYOUT = "install the tenseal version vllm-tensafe pins (pip install 'tenseal>=0.3.14,<0.4')"


class LayoutError(HEError):
    """This TenSEAL build does not lay out SEAL objects the way the residue views expect."""


def _u64(address: int) -> int:
    return int(_U64.from_address(address).value)


def _object(obj: Any) -> int:
    return _u64(id(obj) + _VALUE_POINTER_OFFSET)


def _view(owner: Any, pointer: int, count: int) -> np.ndarray:
    buffer = (_U64 * count).from_address(pointer)
    buffer._owner = owner  # type: ignore[attr-defined]  # the SEAL object outlives the view
    return np.frombuffer(memoryview(buffer), dtype=np.uint64)


def ciphertext_residues(ct: Any) -> np.ndarray:
    """(size, primes, N) uint64 view over a ciphertext's polynomials (read and write).

    Valid until the ciphertext is resized or reassigned by SEAL; take a new view after any SEAL
    call that writes ``ct`` as a destination of another size or level.
    """
    if type(ct) is not seal.Ciphertext:  # the offsets are those of this one class
        raise TypeError(f"expected a SEAL Ciphertext, got {type(ct).__name__}")
    _require_layout()
    base = _object(ct)
    count = _u64(base + _CT_DATA_SIZE)
    size, primes, degree = ct.size(), ct.coeff_modulus_size(), ct.poly_modulus_degree()
    if count != size * primes * degree or count == 0:
        raise LayoutError(
            f"ciphertext buffer holds {count} residues, expected {size}x{primes}x{degree}",
            _FIX_LAYOUT,
        )
    return _view(ct, _u64(base + _CT_DATA_PTR), count).reshape(size, primes, degree)


def plaintext_residues(pt: Any, primes: int) -> np.ndarray:
    """(primes, N) uint64 view over an NTT-form CKKS plaintext's residues (read and write)."""
    if type(pt) is not seal.Plaintext:
        raise TypeError(f"expected a SEAL Plaintext, got {type(pt).__name__}")
    _require_layout()
    base = _object(pt)
    count = _u64(base + _PT_DATA_SIZE)
    if count != pt.coeff_count() or count == 0 or count % primes:
        raise LayoutError(
            f"plaintext buffer holds {count} residues, not a multiple of {primes} primes",
            _FIX_LAYOUT,
        )
    return _view(pt, _u64(base + _PT_DATA_PTR), count).reshape(primes, count // primes)


def set_ntt_form(ct: Any, ntt_form: bool) -> None:
    """Mark a ciphertext whose residues were written through a view as (not) in NTT form."""
    if type(ct) is not seal.Ciphertext:
        raise TypeError(f"expected a SEAL Ciphertext, got {type(ct).__name__}")
    _require_layout()
    ctypes.c_bool.from_address(_object(ct) + _CT_NTT).value = bool(ntt_form)


_layout_checked = False
_layout_lock = threading.Lock()


def _require_layout() -> None:
    if not _layout_checked:
        check_layout()


def check_layout() -> None:
    """Verify the member offsets on real SEAL objects (a small throwaway context); idempotent.

    Raises LayoutError when they differ; nothing reads through a pointer before this passed.
    """
    global _layout_checked
    with _layout_lock:
        if _layout_checked:
            return
        try:
            parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
            parms.set_poly_modulus_degree(4096)
            parms.set_coeff_modulus(seal.CoeffModulus.Create(4096, [40, 40]))
            context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.NONE)
            parms_id = context.first_parms_id()
            plain = seal.Plaintext()
            seal.CKKSEncoder(context).encode([0.5, -1.25, 3.0], parms_id, 2.0**30, plain)
            _check_plaintext(plain)
            ct = seal.Ciphertext(context)
            ct.resize(context, parms_id, 2)
            ct.scale = 2.0**30
            _check_ciphertext(ct)
        except LayoutError:
            raise
        except Exception as exc:  # pragma: no cover - only on an unexpected build
            raise LayoutError(f"SEAL object layout probe failed: {exc}", _FIX_LAYOUT) from None
        _layout_checked = True


def _check_plaintext(plain: Any) -> None:
    base = _object(plain)
    count = _u64(base + _PT_COEFF_COUNT)
    array = plain.dyn_array()
    ok = (
        [_u64(base + 8 * i) for i in range(4)] == list(plain.parms_id())
        and count == plain.coeff_count() == _u64(base + _PT_DATA_SIZE) == array.size()
        and ctypes.c_double.from_address(base + _PT_SCALE).value == plain.scale
    )
    if ok:
        data = _u64(base + _PT_DATA_PTR)
        ok = all(_u64(data + 8 * i) == array.at(i) for i in (0, 1, count // 2, count - 1))
    if not ok:
        raise LayoutError("SEAL Plaintext layout differs from SEAL 4.x", _FIX_LAYOUT)


def _check_ciphertext(ct: Any) -> None:
    base = _object(ct)
    fields_ok = (
        [_u64(base + 8 * i) for i in range(4)] == list(ct.parms_id())
        and _u64(base + _CT_SIZE) == ct.size() == 2
        and _u64(base + _CT_DEGREE) == ct.poly_modulus_degree()
        and _u64(base + _CT_PRIMES) == ct.coeff_modulus_size()
        and ctypes.c_double.from_address(base + _CT_SCALE).value == ct.scale
        and ctypes.c_bool.from_address(base + _CT_NTT).value == ct.is_ntt_form()
        and _u64(base + _CT_DATA_SIZE) == ct.dyn_array().size()
    )
    if not fields_ok:
        raise LayoutError("SEAL Ciphertext layout differs from SEAL 4.x", _FIX_LAYOUT)
    # Write through the (unchecked) pointer and read back through SEAL.
    data = _u64(base + _CT_DATA_PTR)
    count = _u64(base + _CT_DATA_SIZE)
    for i, value in ((0, 12345), (count - 1, 67890)):
        _U64.from_address(data + 8 * i).value = value
    array = ct.dyn_array()
    flag = ct.is_ntt_form()
    ctypes.c_bool.from_address(base + _CT_NTT).value = not flag
    flipped = ct.is_ntt_form()
    ctypes.c_bool.from_address(base + _CT_NTT).value = flag
    if array.at(0) != 12345 or array.at(count - 1) != 67890 or flipped == flag:
        raise LayoutError("SEAL Ciphertext data pointer differs from SEAL 4.x", _FIX_LAYOUT)


def mul_pow2(x: np.ndarray, shift: int, q: np.ndarray) -> np.ndarray:
    """x * 2**shift mod q, in place, for residues x < q < 2^61 (broadcast q over x).

    Steps of at most 48 bits: the float64 quotient of x * 2^48 / q is then off by at most
    one, and the wrapping uint64 difference plus one conditional correction is exact.
    """
    qf = q.astype(np.float64)
    qs = q.astype(np.int64)
    while shift > 0:
        step = min(shift, 48)
        quotient = np.floor(x.astype(np.float64) * float(1 << step) / qf).astype(np.uint64)
        x <<= np.uint64(step)
        x -= quotient * q
        reduce_once(x, qs)
        shift -= step
    return x


def reduce_once(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """In place: uint64 x holding r + m*q (two's complement), m in {-1, 0, 1} -> r in [0, q)."""
    signed = x.view(np.int64)
    signed += np.where(signed < 0, q, 0)
    signed -= np.where(signed >= q, q, 0)
    return x


def ciphertext_from_residues(
    context: Any, parms_id: Any, residues: np.ndarray, scale: float
) -> Any:
    """A new NTT-form ciphertext holding ``residues`` (size, primes, N) at ``scale``."""
    ct = seal.Ciphertext(context)
    ct.resize(context, parms_id, residues.shape[0])
    ciphertext_residues(ct)[...] = residues
    set_ntt_form(ct, True)
    ct.scale = scale
    return ct


def data_moduli(context: Any, parms_id: Any) -> list[int]:
    """The RNS primes of ciphertexts at ``parms_id``."""
    return [m.value() for m in context.get_context_data(parms_id).parms().coeff_modulus()]
