"""Encrypted B' of one LoRA module: column-per-ciphertext, tiled, zero rotations.

Column j of B' (d_out values) is one CKKS ciphertext per chunk of rows. When d_out fits in the
N/2 slots the column is tiled k = floor(slots / d_out) times, so one product ciphertext carries
the deltas of k tokens: slot t*d_out + i holds row i for token t of the group. When d_out is
larger than the slots, the column is split into chunks of ``slots`` rows (k = 1).

Binary layout of ``EncryptedMatrix.to_bytes`` (little-endian, no pickle)::

    b"TSHEMAT\\0" | u16 version=1 | 32-byte key id (SHA-256 of the public context)
    | u32 d_out | u32 rank | u32 slot_count | u32 tokens_per_ciphertext | u32 n_chunks
    | rank * n_chunks times: u32 length | SEAL ciphertext
    ciphertext order: column-major, index = j * n_chunks + c

Every ciphertext is at the first data level, 2 polynomials, NTT form, scale 2^b_scale_bits.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import ForeignCiphertextError, HEError
from vllm_tensafe.he.keys import SEAL_FILES, PublicContext, check_seal_blob
from vllm_tensafe.he.profiles import HEProfile, get_profile

MATRIX_MAGIC = b"TSHEMAT\x00"
MATRIX_VERSION = 1
_HEADER = struct.Struct("<8sH32sIIIII")
_LEN = struct.Struct("<I")
LAYOUT_SCHEME = "ckks-column-tiled-v1"

_FIX_PACKAGE = "re-pack the adapter with this vllm-tensafe version and the matching public key"


def chunk_rows(d_out: int, slots: int) -> list[int]:
    """Rows per chunk: one chunk when d_out fits the slots, else chunks of ``slots`` rows."""
    if d_out <= slots:
        return [d_out]
    full, rest = divmod(d_out, slots)
    return [slots] * full + ([rest] if rest else [])


def tokens_per_ciphertext(d_out: int, slots: int) -> int:
    return slots // d_out if d_out <= slots else 1


def _profile_of(ctx_or_profile: PublicContext | HEProfile | str) -> HEProfile:
    if isinstance(ctx_or_profile, PublicContext):
        return ctx_or_profile.profile
    if isinstance(ctx_or_profile, HEProfile):
        return ctx_or_profile
    return get_profile(ctx_or_profile)


def ciphertext_count(ctx_or_profile: PublicContext | HEProfile | str, d_out: int, rank: int) -> int:
    """Ciphertexts ``encrypt_matrix`` makes for a (d_out, rank) B' (for progress bars)."""
    _check_shape(d_out, rank)
    return rank * len(chunk_rows(d_out, _profile_of(ctx_or_profile).slot_count))


def _check_shape(d_out: int, rank: int) -> None:
    if not (isinstance(d_out, int) and isinstance(rank, int)) or d_out < 1 or rank < 1:
        raise HEError(
            f"invalid B' shape (d_out={d_out!r}, rank={rank!r})",
            "d_out and rank must be positive integers",
        )
    if d_out > 1 << 24 or rank > 1 << 16:
        raise HEError(
            f"B' shape (d_out={d_out}, rank={rank}) is implausibly large",
            "check the adapter: LoRA modules have d_out < 2^24 and rank < 2^16",
        )


def check_ciphertext(
    ct: Any,
    ctx: PublicContext,
    scale: float,
    what: str,
    error: type[HEError] = HEError,
) -> None:
    """Refuse any ciphertext that is not exactly what the protocol produces."""
    profile = ctx.profile
    problems = []
    if ct.size() != 2:
        problems.append(f"{ct.size()} polynomials instead of 2")
    if ct.poly_modulus_degree() != profile.poly_modulus_degree:
        problems.append(
            f"ring degree {ct.poly_modulus_degree()} instead of {profile.poly_modulus_degree}"
        )
    if list(ct.parms_id()) != list(ctx.parms_id) or ct.coeff_modulus_size() != profile.data_primes:
        problems.append("wrong parameters or modulus level")
    if not ct.is_ntt_form():
        problems.append("not in NTT form")
    if ct.scale != scale:
        problems.append(f"scale {ct.scale!r} instead of 2^{np.log2(scale):g}")
    if problems:
        raise error(
            f"{what} is not a protocol ciphertext for key {ctx.key_id[:16]}: "
            + "; ".join(problems),
            "send only ciphertexts computed by the vllm-tensafe delta engine for this key",
        )


