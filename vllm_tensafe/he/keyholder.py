"""Key holders: whoever holds the CKKS secret key and decrypts the host's masked delta batches.

``LocalKeyHolder`` runs in the host process (the key is in host memory: adapters are protected at
rest and in transit only). ``RemoteKeyHolder`` talks to ``vllm-tensafe key-holder serve``: the
host never holds the key; every decryption is authenticated, metered, audited and revocable.

Both refuse anything that is not a protocol ciphertext under their key, flood every decryption
(flooding.py) and round what they return to the profile's grid. A key holder never returns a
partial, zero or stale result: it returns all values or raises a KeyHolderError.

Wire format of ``POST /v1/decrypt`` (little-endian)::

    request  (application/vnd.tensafe.decrypt-v1):
      b"TSKHREQ1" | u16 n | adapter id (n bytes utf-8) | 32-byte key id | u32 count
      | count times: u32 length | SEAL ciphertext
    response (application/vnd.tensafe.values-v1):
      b"TSKHRES1" | u32 count | u32 slots | count * slots float64
    errors: JSON {"error": code, "cause": ..., "fix": ...}; codes unauthorized (401),
      adapter_revoked (410), budget_exhausted (429), foreign_ciphertext (422),
      bad_request (400), too_large (413), unavailable (503), internal (500)
"""

from __future__ import annotations

import abc
import hmac
import http.client
import json
import logging
import math
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

import numpy as np
import tenseal.sealapi as seal

from vllm_tensafe.errors import (
    AdapterRevokedError,
    BudgetExhaustedError,
    ConfigError,
    ForeignCiphertextError,
    HEError,
    KeyHolderAuthError,
    KeyHolderError,
    KeyHolderUnavailableError,
)
from vllm_tensafe.he.flooding import Flooder, round_to_grid
from vllm_tensafe.he.keys import SecretKeySet
from vllm_tensafe.he.packing import check_ciphertext, load_ciphertext
from vllm_tensafe.he.service import REQUEST_CONTENT_TYPE, RESPONSE_CONTENT_TYPE

if TYPE_CHECKING:
    from vllm_tensafe.settings import TenSafeSettings

log = logging.getLogger(__name__)

REQUEST_MAGIC = b"TSKHREQ1"
RESPONSE_MAGIC = b"TSKHRES1"

MAX_ADAPTER_ID = 256

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RESPONSE_HEAD = struct.Struct("<8sII")


def check_adapter_id(adapter_id: object) -> str:
    if (
        not isinstance(adapter_id, str)
        or not adapter_id
        or len(adapter_id.encode("utf-8")) > MAX_ADAPTER_ID
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in adapter_id)
        or adapter_id != adapter_id.strip()
    ):
        raise HEError(
            f"invalid adapter id {adapter_id!r}",
            f"use a non-empty printable id of at most {MAX_ADAPTER_ID} bytes without "
            "surrounding whitespace",
        )
    return adapter_id


def check_key_id(key_id: object) -> str:
    if not isinstance(key_id, str) or len(key_id) != 64:
        raise HEError(f"invalid key id {key_id!r}", "pass PublicContext.key_id (64 hex digits)")
    try:
        bytes.fromhex(key_id)
    except ValueError:
        raise HEError(
            f"invalid key id {key_id!r}", "pass PublicContext.key_id (64 hex digits)"
        ) from None
    return key_id.lower()


def encode_request(adapter_id: str, key_id: str, ciphertexts: Sequence[bytes]) -> bytes:
    aid = check_adapter_id(adapter_id).encode("utf-8")
    parts = [REQUEST_MAGIC, _U16.pack(len(aid)), aid, bytes.fromhex(check_key_id(key_id))]
    parts.append(_U32.pack(len(ciphertexts)))
    for blob in ciphertexts:
        parts.append(_U32.pack(len(blob)))
        parts.append(bytes(blob))
    return b"".join(parts)


