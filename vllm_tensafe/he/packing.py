"""Encrypted B' of one LoRA module: column-per-ciphertext, tiled, zero rotations.

Column j of B' (d_out values) is one CKKS ciphertext per chunk of rows. When d_out fits in the
N/2 slots the column is tiled k = floor(slots / tile_width) times, so one product ciphertext
carries the deltas of k tokens: slot t*tile_width + slot_offset + i holds row i for token t of
the group, every other slot is zero. When d_out is larger than the slots, the column is split
into chunks of ``slots`` rows (k = 1, offset 0).

``tile_width`` is d_out for a module on its own. Modules that vLLM computes in one layer (q, k,
v of a merged QKV projection; gate and up) can share a tile: each gets its own slot range
inside a tile as wide as their sum, and the delta engine adds their product ciphertexts into
one before masking, so the key holder decrypts one ciphertext per token group for all of them
(``fused_layouts``).

Binary layout of ``EncryptedMatrix.to_bytes`` (little-endian, no pickle)::

    b"TSHEMAT\\0" | u16 version=2 | 32-byte key id (SHA-256 of the public context)
    | u32 d_out | u32 rank | u32 slot_count | u32 tokens_per_ciphertext | u32 n_chunks
    | u32 slot_offset | u32 tile_width
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
from vllm_tensafe.he.residues import LayoutError, ciphertext_residues

MATRIX_MAGIC = b"TSHEMAT\x00"
MATRIX_VERSION = 2
_HEADER = struct.Struct("<8sH32sIIIII")
_TILE = struct.Struct("<II")
_LEN = struct.Struct("<I")
LAYOUT_SCHEME = "ckks-column-tiled-v2"

_FIX_PACKAGE = "re-pack the adapter with this vllm-tensafe version and the matching public key"


def chunk_rows(d_out: int, slots: int) -> list[int]:
    """Rows per chunk: one chunk when d_out fits the slots, else chunks of ``slots`` rows."""
    if d_out <= slots:
        return [d_out]
    full, rest = divmod(d_out, slots)
    return [slots] * full + ([rest] if rest else [])


def tokens_per_ciphertext(d_out: int, slots: int, tile_width: int | None = None) -> int:
    if d_out > slots:
        return 1
    return slots // (d_out if tile_width is None else tile_width)


def check_tile(d_out: int, slots: int, slot_offset: int, tile_width: int) -> None:
    """A module's slot range must lie inside its tile, and the tile inside the slots."""
    if d_out > slots:
        ok = (slot_offset, tile_width) == (0, slots)
    else:
        ok = 0 <= slot_offset and slot_offset + d_out <= tile_width <= slots
    if not ok:
        raise HEError(
            f"slot range [{slot_offset}, {slot_offset + d_out}) in tiles of {tile_width} does "
            f"not fit {slots} slots",
            "use fused_layouts() to place modules, or leave the defaults",
        )


def default_tile(d_out: int, slots: int) -> tuple[int, int]:
    """(slot_offset, tile_width) of a module on its own."""
    return 0, (slots if d_out > slots else d_out)


def fused_layouts(groups: list[list[tuple[str, int]]], slots: int) -> dict[str, tuple[int, int]]:
    """(slot_offset, tile_width) per module name for groups of modules computed together.

    ``groups`` lists (name, d_out) in the order the layer concatenates its outputs. A group
    shares one tile when the sum of its d_out fits in the slots; otherwise (and for a group of
    one) every module keeps its own tile.
    """
    out: dict[str, tuple[int, int]] = {}
    for group in groups:
        width = sum(d for _, d in group)
        if len(group) > 1 and width <= slots:
            offset = 0
            for name, d_out in group:
                out[name] = (offset, width)
                offset += d_out
        else:
            for name, d_out in group:
                out[name] = default_tile(d_out, slots)
    return out


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
    scale: float | tuple[float, ...],
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
    scales = scale if isinstance(scale, tuple) else (scale,)
    if ct.scale not in scales:
        wanted = " or ".join(f"2^{np.log2(x):g}" for x in scales)
        problems.append(f"scale {ct.scale!r} instead of {wanted}")
    if problems:
        raise error(
            f"{what} is not a protocol ciphertext for key {ctx.key_id[:16]}: "
            + "; ".join(problems),
            "send only ciphertexts computed by the vllm-tensafe delta engine for this key",
        )


