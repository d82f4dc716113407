"""The host's side of the remote key holder: ``RemoteKeyHolder`` and the start-up check.

``RemoteKeyHolder`` is the client of ``vllm-tensafe key-holder serve`` (stdlib http.client,
one keep-alive connection, TLS verified against ``TENSAFE_KEY_HOLDER_CA``, optional client
certificate). It never sends its bearer token over plain HTTP to anything but loopback.

Every failure becomes the error that names its cause: a refused token (KeyHolderAuthError), a
refusal by the key holder's policy (KeyHolderForbiddenError), a revoked adapter
(AdapterRevokedError), an exhausted budget (BudgetExhaustedError), a key holder that is down,
shutting down, busy, or whose certificate the host cannot trust (KeyHolderUnavailableError,
with the CA or the subjectAltName named), a key holder of another protocol version
(ProtocolVersionError).

With ``require_attestation`` (``from_settings`` gives it an ``Attester``) the client proves
the host's boot state to a key holder started with ``--attestation-policy``: it attests with a
TPM quote on its first decrypt or check request, over the connection that request uses (the
key holder binds the session to that TLS channel), renews the session on the same connection,
attests again after opening a new connection, and once more when the key holder answers 403
``attestation_required``; any refusal of the quote is the verifier's typed error
(docs/attestation.md).

``check_key_holder(settings, packages)`` runs all of that once before vLLM loads the model:
health, protocol version, TLS (CA and subjectAltName), with ``require_attestation`` the
attestation, the token, and for each package that the key holder holds its key and accepts
the package, so a misconfigured host refuses to start with the precise cause instead of
failing at the first request.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

import numpy as np

from vllm_tensafe.errors import (
    AdapterRevokedError,
    AttestationError,
    AttestationRequiredError,
    BudgetExhaustedError,
    ConfigError,
    ForeignCiphertextError,
    KeyHolderAuthError,
    KeyHolderError,
    KeyHolderForbiddenError,
    KeyHolderUnavailableError,
    ProtocolVersionError,
    TenSafeError,
)
from vllm_tensafe.keyholder.local import KeyHolder
from vllm_tensafe.keyholder.wire import (
    PROTOCOL_VERSION,
    REQUEST_CONTENT_TYPE,
    RESPONSE_CONTENT_TYPE,
    AdapterRef,
    decode_response,
    encode_request,
)
from vllm_tensafe.tssp.manifest import NAME_RULE, is_adapter_name

if TYPE_CHECKING:
    from vllm_tensafe.attestation.client import Attester, Grant
    from vllm_tensafe.settings import TenSafeSettings

log = logging.getLogger(__name__)

_FIX_CERT = (
    "the key holder's certificate must be signed by the CA in TENSAFE_KEY_HOLDER_CA "
    "(--tensafe-key-holder-ca) and list the URL's host in its subjectAltName; "
    "`vllm-tensafe key-holder cert --host HOST` makes such a pair (docs/key-holder.md)"
)


def is_loopback_host(host: str) -> bool:
    from vllm_tensafe.keyholder.server.tls import is_loopback

    return is_loopback(host)


class RemoteKeyHolder(KeyHolder):
    """Client of ``vllm-tensafe key-holder serve``."""

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
        ca_file: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        attester: Attester | None = None,
    ) -> None:
        """``attester``: prove the host's boot state with a TPM quote over this client's own
        connection before its first decryption, on renewal and after a new connection
        (``require_attestation``; ``from_settings`` makes it)."""
        parsed = urlparse(url)
        try:
            port = parsed.port
        except ValueError:
            port, parsed = None, parsed._replace(scheme="")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                f"key holder URL {url!r} is not an http(s) URL with a host",
                "use e.g. https://keyholder.example:8443",
            )
        if parsed.scheme == "http" and not is_loopback_host(parsed.hostname):
            raise ConfigError(
                f"key holder URL {url!r} is plain HTTP to {parsed.hostname}, which is not "
                "loopback: the host's token and the masked deltas would cross the network in "
                "clear",
                "use https:// (the key holder serves TLS with --tls-cert; vllm-tensafe "
                "key-holder cert makes a certificate) and set TENSAFE_KEY_HOLDER_CA",
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
        if (client_cert is None) != (client_key is None):
            raise ConfigError(
                "a client certificate needs its key (and the reverse)",
                "set both --tensafe-key-holder-client-cert and --tensafe-key-holder-client-key",
            )
        self.url = url.rstrip("/")
        self._host = parsed.hostname
        self._port = port or (443 if parsed.scheme == "https" else 80)
        self._base = parsed.path.rstrip("/")
        self._https = parsed.scheme == "https"
        self._token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.ca_file = os.fspath(ca_file) if ca_file is not None else None
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            try:
                self._ssl = ssl.create_default_context(cafile=self.ca_file)
                if client_cert is not None and client_key is not None:
                    self._ssl.load_cert_chain(os.fspath(client_cert), os.fspath(client_key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the key holder's CA {self.ca_file!r} or the client "
                    f"certificate {client_cert!r}: {exc}",
                    "pass PEM files (vllm-tensafe key-holder cert writes ca.pem and "
                    "client-NAME.pem/.key)",
                ) from None
        elif ca_file or client_cert:
            log.warning("key holder CA / client certificate are ignored for a plain http:// URL")
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self.attester = attester
        if attester is not None:
            attester.url = f"key holder {self.url}"
        self._fresh = False  # a connection no request has used yet (attestation resets)

    @classmethod
    def from_settings(cls, settings: TenSafeSettings) -> RemoteKeyHolder:
        """The client the settings describe; with require_attestation it attests (its TPM is
        checked here: no TPM raises TpmError)."""
        from vllm_tensafe.keyholder.server.tokens import read_token_file

        if not settings.key_holder_url or settings.key_holder_token_file is None:
            raise ConfigError(
                "key_holder is 'remote' but the URL or token file is missing",
                "set TENSAFE_KEY_HOLDER_URL and TENSAFE_KEY_HOLDER_TOKEN_FILE",
            )
        attester = None
        if settings.require_attestation:
            from vllm_tensafe.attestation.client import Attester, quoter_from_settings

            attester = Attester(quoter_from_settings(settings))
        return cls(
            settings.key_holder_url,
            read_token_file(settings.key_holder_token_file),
            timeout=settings.key_holder_timeout,
            retries=settings.key_holder_retries,
            ca_file=str(settings.key_holder_ca) if settings.key_holder_ca else None,
            client_cert=settings.key_holder_client_cert,
            client_key=settings.key_holder_client_key,
            attester=attester,
        )

    # --- transport ---------------------------------------------------------------------------

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
            self._fresh = True
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _tls_error(self, exc: ssl.SSLError) -> KeyHolderError | None:
        """The error for a TLS failure that retrying cannot fix, or None (a connection loss)."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or str(exc)
            # X509_V_ERR_HOSTNAME_MISMATCH (62), _EMAIL_ (63), _IP_ADDRESS_MISMATCH (64)
            if exc.verify_code in (62, 63, 64) or "mismatch" in reason.lower():
                cause = (
                    f"the key holder's certificate does not name {self._host} in its "
                    f"subjectAltName ({reason})"
                )
            else:
                trusted = self.ca_file or "the system CAs (TENSAFE_KEY_HOLDER_CA is not set)"
                cause = f"the key holder's certificate is not trusted by {trusted} ({reason})"
            return KeyHolderUnavailableError(
                f"TLS with key holder {self.url} failed: {cause}", _FIX_CERT
            )
        reason = (exc.reason or "").upper()
        if "WRONG_VERSION_NUMBER" in reason or "HTTP_REQUEST" in reason:
            return KeyHolderUnavailableError(
                f"key holder {self.url} does not speak TLS on port {self._port}",
                "use http:// only for a loopback key holder started without --tls-cert; "
                "otherwise check the port",
            )
        if "ALERT" in reason and any(
            word in reason for word in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")
        ):
            return KeyHolderAuthError(
                f"key holder {self.url} refused the host's client certificate ({exc.reason})",
                "set --tensafe-key-holder-client-cert/-key to a certificate signed by the key "
                "holder's --client-ca (vllm-tensafe key-holder cert --client NAME makes one)",
            )
        return None

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        *,
        attested: bool = False,
    ) -> tuple[int, str, bytes]:
        """One request, retried after a connection failure. ``attested``: a route the key
        holder serves only to an attested host, so with an attester the host attests on
        this connection first (and once more if the key holder says the session is gone)."""
        attester = self.attester if attested else None
        with self._lock:
            status, ctype, data = self._with_retries(
                lambda conn: self._exchange(conn, method, path, body, content_type, attester)
            )
            if attester is not None and status == 403 and _error_code(data) == _SESSION_GONE:
                # Expired, ended by a policy reload, or lost with a key-holder restart: the
                # key holder said why; attest once more, then the answer stands.
                log.info("key holder %s: %s; attesting again", self.url, _error_cause(data))
                attester.invalidate()
                status, ctype, data = self._with_retries(
                    lambda conn: self._exchange(conn, method, path, body, content_type, attester)
                )
            return status, ctype, data

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
        attester: Attester | None,
    ) -> tuple[int, str, bytes]:
        self._attest_on(conn, attester)
        return self._send(conn, method, path, body, content_type)

    def _attest_on(self, conn: http.client.HTTPConnection, attester: Attester | None) -> None:
        """Before a request on ``conn``: forget a session of an earlier connection, and with
        ``attester`` attest on this one unless its session is valid and not due for renewal."""
        if self._fresh:
            self._fresh = False
            if self.attester is not None:
                self.attester.connection_reset()  # a channel-bound session stays behind
        if attester is not None:
            attester.ensure(lambda p, payload: self._attestation_post(conn, p, payload))

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
    ) -> tuple[int, str, bytes]:
        if self._conn is not conn:
            # The key holder closed the connection (Connection: close) since this exchange
            # began: http.client would reopen it silently, on another TLS channel.
            raise ConnectionResetError("the key holder closed the connection")
        headers = {"Authorization": f"Bearer {self._token}", "Connection": "keep-alive"}
        if content_type:
            headers["Content-Type"] = content_type
        conn.request(method, self._base + path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self._drop()
        return resp.status, resp.getheader("Content-Type", ""), data

    def _attestation_post(
        self, conn: http.client.HTTPConnection, path: str, payload: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """``post`` for the Attester: the nonce and the quote go over ``conn``, the connection
        the decryption will use (the key holder binds the session to its TLS channel)."""
        status, _, data = self._send(conn, "POST", path, json.dumps(payload).encode(), _JSON)
        code = _error_code(data)
        if status != 200 and status != 404 and not code.startswith("attestation_"):
            raise self._error(status, data)  # 401, 503 busy, ...: the key holder's own errors
        try:
            reply = json.loads(data.decode("utf-8")) if data else {}
        except (ValueError, UnicodeDecodeError):
            reply = {}
        return status, reply if isinstance(reply, dict) else {}

    def _with_retries(
        self, exchange: Callable[[http.client.HTTPConnection], tuple[int, str, bytes]]
    ) -> tuple[int, str, bytes]:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                return exchange(self._connection())
            except TimeoutError:
                # Not retried: a retry could double the wait beyond the caller's timeout.
                self._drop()
                raise KeyHolderUnavailableError(
                    f"key holder {self.url} did not answer within {self.timeout:g}s",
                    "check the key holder's health and load, or raise TENSAFE_KEY_HOLDER_TIMEOUT",
                ) from None
            except ssl.SSLError as exc:
                self._drop()
                error = self._tls_error(exc)
                if error is not None:
                    raise error from None
                last = exc  # the peer closed mid-handshake or mid-record: retry
            except (OSError, http.client.HTTPException) as exc:
                # Refused, reset, or a stale keep-alive connection: reconnect and retry.
                self._drop()
                last = exc
            if attempt < self.retries:
                time.sleep(min(0.05 * (2**attempt), 0.5))
        hint = (
            " (if the key holder serves TLS, the URL must start with https://)"
            if not self._https
            else ""
        )
        raise KeyHolderUnavailableError(
            f"key holder {self.url} is unreachable after {self.retries + 1} attempts: "
            f"{type(last).__name__}: {last}{hint}",
            "start the key holder (vllm-tensafe key-holder serve) or fix TENSAFE_KEY_HOLDER_URL",
        )

    def attest(self) -> Grant:
        """Attest now over this client's connection (the start-up check; renewal and first
        attestation otherwise happen on their own). Raises the refusal's typed error."""
        attester = self.attester
        if attester is None:
            raise ConfigError(
                f"{self!r} has no attester: require_attestation is off",
                "set --tensafe-require-attestation true and --tensafe-tpm-ak",
            )
        with self._lock:
            attester.invalidate()

            def exchange(conn: http.client.HTTPConnection) -> tuple[int, str, bytes]:
                self._attest_on(conn, attester)
                return 200, "", b""

            self._with_retries(exchange)
        grant = attester.grant
        assert grant is not None
        return grant

    def _attestation_error(
        self, status: int, code: str, cause: str, fix: str | None
    ) -> TenSafeError:
        from vllm_tensafe.attestation.client import error_from_reply

        if code == _SESSION_GONE and self.attester is None:
            # The key holder asks for attestation and this host was not configured to.
            return AttestationRequiredError(
                f"key holder {self.url} decrypts only for attested hosts: {cause}",
                "start this host with --tensafe-require-attestation true and its TPM "
                "attestation key (--tensafe-tpm-ak; docs/attestation.md), enrolled in the key "
                "holder's attestation policy",
            )
        payload = {"error": code, "cause": cause, "fix": fix or ""}
        return error_from_reply(status, payload, f"key holder {self.url}")

    def _error(self, status: int, data: bytes) -> TenSafeError:
        try:
            payload = json.loads(data.decode("utf-8"))
            code = str(payload.get("error", ""))
            cause = str(payload.get("cause", "")) or f"HTTP {status}"
            fix = payload.get("fix") or None
        except (ValueError, UnicodeDecodeError, AttributeError):
            code, cause, fix = "", f"HTTP {status}", None
        url = self.url
        if code.startswith("attestation_"):
            return self._attestation_error(status, code, cause, fix)
        if status == 401 or code == "unauthorized":
            return KeyHolderAuthError(
                f"key holder {url} refused the host's token: {cause}",
                "put a token the key holder accepts in TENSAFE_KEY_HOLDER_TOKEN_FILE",
            )
        if code == "client_certificate_required":
            return KeyHolderAuthError(f"key holder {url}: {cause}", fix)
        if code == "adapter_revoked":
            return AdapterRevokedError(cause, fix or "ask the adapter owner")
        if code == "budget_exhausted":
            return BudgetExhaustedError(cause, fix or "ask the adapter owner for more budget")
        if code == "foreign_ciphertext":
            return ForeignCiphertextError(cause, fix)
        if code == "protocol_version":
            return ProtocolVersionError(f"key holder {url}: {cause}", fix)
        if "vnd.tensafe.decrypt-v1" in f"{cause} {fix}":  # an old key holder's 415
            return ProtocolVersionError(
                f"key holder {url} speaks key-holder protocol v1; this host speaks "
                f"v{PROTOCOL_VERSION}",
                "run the same vllm-tensafe release on the host and the key holder",
            )
        if status in (403, 404, 409):
            return KeyHolderForbiddenError(f"key holder {url} refused: {cause}", fix)
        if code == "shutting_down":
            return KeyHolderUnavailableError(
                f"key holder {url} is shutting down", "retry once it is back (it was stopped)"
            )
        if status >= 500 or code in ("busy", "timeout"):
            return KeyHolderUnavailableError(
                f"key holder {url} could not answer: {cause}", fix or "check the key holder's log"
            )
        return KeyHolderError(f"key holder {url} refused the request: {cause}", fix)

    # --- decryption --------------------------------------------------------------------------

    def decrypt(
        self, ref: AdapterRef, ciphertexts: Sequence[bytes | memoryview]
    ) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        batch: list[bytes | memoryview] = []
        size = 0
        for blob in ciphertexts:
            if batch and size + len(blob) > self.max_request_bytes:
                out.extend(self._decrypt_batch(ref, batch))
                batch, size = [], 0
            batch.append(blob)
            size += len(blob) + 4
        if batch:
            out.extend(self._decrypt_batch(ref, batch))
        return out

    def _decrypt_batch(self, ref: AdapterRef, batch: list[bytes | memoryview]) -> list[np.ndarray]:
        body = encode_request(ref, batch)
        status, ctype, data = self._request(
            "POST", "/v1/decrypt", body, REQUEST_CONTENT_TYPE, attested=True
        )
        if status != 200:
            raise self._error(status, data)
        if not ctype.startswith(RESPONSE_CONTENT_TYPE):
            if ctype.startswith("application/vnd.tensafe.values-v1"):
                raise ProtocolVersionError(
                    f"key holder {self.url} speaks key-holder protocol v1; this host speaks "
                    f"v{PROTOCOL_VERSION}",
                    "run the same vllm-tensafe release on the host and the key holder",
                )
            raise KeyHolderError(
                f"key holder {self.url} answered with content type {ctype!r}",
                "check that the URL points at a vllm-tensafe key holder of this version",
            )
        return decode_response(data, len(batch))

    # --- JSON routes -------------------------------------------------------------------------

    def _json(
        self, method: str, path: str, payload: Any = None, *, attested: bool = False
    ) -> dict[str, Any]:
        body = json.dumps(payload).encode() if payload is not None else None
        status, _, data = self._request(
            method, path, body, _JSON if body is not None else None, attested=attested
        )
        if status != 200:
            raise self._error(status, data)
        try:
            reply = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise KeyHolderError(
                f"key holder {self.url} sent a malformed JSON reply",
                "check that the URL points at a vllm-tensafe key holder",
            ) from None
        if not isinstance(reply, dict):
            raise KeyHolderError(f"key holder {self.url} sent unexpected JSON", "check the URL")
        return reply

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def check(self, ref: AdapterRef) -> dict[str, Any]:
        return self._json(
            "POST",
            "/v1/check",
            {"adapter": ref.name, "key_id": ref.key_id, "manifest_digest": ref.manifest_digest},
            attested=True,
        )

    def adapters(self) -> dict[str, Any]:
        return self._json("GET", "/v1/adapters")

    def adapter_status(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/adapters/{_name_path(name)}")

    def revoke(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/adapters/{_name_path(name)}/revoke")

    def unrevoke(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/adapters/{_name_path(name)}/unrevoke")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        return f"RemoteKeyHolder(url={self.url!r})"


_JSON = "application/json"
# The refusal after which a host attests once more: its session is missing or over.
_SESSION_GONE = "attestation_required"


def _error_body(data: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _error_code(data: bytes) -> str:
    return str(_error_body(data).get("error", ""))


def _error_cause(data: bytes) -> str:
    return str(_error_body(data).get("cause", ""))


def _name_path(name: str) -> str:
    if not is_adapter_name(name):
        raise ConfigError(f"{name[:140]!r} is not an adapter name", f"use {NAME_RULE}")
    return quote(name, safe="")


# --- start-up check ----------------------------------------------------------------------------


def check_key_holder(settings: TenSafeSettings, packages: Iterable[str]) -> dict[str, Any]:
    """Refuse to start unless the remote key holder is reachable, trusted, of this protocol
    version, accepts the host's token, and accepts every given ``.tssp`` package.

    Raises the TenSafeError that names the cause; returns the key holder's health.
    """
    from vllm_tensafe.keyholder import key_holder_from_settings
    from vllm_tensafe.tssp.opener import read_manifest_digest

    packages = list(packages)
    holder = key_holder_from_settings(settings)  # with require_attestation: TpmError, no TPM
    assert isinstance(holder, RemoteKeyHolder)
    try:
        health = holder.health()
        version = health.get("protocol_version")
        if version != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"key holder {holder.url} speaks protocol version {version}; this host speaks "
                f"version {PROTOCOL_VERSION}",
                "run the same vllm-tensafe version on the host and the key holder",
            )
        if settings.require_attestation:
            attest_at_startup(holder, health)
        held = set(health.get("key_ids") or [])
        for path in packages:
            if not str(path).endswith(".tssp"):
                continue
            name, key_id, digest = read_manifest_digest(path)
            if key_id not in held:
                raise KeyHolderForbiddenError(
                    f"package {path} (adapter {name!r}) is encrypted under CKKS key "
                    f"{key_id[:16]}, which key holder {holder.url} does not hold (it holds "
                    f"{', '.join(k[:16] for k in sorted(held)) or 'none'})",
                    "point TENSAFE_KEY_HOLDER_URL at the key holder of this adapter's owner, or "
                    "give that key holder this key's PREFIX.secret (--he-secret)",
                )
            try:
                holder.check(AdapterRef(name, key_id, digest))
            except KeyHolderError as exc:
                raise type(exc)(f"package {path}: {exc.cause}", exc.fix) from None
        log.info(
            "key holder %s is reachable (protocol %s, keys %s) and accepts %s",
            holder.url,
            version,
            ", ".join(k[:16] for k in sorted(held)),
            "the packages" if packages else "the host's TLS and URL",
        )
        return health
    finally:
        holder.close()


def attest_at_startup(holder: RemoteKeyHolder, health: dict[str, Any]) -> Grant:
    """require_attestation: the key holder checks quotes, and accepts this host's."""
    from vllm_tensafe.attestation.client import mark_attested

    if not health.get("attestation"):
        raise AttestationError(
            f"key holder {holder.url} does not check TPM attestation (it was started without "
            "--attestation-policy), so require_attestation cannot be met",
            "start the key holder with --attestation-policy FILE (docs/attestation.md), or "
            "turn require_attestation off on this host",
        )
    grant = holder.attest()  # logs the session it got
    mark_attested()
    return grant