def decode_request(body: bytes, max_count: int) -> tuple[str, str, list[memoryview]]:
    """Inverse of encode_request; HEError on anything malformed."""
    fix = "send requests made by vllm_tensafe.he.keyholder.RemoteKeyHolder"
    view = memoryview(body)
    if len(view) < len(REQUEST_MAGIC) + 2 or bytes(view[:8]) != REQUEST_MAGIC:
        raise HEError("not a decrypt request (bad magic)", fix)
    pos = len(REQUEST_MAGIC)
    (n,) = _U16.unpack_from(view, pos)
    pos += 2
    if n == 0 or n > MAX_ADAPTER_ID or pos + n + 32 + 4 > len(view):
        raise HEError("decrypt request has a malformed adapter id", fix)
    try:
        adapter_id = check_adapter_id(bytes(view[pos : pos + n]).decode("utf-8"))
    except UnicodeDecodeError:
        raise HEError("adapter id is not valid UTF-8", fix) from None
    pos += n
    key_id = bytes(view[pos : pos + 32]).hex()
    pos += 32
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
    return adapter_id, key_id, blobs


def encode_response(values: Sequence[np.ndarray]) -> bytes:
    if not values:
        return _RESPONSE_HEAD.pack(RESPONSE_MAGIC, 0, 0)
    arr = np.stack([np.asarray(v, dtype="<f8") for v in values])
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
    def decrypt(self, adapter_id: str, key_id: str, ciphertexts: list[bytes]) -> list[np.ndarray]:
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

    def decrypt(self, adapter_id: str, key_id: str, ciphertexts: list[bytes]) -> list[np.ndarray]:
        self._check_key(key_id)
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

    def _decrypt_ciphertexts(
        self, adapter_id: str, key_id: str, ciphertexts: Sequence[Any]
    ) -> list[np.ndarray]:
        """In-process fast path: SEAL ciphertext objects, no serialisation."""
        self._check_key(key_id)
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