def load_ciphertext(
    ctx: PublicContext,
    blob: bytes | memoryview,
    scale: float | tuple[float, ...],
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


_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_CT_MEMBERS = struct.Struct("<4QBQQQdQ")
_seal_version: tuple[int, int] | None = None


def ciphertext_to_bytes(ct: Any) -> bytes:
    """SEAL's own serialisation of ``ct``, uncompressed.

    Residues are uniformly random, so SEAL's default zstd gains nothing and costs ~1.3 ms per
    ciphertext (plus a tmpfs file); this writes the same format with compression "none" straight
    from the residues (~0.05 ms). Any SEAL ``Ciphertext.load`` reads it.
    """
    global _seal_version
    try:
        residues = ciphertext_residues(ct)
    except LayoutError:
        return SEAL_FILES.save(ct)
    if _seal_version is None:
        head = SEAL_FILES.save(ct)[: _SEAL_HEADER.size]
        _seal_version = _SEAL_HEADER.unpack(head)[2:4]
    major, minor = _seal_version
    members = _CT_MEMBERS.pack(
        *ct.parms_id(),
        int(ct.is_ntt_form()),
        ct.size(),
        ct.poly_modulus_degree(),
        ct.coeff_modulus_size(),
        ct.scale,
        1,  # correction factor (BGV only)
    )
    data = residues.tobytes()
    array_size = _SEAL_HEADER.size + 8 + len(data)
    total = _SEAL_HEADER.size + len(members) + array_size
    return b"".join(
        [
            _SEAL_HEADER.pack(0xA15E, _SEAL_HEADER.size, major, minor, 0, 0, total),
            members,
            _SEAL_HEADER.pack(0xA15E, _SEAL_HEADER.size, major, minor, 0, 0, array_size),
            struct.pack("<Q", residues.size),
            data,
        ]
    )


class EncryptedMatrix:
    """Encrypted B' (d_out x rank) of one module, as ``ciphertexts[j][c]``."""

    d_out: int
    rank: int
    tokens_per_ciphertext: int
    n_chunks: int

    slot_offset: int
    tile_width: int

    def __init__(
        self,
        ctx: PublicContext,
        d_out: int,
        rank: int,
        ciphertexts: list[list[Any]],
        *,
        slot_offset: int = 0,
        tile_width: int | None = None,
    ):
        _check_shape(d_out, rank)
        slots = ctx.slot_count
        if tile_width is None:
            tile_width = default_tile(d_out, slots)[1]
        check_tile(d_out, slots, slot_offset, tile_width)
        self.ctx = ctx
        self.d_out = d_out
        self.rank = rank
        self.slot_offset = slot_offset
        self.tile_width = tile_width
        self.chunk_rows = chunk_rows(d_out, slots)
        self.n_chunks = len(self.chunk_rows)
        self.tokens_per_ciphertext = tokens_per_ciphertext(d_out, slots, tile_width)
        if len(ciphertexts) != rank or any(len(col) != self.n_chunks for col in ciphertexts):
            raise HEError(
                f"expected {rank} columns of {self.n_chunks} ciphertexts", "report this as a bug"
            )
        self._ciphertexts: list[list[Any]] = ciphertexts  # None where limbs replaced one
        self._residue_columns: dict[int, Any] = {}

    @property
    def ciphertexts(self) -> list[list[Any]]:
        """Every Enc(B'_j) chunk as SEAL ciphertexts, ``[j][c]`` (rebuilt where the GEMM limbs
        replaced them: use ``column_ciphertext`` for one)."""
        return [
            [self.column_ciphertext(j, c) for c in range(self.n_chunks)] for j in range(self.rank)
        ]

    def residue_columns(self, chunk: int) -> Any:
        """Chunk ``chunk``'s column ciphertexts as GEMM limbs, built on first use (three times
        the ciphertexts' memory).

        When every group of this tile can take a GEMM path (2k <= rank: see DeltaEngine) the
        limbs replace the SEAL objects and ``column_ciphertext`` rebuilds one on the rare
        SEAL-path use; otherwise (many tokens per ciphertext, where SEAL's products win for
        big groups) both are kept, so the SEAL path pays no rebuilds.
        """
        columns = self._residue_columns.get(chunk)
        if columns is None:
            from vllm_tensafe.he.lincomb import ResidueColumns

            columns = ResidueColumns([self.column_ciphertext(j, chunk) for j in range(self.rank)])
            self._residue_columns[chunk] = columns
            if 2 * self.tokens_per_ciphertext <= self.rank:
                for column in self._ciphertexts:
                    column[chunk] = None
        return columns

    def column_ciphertext(self, j: int, chunk: int) -> Any:
        """Enc(B'_j) for one chunk, as a SEAL ciphertext."""
        ct = self._ciphertexts[j][chunk]
        if ct is None:
            ct = self._residue_columns[chunk].ciphertext(j, self.ctx)
        return ct

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
            "slot_offset": self.slot_offset,
            "tile_width": self.tile_width,
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
            ),
            _TILE.pack(self.slot_offset, self.tile_width),
        ]
        for j in range(self.rank):
            for c in range(self.n_chunks):
                blob = ciphertext_to_bytes(self.column_ciphertext(j, c))
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
        pos = _HEADER.size
        if len(view) < pos + _TILE.size:
            raise HEError(f"encrypted matrix is truncated ({len(view)} bytes)", _FIX_PACKAGE)
        slot_offset, tile_width = _TILE.unpack_from(view, pos)
        pos += _TILE.size
        expected = (d_out, rank, slots, tokens_per_ciphertext(d_out, slots, max(tile_width, 1)))
        found = (f_d_out, f_rank, f_slots, f_k)
        n_chunks = len(chunk_rows(d_out, slots))
        if found != expected or f_chunks != n_chunks:
            raise HEError(
                f"encrypted matrix header (d_out, rank, slots, k, chunks) = "
                f"{(*found, f_chunks)} does not match the expected {(*expected, n_chunks)}",
                "the manifest and the ciphertext member disagree; re-pack the adapter",
            )
        check_tile(d_out, slots, slot_offset, tile_width)
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
        return cls(ctx, d_out, rank, columns, slot_offset=slot_offset, tile_width=tile_width)

    def __repr__(self) -> str:
        return (
            f"EncryptedMatrix(d_out={self.d_out}, rank={self.rank}, "
            f"k={self.tokens_per_ciphertext}, chunks={self.n_chunks}, "
            f"slots [{self.slot_offset}, {self.slot_offset + self.d_out}) of {self.tile_width})"
        )


