"""The key holder's attestation routes, independent of the HTTP framework that serves them.

``vllm-tensafe key-holder serve --attestation-policy`` mounts them (vllm_tensafe/he/service:
app.py for the HTTP routes, core.py for the check and the audit, server.py for the TLS channel
binding). The service authenticates the bearer token first, then hands the request here::

    routes = AttestationRoutes.from_policy_file(path)                    # at start-up
    caller = Caller(host_identity(token.fingerprint, token.host),
                    token.fingerprint, channel_binding(ssl_object))
    reply = routes.handle(method, path, caller, body)       # None: not an attestation route
    refused = routes.check(caller)                          # before every decryption

Routes (JSON in, JSON out; both need a decrypt token)::

    POST /v1/attestation/nonce   {}            -> 200 {"nonce", "expires_in", "pcr_bank", "pcrs"}
    POST /v1/attestation/quote   QuoteBundle   -> 200 {"session": {"host", "ak", "expires_in",
                                                                    "channel_bound"}}

A refusal is ``{"error": CODE, "cause": ..., "fix": ...}`` with the status of ``ERROR_CODES``
(400 for a malformed bundle, 403 for every attestation refusal); ``Reply.outcome`` is what the
audit line records ("ok" or the code).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_tensafe.attestation.bundle import MAX_BUNDLE_BYTES
from vllm_tensafe.attestation.policy import AttestationPolicy
from vllm_tensafe.attestation.verifier import AttestationVerifier
from vllm_tensafe.errors import (
    AttestationError,
    AttestationRequiredError,
    ConfigError,
    ForeignNonceError,
    MalformedQuoteError,
    NonceError,
    PcrMismatchError,
    QuoteSignatureError,
    QuoteTooOldError,
    ReplayedQuoteError,
    StaleNonceError,
    TpmError,
    UnknownAttestationKeyError,
    UnknownHostError,
)

log = logging.getLogger("vllm_tensafe.key_holder")

NONCE_PATH = "/v1/attestation/nonce"
QUOTE_PATH = "/v1/attestation/quote"
CONTENT_TYPE = "application/json"

# Most specific first: the first class an error is an instance of gives its status and code.
ERROR_CODES: tuple[tuple[type[AttestationError], int, str], ...] = (
    (MalformedQuoteError, 400, "attestation_malformed"),
    (UnknownHostError, 403, "attestation_unknown_host"),
    (UnknownAttestationKeyError, 403, "attestation_unknown_key"),
    (QuoteSignatureError, 403, "attestation_bad_signature"),
    (StaleNonceError, 403, "attestation_stale_nonce"),
    (ReplayedQuoteError, 403, "attestation_replayed"),
    (ForeignNonceError, 403, "attestation_foreign_nonce"),
    (NonceError, 403, "attestation_unknown_nonce"),
    (QuoteTooOldError, 403, "attestation_quote_too_old"),
    (PcrMismatchError, 403, "attestation_pcr_mismatch"),
    (AttestationRequiredError, 403, "attestation_required"),
    (TpmError, 500, "attestation_tpm"),
    (AttestationError, 403, "attestation_refused"),
)


@dataclass(frozen=True)
class Caller:
    """Who is asking: the policy's host identity, the token, the TLS channel (if known)."""

    host: str
    token_fingerprint: str | None = None
    channel: bytes | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    outcome: str

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")


def describe(policy: AttestationPolicy) -> str:
    """One line for the log: the hosts and what unlisted hosts get."""
    hosts = ", ".join(
        f"{name} ({host.pcr_bank}:{','.join(str(i) for i in host.selection)})"
        for name, host in sorted(policy.hosts.items())
    )
    return f"hosts {hosts}; unlisted hosts: {policy.unlisted_hosts}"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def refusal(exc: AttestationError) -> Reply:
    for cls, status, code in ERROR_CODES:
        if isinstance(exc, cls):
            return Reply(status, {"error": code, "cause": exc.cause, "fix": exc.fix or ""}, code)
    raise AssertionError("AttestationError is the last row")  # pragma: no cover


def host_identity(token_fingerprint: str, host_label: str | None = None) -> str:
    """The policy key of a caller: its token's host label if it has one, else its fingerprint."""
    if host_label and host_label != "-":
        return host_label
    return token_fingerprint