class RemoteKeyHolder(KeyHolder):
    """Client of ``vllm-tensafe key-holder serve`` (stdlib http.client, keep-alive)."""

    kind = "remote"
    # Stay well below the service's request limit; one compute() may span several requests.
    max_request_bytes = 48 << 20

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        ca_file: str | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                f"key holder URL {url!r} is not an http(s) URL with a host",
                "use e.g. https://keyholder.example:8443",
            )
        if not token or any(ch.isspace() for ch in token):
            raise ConfigError(
                "key holder token is empty or contains whitespace",
                "put the bearer token alone in the token file",
            )
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"key holder timeout {timeout!r} must be > 0", "use e.g. 10")
        if retries < 0:
            raise ConfigError(f"key holder retries {retries!r} must be >= 0", "use e.g. 2")
        self.url = url.rstrip("/")
        self._host = parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._base = parsed.path.rstrip("/")
        self._https = parsed.scheme == "https"
        self._token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        elif ca_file:
            log.warning("key holder CA file %s is ignored for a plain http:// URL", ca_file)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    # --- transport -------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            conn: http.client.HTTPConnection
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            conn.connect()
            # One small request per layer per step: Nagle + delayed ACK would add ~40 ms each.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, str, bytes]:
        headers = {"Authorization": f"Bearer {self._token}", "Connection": "keep-alive"}
        if content_type:
            headers["Content-Type"] = content_type
        deadline_note = f"{self.timeout:g}s"
        last: BaseException | None = None
        with self._lock:
            for attempt in range(self.retries + 1):
                try:
                    conn = self._connection()
                    conn.request(method, self._base + path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.will_close:
                        self._drop()
                    return resp.status, resp.getheader("Content-Type", ""), data
                except TimeoutError:
                    # Not retried: a retry could double the wait beyond the caller's timeout.
                    self._drop()
                    raise KeyHolderUnavailableError(
                        f"key holder {self.url} did not answer within {deadline_note}",
                        "check the key holder's health and load, or raise "
                        "TENSAFE_KEY_HOLDER_TIMEOUT",
                    ) from None
                except ssl.SSLError as exc:
                    self._drop()
                    raise KeyHolderUnavailableError(
                        f"TLS with key holder {self.url} failed: {exc}",
                        "check TENSAFE_KEY_HOLDER_CA and the key holder's certificate",
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    # Refused, reset, or a stale keep-alive connection: reconnect and retry.
                    self._drop()
                    last = exc
                    if attempt < self.retries:
                        time.sleep(min(0.05 * (2**attempt), 0.5))
        raise KeyHolderUnavailableError(
            f"key holder {self.url} is unreachable after {self.retries + 1} attempts: "
            f"{type(last).__name__}: {last}",
            "start the key holder (vllm-tensafe key-holder serve) or fix TENSAFE_KEY_HOLDER_URL",
        )

    @staticmethod
    def _error(status: int, data: bytes, url: str) -> KeyHolderError:
        try:
            payload = json.loads(data.decode("utf-8"))
            code = str(payload.get("error", ""))
            cause = str(payload.get("cause", "")) or f"HTTP {status}"
            fix = payload.get("fix")
        except (ValueError, UnicodeDecodeError, AttributeError):
            code, cause, fix = "", f"HTTP {status} from key holder {url}", None
        if status in (401, 403) or code == "unauthorized":
            return KeyHolderAuthError(
                f"key holder {url} refused the host's token: {cause}",
                fix or "put a token the key holder accepts in TENSAFE_KEY_HOLDER_TOKEN_FILE",
            )
        if code == "adapter_revoked":
            return AdapterRevokedError(cause, fix or "ask the adapter owner")
        if code == "budget_exhausted":
            return BudgetExhaustedError(cause, fix or "ask the adapter owner for more budget")
        if code == "foreign_ciphertext":
            return ForeignCiphertextError(cause, fix)
        if status >= 500:
            return KeyHolderUnavailableError(
                f"key holder {url} failed: {cause}", fix or "check the key holder's log"
            )
        return KeyHolderError(f"key holder {url} refused the request: {cause}", fix)

    # --- API -------------------------------------------------------------------------------

    def decrypt(self, adapter_id: str, key_id: str, ciphertexts: list[bytes]) -> list[np.ndarray]:
        check_adapter_id(adapter_id)
        check_key_id(key_id)
        out: list[np.ndarray] = []
        batch: list[bytes] = []
        size = 0
        for blob in ciphertexts:
            if batch and size + len(blob) > self.max_request_bytes:
                out.extend(self._decrypt_batch(adapter_id, key_id, batch))
                batch, size = [], 0
            batch.append(blob)
            size += len(blob) + 4
        if batch:
            out.extend(self._decrypt_batch(adapter_id, key_id, batch))
        return out

    def _decrypt_batch(self, adapter_id: str, key_id: str, batch: list[bytes]) -> list[np.ndarray]:
        body = encode_request(adapter_id, key_id, batch)
        status, ctype, data = self._request("POST", "/v1/decrypt", body, REQUEST_CONTENT_TYPE)
        if status != 200:
            raise self._error(status, data, self.url)
        if not ctype.startswith(RESPONSE_CONTENT_TYPE):
            raise KeyHolderError(
                f"key holder {self.url} answered with content type {ctype!r}",
                "check that the URL points at a vllm-tensafe key holder",
            )
        return decode_response(data, len(batch))

    def _json(self, method: str, path: str) -> dict[str, Any]:
        status, _, data = self._request(method, path)
        if status != 200:
            raise self._error(status, data, self.url)
        try:
            payload = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise KeyHolderError(
                f"key holder {self.url} sent a malformed JSON reply", "check the key holder"
            ) from None
        if not isinstance(payload, dict):
            raise KeyHolderError(f"key holder {self.url} sent unexpected JSON", "check it")
        return payload

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def adapter_status(self, adapter_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/adapters/{quote(check_adapter_id(adapter_id), safe='')}")

    def revoke(self, adapter_id: str) -> dict[str, Any]:
        return self._json(
            "POST", f"/v1/adapters/{quote(check_adapter_id(adapter_id), safe='')}/revoke"
        )

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        return f"RemoteKeyHolder(url={self.url!r})"


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
        return RemoteKeyHolder(
            settings.key_holder_url,
            read_token_file(settings.key_holder_token_file),
            timeout=settings.key_holder_timeout,
            retries=settings.key_holder_retries,
            ca_file=str(settings.key_holder_ca) if settings.key_holder_ca else None,
        )
    raise ConfigError(f"unknown key holder kind {settings.key_holder!r}", "use 'local' or 'remote'")
