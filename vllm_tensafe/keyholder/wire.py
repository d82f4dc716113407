"""The key-holder wire protocol v2: who asks (``AdapterRef``) and the bytes on the wire.

Wire protocol v2 (docs/he-scheme.md, "What the key holder sees"): the host sends re-randomised
ciphertexts whose c0 carries a uniform pad, so each decryption is a uniform polynomial to the
key holder; the key holder floods it (he/flooding.py) and returns it modulus-switched to 64-bit
coefficients (he/ring.py); the host removes the pad and decodes. A key holder never returns a
partial, zero or stale result: it returns every reply or raises a KeyHolderError.

``POST /v1/decrypt`` (little-endian)::

    request  (application/vnd.tensafe.decrypt-v2):
      b"TSKHREQ2" | u16 n | adapter name (n bytes ASCII) | 32-byte key id
      | 32-byte manifest digest | u32 count | u32 ciphertext size | count ciphertexts
      ciphertext: u8 log2(scale) | u8 1 (NTT form) | 2 x L x N u64 residues (c0 then c1,
      prime by prime; each below its prime)
    response (application/vnd.tensafe.reply-v2):
      b"TSKHRES2" | u32 count | u32 N | count x N u64 (S_m of each flooded decryption)
    errors: JSON {"error": code, "cause": ..., "fix": ...}
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_tensafe.errors import (
    ForeignCiphertextError,
    HEError,
    KeyHolderError,
    ProtocolVersionError,
)
from vllm_tensafe.he.residues import ciphertext_from_residues, ciphertext_residues

if TYPE_CHECKING:
    from vllm_tensafe.he.keys import PublicContext

PROTOCOL_VERSION = 2
REQUEST_CONTENT_TYPE = "application/vnd.tensafe.decrypt-v2"
RESPONSE_CONTENT_TYPE = "application/vnd.tensafe.reply-v2"
REQUEST_MAGIC = b"TSKHREQ2"
RESPONSE_MAGIC = b"TSKHRES2"
_OLD_REQUEST_MAGIC = b"TSKHREQ1"
_OLD_RESPONSE_MAGIC = b"TSKHRES1"

MAX_ADAPTER_ID = 128  # bytes of an adapter name (tssp/manifest.py NAME_RE)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RESPONSE_HEAD = struct.Struct("<8sII")
_CT_HEAD = struct.Struct("<BB")


def check_adapter_id(adapter_id: object) -> str:
    """An adapter name (the package's signed ``name``): the one rule of tssp/manifest.py."""
    from vllm_tensafe.tssp.manifest import NAME_RULE, is_adapter_name

    if not is_adapter_name(adapter_id):
        raise HEError(f"invalid adapter name {str(adapter_id)[:140]!r}", f"use {NAME_RULE}")
    assert isinstance(adapter_id, str)
    return adapter_id


def _check_hex64(value: object, what: str, fix: str) -> str:
    if not isinstance(value, str) or len(value) != 64:
        raise HEError(f"invalid {what} {value!r}", fix)
    try:
        bytes.fromhex(value)
    except ValueError:
        raise HEError(f"invalid {what} {value!r}", fix) from None
    return value.lower()


def check_key_id(key_id: object) -> str:
    return _check_hex64(key_id, "key id", "pass PublicContext.key_id (64 hex digits)")


@dataclass(frozen=True)
class AdapterRef:
    """Who asks the key holder for what: the package's signed adapter name (the "adapter id"
    everywhere), the CKKS key id of its public context and the SHA-256 of its signed manifest.
    """

    name: str
    key_id: str
    manifest_digest: str

    def __post_init__(self) -> None:
        check_adapter_id(self.name)
        object.__setattr__(self, "key_id", check_key_id(self.key_id))
        object.__setattr__(
            self,
            "manifest_digest",
            _check_hex64(
                self.manifest_digest,
                "manifest digest",
                "pass TsspPackage.manifest_digest (SHA-256 of the signed manifest, 64 hex)",
            ),
        )


def _protocol_mismatch(theirs: int, side: str) -> ProtocolVersionError:
    return ProtocolVersionError(
        f"the {side} speaks key-holder protocol v{theirs}, this vllm-tensafe speaks "
        f"v{PROTOCOL_VERSION}",
        "run the same vllm-tensafe release on the host and the key holder",
    )


# --- ciphertexts on the wire ------------------------------------------------------------------


def ciphertext_size(profile: Any) -> int:
    """Bytes of one v2 request ciphertext for ``profile``."""
    return _CT_HEAD.size + profile.ciphertext_bytes


def encode_ciphertext(ct: Any) -> bytes:
    """A SEAL product ciphertext as v2 wire bytes (its residues, scale and form)."""
    scale_bits = math.log2(ct.scale)
    if scale_bits != int(scale_bits) or not ct.is_ntt_form():
        raise HEError(
            f"ciphertext of scale {ct.scale!r} (NTT form: {ct.is_ntt_form()}) is not a product "
            "of the delta engine",
            "send only ciphertexts computed by vllm_tensafe.he.DeltaEngine",
        )
    head = _CT_HEAD.pack(int(scale_bits), 1)
    return head + np.ascontiguousarray(ciphertext_residues(ct), dtype="<u8").tobytes()


def encode_residue_batch(residues: np.ndarray, scale_bits: int) -> list[memoryview]:
    """v2 wire ciphertexts of a batch (B, 2, L, N) of NTT-form residues, as views of one
    buffer (one copy for the whole batch, no SEAL object per ciphertext): for each, the bytes
    ``encode_ciphertext`` makes of a SEAL ciphertext holding it."""
    batch = np.ascontiguousarray(residues, dtype="<u8").reshape(residues.shape[0], -1)
    size = _CT_HEAD.size + batch.shape[1] * 8
    buffer = np.empty((batch.shape[0], size), dtype=np.uint8)
    buffer[:, : _CT_HEAD.size] = np.frombuffer(_CT_HEAD.pack(scale_bits, 1), dtype=np.uint8)
    buffer[:, _CT_HEAD.size :] = batch.view(np.uint8)
    view = memoryview(buffer.data).cast("B")
    return [view[i * size : (i + 1) * size] for i in range(batch.shape[0])]


def decode_ciphertext(ctx: PublicContext, blob: bytes | memoryview, what: str) -> Any:
    """v2 wire bytes -> a validated SEAL ciphertext under ``ctx`` (ForeignCiphertextError)."""
    profile = ctx.profile
    fix = "send only ciphertexts computed by the vllm-tensafe delta engine for this key"
    view = memoryview(blob)
    if len(view) != ciphertext_size(profile):
        raise ForeignCiphertextError(
            f"{what} has {len(view)} bytes, a ciphertext of profile {profile.name!r} has "
            f"{ciphertext_size(profile)}",
            fix,
        )
    scale_bits, ntt = _CT_HEAD.unpack_from(view)
    if ntt != 1 or scale_bits not in profile.accepted_scale_bits:
        wanted = " or ".join(f"2^{b}" for b in profile.accepted_scale_bits)
        raise ForeignCiphertextError(
            f"{what} is not a protocol ciphertext for key {ctx.key_id[:16]}: scale "
            f"2^{scale_bits} (wanted {wanted}), NTT flag {ntt}",
            fix,
        )
    residues = np.frombuffer(view, dtype="<u8", offset=_CT_HEAD.size).reshape(
        2, profile.data_primes, profile.poly_modulus_degree
    )
    moduli = np.array(
        [m.value() for m in ctx.context.get_context_data(ctx.parms_id).parms().coeff_modulus()],
        dtype=np.uint64,
    )
    if np.any(residues >= moduli[None, :, None]):
        raise ForeignCiphertextError(f"{what} has residues not reduced mod their prime", fix)
    return ciphertext_from_residues(ctx.context, ctx.parms_id, residues, 2.0**scale_bits)


# --- requests and responses -------------------------------------------------------------------


def encode_request(ref: AdapterRef, ciphertexts: Sequence[bytes | memoryview]) -> bytes:
    name = ref.name.encode("utf-8")
    size = len(ciphertexts[0]) if ciphertexts else 0
    if any(len(blob) != size for blob in ciphertexts):
        raise HEError("ciphertexts of one request differ in size", "encode them with one profile")
    parts: list[bytes | memoryview] = [
        REQUEST_MAGIC,
        _U16.pack(len(name)),
        name,
        bytes.fromhex(ref.key_id),
        bytes.fromhex(ref.manifest_digest),
        _U32.pack(len(ciphertexts)),
        _U32.pack(size),
    ]
    parts.extend(ciphertexts)  # bytes or memoryviews: join copies each once
    return b"".join(parts)


def decode_request(body: bytes, max_count: int) -> tuple[AdapterRef, list[memoryview]]:
    """Inverse of encode_request; HEError on anything malformed, ProtocolVersionError for v1."""
    fix = "send requests made by vllm_tensafe.keyholder.RemoteKeyHolder"
    view = memoryview(body)
    if bytes(view[:8]) == _OLD_REQUEST_MAGIC:
        raise _protocol_mismatch(1, "host")
    if len(view) < len(REQUEST_MAGIC) + 2 or bytes(view[:8]) != REQUEST_MAGIC:
        raise HEError("not a decrypt request (bad magic)", fix)
    pos = len(REQUEST_MAGIC)
    (n,) = _U16.unpack_from(view, pos)
    pos += 2
    if n == 0 or n > MAX_ADAPTER_ID or pos + n + 64 + 8 > len(view):
        raise HEError("decrypt request has a malformed adapter id", fix)
    try:
        name = bytes(view[pos : pos + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise HEError("adapter id is not valid UTF-8", fix) from None
    pos += n
    key_id = bytes(view[pos : pos + 32]).hex()
    digest = bytes(view[pos + 32 : pos + 64]).hex()
    pos += 64
    ref = AdapterRef(name, key_id, digest)
    count, size = struct.unpack_from("<II", view, pos)
    pos += 8
    if count == 0 or count > max_count:
        raise HEError(f"decrypt request carries {count} ciphertexts (1..{max_count})", fix)
    if size == 0 or pos + count * size != len(view):
        raise HEError("decrypt request is truncated or has trailing bytes", fix)
    blobs = [view[pos + i * size : pos + (i + 1) * size] for i in range(count)]
    return ref, blobs


def encode_response(replies: Sequence[np.ndarray]) -> bytes:
    if not replies:
        return _RESPONSE_HEAD.pack(RESPONSE_MAGIC, 0, 0)
    arr = np.stack([np.asarray(r, dtype="<u8") for r in replies])
    return _RESPONSE_HEAD.pack(RESPONSE_MAGIC, arr.shape[0], arr.shape[1]) + arr.tobytes()


def decode_response(data: bytes, expected_count: int) -> list[np.ndarray]:
    def bad(reason: str) -> KeyHolderError:
        return KeyHolderError(
            f"malformed key-holder reply ({reason})",
            "check that the URL points at a vllm-tensafe key holder of the same version",
        )

    if len(data) < _RESPONSE_HEAD.size:
        raise bad("truncated")
    magic, count, n = _RESPONSE_HEAD.unpack_from(data)
    if magic == _OLD_RESPONSE_MAGIC:
        raise _protocol_mismatch(1, "key holder")
    if magic != RESPONSE_MAGIC:
        raise bad("bad magic")
    if count != expected_count or n == 0:
        raise bad(f"{count} results for {expected_count} ciphertexts")
    if len(data) != _RESPONSE_HEAD.size + 8 * count * n:
        raise bad("wrong length")
    arr = np.frombuffer(data, dtype="<u8", offset=_RESPONSE_HEAD.size).reshape(count, n)
    return [row.astype(np.uint64) for row in arr]