def channel_binding(ssl_object: Any) -> bytes | None:
    """The TLS channel binding of a server-side connection ('tls-unique'), None without TLS.

    Python's ssl offers only 'tls-unique'; under TLS 1.3 it is the connection's first
    Finished message, unique per handshake, which is what binding a session to one
    connection needs (it is not used to authenticate anyone).
    """
    if ssl_object is None:
        return None
    get = getattr(ssl_object, "get_channel_binding", None)
    try:
        value = get("tls-unique") if get is not None else None
    except (ValueError, OSError):
        return None
    return bytes(value) if value else None


class AttestationRoutes:
    """The nonce and quote routes and the check before each decryption, over one verifier.

    Made ``from_policy_file``, the routes re-read the file when it changes (checked on every
    call: one ``stat``), so an owner who withdraws a host or a boot state does not restart
    the key holder; a file that becomes unreadable or invalid keeps the last good policy
    (logged), since losing the file must not open the key holder to unattested hosts.
    """

    def __init__(self, verifier: AttestationVerifier, policy_file: Path | None = None) -> None:
        self.verifier = verifier
        self.policy_file = policy_file
        self._stamp = _stamp(policy_file) if policy_file is not None else None
        self._reload_lock = threading.Lock()

    @classmethod
    def from_policy_file(
        cls, path: str | Path, *, clock: Callable[[], float] = time.monotonic
    ) -> AttestationRoutes:
        path = Path(path)
        return cls(AttestationVerifier(AttestationPolicy.load(path), clock=clock), path)

    def reload(self, path: str | Path) -> None:
        """Re-read the policy file; sessions it no longer covers end at their next check."""
        self.verifier.replace_policy(AttestationPolicy.load(path))

    def refresh(self) -> None:
        """Reload the watched policy file if it changed since the last call."""
        if self.policy_file is None:
            return
        with self._reload_lock:
            stamp = _stamp(self.policy_file)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                policy = AttestationPolicy.load(self.policy_file)
            except ConfigError as exc:
                log.error("%s; keeping the last good attestation policy", exc)
                return
            self.verifier.replace_policy(policy)
            log.info("attestation policy reloaded from %s: %s", self.policy_file, describe(policy))

    def handle(self, method: str, path: str, caller: Caller, body: bytes) -> Reply | None:
        """Answer an attestation route; None when ``path`` is not one."""
        if path not in (NONCE_PATH, QUOTE_PATH):
            return None
        self.refresh()
        if method != "POST":
            return Reply(
                405,
                {"error": "method_not_allowed", "cause": f"{method} {path}", "fix": "use POST"},
                "method_not_allowed",
            )
        return self.nonce(caller) if path == NONCE_PATH else self.quote(caller, body)

    def nonce(self, caller: Caller) -> Reply:
        try:
            challenge = self.verifier.issue_nonce(
                caller.host, channel=caller.channel, token_fingerprint=caller.token_fingerprint
            )
        except AttestationError as exc:
            return refusal(exc)
        return Reply(200, challenge.to_json(self.verifier.now()), "ok")

    def quote(self, caller: Caller, body: bytes) -> Reply:
        try:
            if len(body) > MAX_BUNDLE_BYTES:
                raise MalformedQuoteError(
                    f"quote bundle of {len(body)} bytes exceeds {MAX_BUNDLE_BYTES}",
                    "send the bundle that TpmQuoter.quote() builds",
                )
            session = self.verifier.verify_and_bind(
                caller.host,
                body,
                channel=caller.channel,
                token_fingerprint=caller.token_fingerprint,
            )
        except AttestationError as exc:
            return refusal(exc)
        return Reply(200, {"session": session.to_json(self.verifier.now())}, "ok")

    def exempt(self, caller: Caller) -> bool:
        """The caller's host has no entry and the policy lets such hosts decrypt unattested."""
        policy = self.verifier.policy
        return policy.unlisted_hosts == "allow" and policy.host(caller.host) is None

    def check(self, caller: Caller) -> Reply | None:
        """None when the caller may decrypt; else the 403 reply to send instead."""
        self.refresh()
        if self.exempt(caller):
            return None
        try:
            self.verifier.require(
                caller.host, caller.channel, token_fingerprint=caller.token_fingerprint
            )
        except AttestationError as exc:
            return refusal(exc)
        return None
