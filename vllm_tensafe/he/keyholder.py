"""Key holders: whoever holds the CKKS secret key and decrypts the host's masked delta batches.

``LocalKeyHolder`` runs in the host process (the key is in host memory: adapters are protected at
rest and in transit only). ``RemoteKeyHolder`` (remote.py) talks to ``vllm-tensafe key-holder
serve`` (service/): the host never holds the key; every decryption is authenticated, checked
against the key holder's adapter policy, metered, audited and revocable.

Both refuse anything that is not a protocol ciphertext under their key, flood every decryption
(flooding.py) and round what they return to the profile's grid. A key holder never returns a
partial, zero or stale result: it returns all values or raises a KeyHolderError.

Wire format of ``POST /v1/decrypt`` (little-endian), protocol version 2::

    request  (application/vnd.tensafe.decrypt-v2):
      b"TSKHREQ2" | u8 n | adapter name (n bytes ASCII) | 32-byte key id
      | 32-byte manifest digest | u32 count | count times: u32 length | SEAL ciphertext
    response (application/vnd.tensafe.reply-v2):
      b"TSKHRES2" | u32 count | u32 slots | count * slots float64
    errors: JSON {"error": code, "cause": ..., "fix": ...} (docs/key-holder.md lists them)

A version-1 request (``b"TSKHREQ1"``) is refused with a ProtocolVersionError naming both.
"""

from __future__ import annotations

import abc
import hmac
import logging
import math
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import (
    ConfigError,
    ForeignCiphertextError,
    HEError,
    KeyHolderError,
    ProtocolVersionError,
)
from vllm_tensafe.he.flooding import Flooder, round_to_grid
from vllm_tensafe.he.keys import SecretKeySet
from vllm_tensafe.he.packing import check_ciphertext, load_ciphertext
from vllm_tensafe.tssp.manifest import NAME_RULE, is_adapter_name

if TYPE_CHECKING:
    from vllm_tensafe.settings import TenSafeSettings

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
REQUEST_CONTENT_TYPE = "application/vnd.tensafe.decrypt-v2"
RESPONSE_CONTENT_TYPE = "application/vnd.tensafe.reply-v2"
REQUEST_MAGIC = b"TSKHREQ2"
RESPONSE_MAGIC = b"TSKHRES2"
_V1_REQUEST_MAGIC = b"TSKHREQ1"
# The manifest digest of an engine that serves no package (tests, benchmarks): no key
# holder's policy accepts it, so it works with a local key holder only.
UNBOUND_DIGEST = "0" * 64

_HEX64 = re.compile(r"[0-9a-f]{64}")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_RESPONSE_HEAD = struct.Struct("<8sII")