def encrypt_matrix(
    ctx: PublicContext,
    b: np.ndarray,
    progress: Callable[[int], None] | None = None,
    *,
    slot_offset: int = 0,
    tile_width: int | None = None,
) -> EncryptedMatrix:
    """Encrypt B' (d_out x rank). ``progress(1)`` after each ciphertext (tqdm.update style).

    ``slot_offset``/``tile_width`` place the module inside a shared tile (``fused_layouts``).
    """
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
    limit = min(profile.value_bound_at(np.log2(x)) for x in profile.accepted_scales)
    limit /= profile.u_norm_bound * 16
    peak = float(np.abs(arr).max(initial=0.0))
    if peak > limit:
        raise HEError(
            f"B' has entries up to {peak:.3g}; profile {profile.name!r} supports at most "
            f"{limit:.3g}",
            "check the adapter's scaling (alpha/r) or use the 'precise'/'default' profile",
        )
    slots = ctx.slot_count
    if tile_width is None:
        tile_width = default_tile(d_out, slots)[1]
    check_tile(d_out, slots, slot_offset, tile_width)
    rows = chunk_rows(d_out, slots)
    k = tokens_per_ciphertext(d_out, slots, tile_width)
    plain = seal.Plaintext()
    columns: list[list[Any]] = []
    for j in range(rank):
        column = []
        start = 0
        for length in rows:
            values = arr[start : start + length, j]
            if len(rows) == 1 and (k > 1 or slot_offset or tile_width != d_out):
                tile = np.zeros(tile_width)
                tile[slot_offset : slot_offset + d_out] = values
                values = np.tile(tile, k)
            ctx.encoder.encode(values.tolist(), ctx.parms_id, profile.b_scale, plain)
            ct = seal.Ciphertext(ctx.context)
            ctx.encryptor.encrypt(plain, ct)
            column.append(ct)
            start += length
            if progress is not None:
                progress(1)
        columns.append(column)
    return EncryptedMatrix(
        ctx, d_out, rank, columns, slot_offset=slot_offset, tile_width=tile_width
    )