def load_ciphertext(
    ctx: PublicContext,
    blob: bytes | memoryview,
    scale: float,
    what: str,
    error: type[HEError] = HEError,
) -> Any:
    """SEAL bytes -> validated ciphertext (bounded before SEAL parses anything)."""
    try:
        check_seal_blob(blob, ctx.profile.ciphertext_bytes + 256, what)
        ct = seal.Ciphertext(ctx.context)
        SEAL_FILES.load(blob, lambda path: ct.load(ctx.context, path))
    except HEError as exc:
        raise error(exc.cause, exc.fix) from None
    except Exception as exc:  # SEAL's own validity checks (coefficients >= modulus, ...)
        raise error(
            f"{what} was refused by SEAL: {exc}",
            "send only ciphertexts made under this key and profile",
        ) from None
    check_ciphertext(ct, ctx, scale, what, error)
    return ct


def ciphertext_to_bytes(ct: Any) -> bytes:
    return SEAL_FILES.save(ct)


class EncryptedMatrix:
    """Encrypted B' (d_out x rank) of one module, as ``ciphertexts[j][c]``."""

    d_out: int
    rank: int
    tokens_per_ciphertext: int
    n_chunks: int

    def __init__(self, ctx: PublicContext, d_out: int, rank: int, ciphertexts: list[list[Any]]):
        _check_shape(d_out, rank)
        self.ctx = ctx
        self.d_out = d_out
        self.rank = rank
        self.chunk_rows = chunk_rows(d_out, ctx.slot_count)
        self.n_chunks = len(self.chunk_rows)
        self.tokens_per_ciphertext = tokens_per_ciphertext(d_out, ctx.slot_count)
        if len(ciphertexts) != rank or any(len(col) != self.n_chunks for col in ciphertexts):
            raise HEError(
                f"expected {rank} columns of {self.n_chunks} ciphertexts", "report this as a bug"
            )
        self.ciphertexts = ciphertexts

    @property
    def key_id(self) -> str:
        return self.ctx.key_id

    @property
    def ciphertext_count(self) -> int:
        return self.rank * self.n_chunks

    def layout(self) -> dict[str, object]:
        profile = self.ctx.profile
        return {
            "scheme": LAYOUT_SCHEME,
            "profile": profile.name,
            "key_id": self.ctx.key_id,
            "d_out": self.d_out,
            "rank": self.rank,
            "slot_count": profile.slot_count,
            "tokens_per_ciphertext": self.tokens_per_ciphertext,
            "n_chunks": self.n_chunks,
            "chunk_rows": list(self.chunk_rows),
            "ciphertexts": self.ciphertext_count,
            "order": "column-major: index = j * n_chunks + c",
            "b_scale_bits": profile.b_scale_bits,
        }

    def to_bytes(self) -> bytes:
        slots = self.ctx.slot_count
        parts = [
            _HEADER.pack(
                MATRIX_MAGIC,
                MATRIX_VERSION,
                bytes.fromhex(self.ctx.key_id),
                self.d_out,
                self.rank,
                slots,
                self.tokens_per_ciphertext,
                self.n_chunks,
            )
        ]
        for column in self.ciphertexts:
            for ct in column:
                blob = ciphertext_to_bytes(ct)
                parts.append(_LEN.pack(len(blob)))
                parts.append(blob)
        return b"".join(parts)

    @classmethod
    def from_bytes(
        cls, ctx: PublicContext, data: bytes, *, d_out: int, rank: int
    ) -> EncryptedMatrix:
        try:
            return cls._from_bytes(ctx, data, d_out, rank)
        except HEError:
            raise
        except Exception as exc:
            raise HEError(
                f"encrypted matrix could not be read: {type(exc).__name__}: {exc}", _FIX_PACKAGE
            ) from None

    @classmethod
    def _from_bytes(cls, ctx: PublicContext, data: bytes, d_out: int, rank: int) -> EncryptedMatrix:
        _check_shape(d_out, rank)
        view = memoryview(data)
        if len(view) < _HEADER.size:
            raise HEError(f"encrypted matrix is truncated ({len(view)} bytes)", _FIX_PACKAGE)
        magic, version, key_id, f_d_out, f_rank, f_slots, f_k, f_chunks = _HEADER.unpack_from(view)
        if magic != MATRIX_MAGIC:
            raise HEError("not a vllm-tensafe encrypted matrix (bad magic)", _FIX_PACKAGE)
        if version != MATRIX_VERSION:
            raise HEError(f"encrypted matrix format version {version} unsupported", _FIX_PACKAGE)
        if key_id.hex() != ctx.key_id:
            raise ForeignCiphertextError(
                f"encrypted matrix was made under key {key_id.hex()[:16]}, not the context's "
                f"key {ctx.key_id[:16]}",
                "load the public context (PREFIX.public) the adapter was packed with",
            )
        slots = ctx.slot_count
        expected = (d_out, rank, slots, tokens_per_ciphertext(d_out, slots))
        found = (f_d_out, f_rank, f_slots, f_k)
        n_chunks = len(chunk_rows(d_out, slots))
        if found != expected or f_chunks != n_chunks:
            raise HEError(
                f"encrypted matrix header (d_out, rank, slots, k, chunks) = "
                f"{(*found, f_chunks)} does not match the expected {(*expected, n_chunks)}",
                "the manifest and the ciphertext member disagree; re-pack the adapter",
            )
        pos = _HEADER.size
        columns: list[list[Any]] = []
        for j in range(rank):
            column = []
            for c in range(n_chunks):
                what = f"ciphertext {j * n_chunks + c} of the encrypted matrix"
                if pos + _LEN.size > len(view):
                    raise HEError(f"{what} is missing (data truncated)", _FIX_PACKAGE)
                (length,) = _LEN.unpack_from(view, pos)
                pos += _LEN.size
                if length > ctx.profile.ciphertext_bytes * 3 or pos + length > len(view):
                    raise HEError(f"{what} has an impossible length {length}", _FIX_PACKAGE)
                column.append(
                    load_ciphertext(ctx, view[pos : pos + length], ctx.profile.b_scale, what)
                )
                pos += length
            columns.append(column)
        if pos != len(view):
            raise HEError(f"encrypted matrix has {len(view) - pos} trailing bytes", _FIX_PACKAGE)
        return cls(ctx, d_out, rank, columns)

    def __repr__(self) -> str:
        return (
            f"EncryptedMatrix(d_out={self.d_out}, rank={self.rank}, "
            f"k={self.tokens_per_ciphertext}, chunks={self.n_chunks})"
        )