@dataclass(frozen=True)
class AdapterRef:
    """Who asks for what: the request header carries all three.

    ``name`` is the package's signed adapter name (manifest ``name``), which is what "adapter
    id" means everywhere; ``key_id`` the CKKS key id of the package's public context;
    ``manifest_digest`` the SHA-256 of the package's signed manifest bytes.
    """

    name: str
    key_id: str
    manifest_digest: str

    def __post_init__(self) -> None:
        if not is_adapter_name(self.name):
            raise HEError(f"invalid adapter name {str(self.name)[:140]!r}", f"use {NAME_RULE}")
        for field_name in ("key_id", "manifest_digest"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                raise HEError(
                    f"invalid {field_name} {str(value)[:80]!r}", "pass 64 lowercase hex digits"
                )


def check_key_id(key_id: object) -> str:
    if not isinstance(key_id, str) or not _HEX64.fullmatch(key_id.lower()):
        raise HEError(f"invalid key id {key_id!r}", "pass PublicContext.key_id (64 hex digits)")
    return key_id.lower()


def encode_request(ref: AdapterRef, ciphertexts: Sequence[bytes]) -> bytes:
    name = ref.name.encode("ascii")
    parts = [
        REQUEST_MAGIC,
        _U8.pack(len(name)),
        name,
        bytes.fromhex(ref.key_id),
        bytes.fromhex(ref.manifest_digest),
        _U32.pack(len(ciphertexts)),
    ]
    for blob in ciphertexts:
        parts.append(_U32.pack(len(blob)))
        parts.append(bytes(blob))
    return b"".join(parts)


def decode_request(body: bytes, max_count: int) -> tuple[AdapterRef, list[memoryview]]:
    """Inverse of encode_request; HEError on anything malformed, ProtocolVersionError for v1."""
    fix = "send requests made by vllm_tensafe.he.remote.RemoteKeyHolder"
    view = memoryview(body)
    magic = bytes(view[: len(REQUEST_MAGIC)])
    if magic == _V1_REQUEST_MAGIC:
        raise ProtocolVersionError(
            "the host speaks key-holder protocol version 1; this key holder speaks version "
            f"{PROTOCOL_VERSION}",
            "upgrade vllm-tensafe on the host to the key holder's version",
        )
    if len(view) < len(REQUEST_MAGIC) + 1 or magic != REQUEST_MAGIC:
        raise HEError("not a decrypt request (bad magic)", fix)
    pos = len(REQUEST_MAGIC)
    (n,) = _U8.unpack_from(view, pos)
    pos += 1
    if n == 0 or pos + n + 32 + 32 + 4 > len(view):
        raise HEError("decrypt request has a malformed header", fix)
    try:
        name = bytes(view[pos : pos + n]).decode("ascii")
    except UnicodeDecodeError:
        raise HEError("adapter name is not ASCII", f"use {NAME_RULE}") from None
    pos += n
    key_id = bytes(view[pos : pos + 32]).hex()
    pos += 32
    digest = bytes(view[pos : pos + 32]).hex()
    pos += 32
    ref = AdapterRef(name, key_id, digest)
    (count,) = _U32.unpack_from(view, pos)
    pos += 4
    if count == 0 or count > max_count:
        raise HEError(f"decrypt request carries {count} ciphertexts (1..{max_count})", fix)
    blobs = []
    for _ in range(count):
        if pos + 4 > len(view):
            raise HEError("decrypt request is truncated", fix)
        (length,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + length > len(view):
            raise HEError("decrypt request is truncated", fix)
        blobs.append(view[pos : pos + length])
        pos += length
    if pos != len(view):
        raise HEError("decrypt request has trailing bytes", fix)
    return ref, blobs


def encode_response(replies: Sequence[np.ndarray]) -> bytes:
    if not replies:
        return _RESPONSE_HEAD.pack(RESPONSE_MAGIC, 0, 0)
    arr = np.stack([np.asarray(v, dtype="<f8") for v in replies])
    return _RESPONSE_HEAD.pack(RESPONSE_MAGIC, arr.shape[0], arr.shape[1]) + arr.tobytes()


def decode_response(data: bytes, expected_count: int) -> list[np.ndarray]:
    def bad(reason: str) -> KeyHolderError:
        return KeyHolderError(
            f"malformed key-holder reply ({reason})",
            "check that the URL points at a vllm-tensafe key holder of the same version",
        )

    if len(data) < _RESPONSE_HEAD.size:
        raise bad("truncated")
    magic, count, slots = _RESPONSE_HEAD.unpack_from(data)
    if magic != RESPONSE_MAGIC:
        raise bad("bad magic")
    if count != expected_count or slots == 0:
        raise bad(f"{count} results for {expected_count} ciphertexts")
    if len(data) != _RESPONSE_HEAD.size + 8 * count * slots:
        raise bad("wrong length")
    arr = np.frombuffer(data, dtype="<f8", offset=_RESPONSE_HEAD.size).reshape(count, slots)
    if not np.all(np.isfinite(arr)):
        raise bad("non-finite values")
    return [row.astype(np.float64) for row in arr]


class KeyHolder(abc.ABC):
    """Decrypts batches of masked product ciphertexts for one CKKS key."""

    kind: str

    @abc.abstractmethod
    def decrypt(self, ref: AdapterRef, ciphertexts: Sequence[bytes]) -> list[np.ndarray]:
        """Flooded, rounded slot values (one float64 array of slot_count per ciphertext)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections or key material."""

    def __enter__(self) -> KeyHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalKeyHolder(KeyHolder):
    """Decrypts in this process. ``flooding=False`` exists for tests only (it leaks the key)."""

    kind = "local"

    def __init__(self, secret: SecretKeySet, *, flooding: bool = True) -> None:
        self._secret = secret
        self.ctx = secret.public_context()
        self.profile = self.ctx.profile
        self.key_id = secret.key_id
        self.flooding = bool(flooding)
        if not self.flooding:
            log.warning(
                "key holder %s runs WITHOUT noise flooding: its replies reveal the secret key. "
                "Tests only.",
                self.key_id[:16],
            )
        self._decryptor = seal.Decryptor(self.ctx.context, secret.secret_key)
        self._flooder = Flooder(self.ctx)
        self._plain = seal.Plaintext()
        self._lock = threading.Lock()
        self.ciphertexts_decrypted = 0

    def _check_key(self, key_id: str) -> None:
        if not isinstance(key_id, str) or key_id.lower() != self.key_id:
            raise ForeignCiphertextError(
                f"ciphertexts declare key {str(key_id)[:16]}, this key holder holds "
                f"{self.key_id[:16]}",
                "route the adapter to the key holder of the key it was packed with",
            )

    def decrypt(self, ref: AdapterRef, ciphertexts: Sequence[bytes]) -> list[np.ndarray]:
        self._check_key(ref.key_id)
        loaded = [
            load_ciphertext(
                self.ctx,
                blob,
                self.profile.accepted_scales,
                f"ciphertext {i}",
                ForeignCiphertextError,
            )
            for i, blob in enumerate(ciphertexts)
        ]
        return self._decrypt_checked(loaded)

    def _decrypt_ciphertexts(self, ref: AdapterRef, ciphertexts: Sequence[Any]) -> list[np.ndarray]:
        """In-process fast path: SEAL ciphertext objects, no serialisation."""
        self._check_key(ref.key_id)
        for i, ct in enumerate(ciphertexts):
            check_ciphertext(
                ct,
                self.ctx,
                self.profile.accepted_scales,
                f"ciphertext {i}",
                ForeignCiphertextError,
            )
        return self._decrypt_checked(ciphertexts)

    def _decrypt_checked(self, ciphertexts: Sequence[Any]) -> list[np.ndarray]:
        profile = self.profile
        out = []
        with self._lock:
            sources = self._flooder.flooded_many(ciphertexts) if self.flooding else ciphertexts
            for i, src in enumerate(sources):
                self._decryptor.decrypt(src, self._plain)
                values = np.asarray(self.ctx.encoder.decode_double(self._plain), dtype=np.float64)
                # Checked on the flooded value, so the refusal reveals nothing the reply
                # would not. A foreign key decrypts to noise uniform mod q: far out of range.
                bound = profile.value_bound_at(math.log2(src.scale))
                if not np.all(np.isfinite(values)) or np.abs(values).max() > bound:
                    raise ForeignCiphertextError(
                        f"ciphertext {i} decrypts outside the protocol range: it was not made "
                        "under this key, is corrupted, or its delta overflowed",
                        "send only ciphertexts computed by the delta engine for this key",
                    )
                out.append(round_to_grid(values, profile.grid) if self.flooding else values)
            self.ciphertexts_decrypted += len(out)
        return out

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalKeyHolder(key_id={self.key_id[:16]}..., flooding={self.flooding})"


def token_fingerprint(token: str) -> str:
    """Identifies a token in logs without revealing it."""
    import hashlib

    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def same_token(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def read_token_file(path: Any) -> str:
    from pathlib import Path

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(
            f"key holder token file {str(path)!r} cannot be read: {exc.strerror}",
            "set TENSAFE_KEY_HOLDER_TOKEN_FILE to a readable file holding the token",
        ) from None
    tokens = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(tokens) != 1:
        raise ConfigError(
            f"key holder token file {str(path)!r} holds {len(tokens)} tokens, expected 1",
            "put exactly one bearer token in the file",
        )
    return tokens[0]


def key_holder_from_settings(settings: TenSafeSettings) -> KeyHolder:
    """The key holder the settings describe; never falls back to another kind."""
    if settings.key_holder == "local":
        if settings.he_secret is None:
            raise ConfigError(
                "key_holder is 'local' but no secret key file is set",
                "set --tensafe-he-secret / TENSAFE_HE_SECRET to PREFIX.secret",
            )
        secret = SecretKeySet.load(settings.he_secret, settings.he_secret_passphrase)
        return LocalKeyHolder(secret)
    if settings.key_holder == "remote":
        if not settings.key_holder_url or settings.key_holder_token_file is None:
            raise ConfigError(
                "key_holder is 'remote' but the URL or token file is missing",
                "set TENSAFE_KEY_HOLDER_URL and TENSAFE_KEY_HOLDER_TOKEN_FILE",
            )
        from vllm_tensafe.he.remote import RemoteKeyHolder

        return RemoteKeyHolder(
            settings.key_holder_url,
            read_token_file(settings.key_holder_token_file),
            timeout=settings.key_holder_timeout,
            retries=settings.key_holder_retries,
            ca_file=str(settings.key_holder_ca) if settings.key_holder_ca else None,
            client_cert=settings.key_holder_client_cert,
            client_key=settings.key_holder_client_key,
        )
    raise ConfigError(f"unknown key holder kind {settings.key_holder!r}", "use 'local' or 'remote'")