def encrypt_matrix(
    ctx: PublicContext,
    b: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> EncryptedMatrix:
    """Encrypt B' (d_out x rank). ``progress(1)`` after each ciphertext (tqdm.update style)."""
    arr = np.asarray(b)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise HEError(
            f"B' must be a 2-D real matrix (d_out, rank), got shape {arr.shape} dtype {arr.dtype}",
            "pass s * B @ inv(R) as a float array",
        )
    arr = arr.astype(np.float64, copy=False)
    d_out, rank = int(arr.shape[0]), int(arr.shape[1])
    _check_shape(d_out, rank)
    if not np.all(np.isfinite(arr)):
        raise HEError("B' contains NaN or infinite values", "fix the adapter weights")
    profile = ctx.profile
    # |delta| = |<u, b'_row>| <= ||u|| * ||b'_row|| must stay below the modulus headroom.
    limit = profile.value_bound / profile.u_norm_bound / 16
    peak = float(np.abs(arr).max(initial=0.0))
    if peak > limit:
        raise HEError(
            f"B' has entries up to {peak:.3g}; profile {profile.name!r} supports at most "
            f"{limit:.3g}",
            "check the adapter's scaling (alpha/r) or use the 'precise'/'default' profile",
        )
    rows = chunk_rows(d_out, ctx.slot_count)
    k = tokens_per_ciphertext(d_out, ctx.slot_count)
    plain = seal.Plaintext()
    columns: list[list[Any]] = []
    for j in range(rank):
        column = []
        start = 0
        for length in rows:
            values = arr[start : start + length, j]
            if k > 1:
                values = np.tile(values, k)
            ctx.encoder.encode(values.tolist(), ctx.parms_id, profile.b_scale, plain)
            ct = seal.Ciphertext(ctx.context)
            ctx.encryptor.encrypt(plain, ct)
            column.append(ct)
            start += length
            if progress is not None:
                progress(1)
        columns.append(column)
    return EncryptedMatrix(ctx, d_out, rank, columns)
