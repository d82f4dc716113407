"""Key-holder side: nonces, quote verification and attestation sessions.

The key holder service calls three functions (through routes.py; docs/attestation.md, "What
the key holder and the host do")::

    challenge = verifier.issue_nonce(host, channel=cb)            # POST /v1/attestation/nonce
    session = verifier.verify_and_bind(host, bundle, channel=cb)  # POST /v1/attestation/quote
    verifier.require(host, channel=cb)                            # before every decryption

``host`` is the caller's identity (its token fingerprint, or a host name the service maps the
token to) and ``channel`` the TLS channel binding of the connection where the service has one.
Each refusal is an ``AttestationError`` subclass whose message names the cause and the fix.
Durations use a monotonic clock, injectable so tests never sleep.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from vllm_tensafe.attestation.bundle import QuoteBundle
from vllm_tensafe.attestation.policy import AttestationKey, AttestationPolicy, HostPolicy
from vllm_tensafe.attestation.tpms import (
    DIGEST_SIZES,
    Attest,
    ClockInfo,
    PcrSelection,
    Signature,
    parse_attest,
    parse_signature,
    pcr_digest,
)
from vllm_tensafe.errors import (
    AttestationRequiredError,
    ForeignNonceError,
    MalformedQuoteError,
    NonceError,
    PcrMismatchError,
    QuoteSignatureError,
    QuoteTooOldError,
    ReplayedQuoteError,
    StaleNonceError,
    UnknownAttestationKeyError,
    UnknownHostError,
)

NONCE_BYTES = 32
# Nonces remembered per host (on each connection the newest is the valid one; older ones are
# kept only so that a late or replayed quote is refused with the right reason rather than
# "unknown"). As many as the sessions: every connection of a host may be attesting at once.
NONCES_KEPT_PER_HOST = 64
# Sessions per host: one per TLS connection (each vLLM worker holds its own connection).
SESSIONS_PER_HOST = 64
SIGNATURE_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}

_ATTEST_FIX = (
    "attest first: POST /v1/attestation/nonce, then POST /v1/attestation/quote with the TPM "
    "quote over that nonce (a host with TENSAFE_REQUIRE_ATTESTATION=true does this itself)"
)
_FRESH_NONCE_FIX = "request a fresh nonce (POST /v1/attestation/nonce) and quote it at once"


@dataclass(frozen=True)
class Challenge:
    """A nonce issued to one host, and the PCRs its quote must cover."""

    nonce: bytes
    host: str
    issued_at: float
    expires_at: float
    pcr_bank: str
    pcrs: tuple[int, ...]

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "nonce": self.nonce.hex(),
            "expires_in": max(0.0, round(self.expires_at - now, 3)),
            "pcr_bank": self.pcr_bank,
            "pcrs": list(self.pcrs),
        }


@dataclass(frozen=True)
class Session:
    """A host's right to decryptions, bound to its AK, its token and its TLS channel."""

    host: str
    ak_fingerprint: str
    token_fingerprint: str | None
    channel: bytes | None
    attested_at: float
    expires_at: float
    clock_info: ClockInfo
    pcr_digest: bytes
    pcr_bank: str = "sha256"
    pcr_values: tuple[tuple[int, bytes], ...] = ()

    def expires_in(self, now: float) -> float:
        return self.expires_at - now

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "host": self.host,
            "ak": self.ak_fingerprint,
            "expires_in": max(0.0, round(self.expires_at - now, 3)),
            "channel_bound": self.channel is not None,
        }


@dataclass
class _NonceRecord:
    challenge: Challenge
    channel: bytes | None
    used_at: float | None = None
    superseded: bool = False


@dataclass
class _HostState:
    nonces: collections.deque[_NonceRecord] = field(
        default_factory=lambda: collections.deque(maxlen=NONCES_KEPT_PER_HOST)
    )


def verify_signature(key: AttestationKey, signature: Signature, message: bytes, host: str) -> None:
    """Raise QuoteSignatureError unless ``signature`` by ``key`` covers ``message``."""
    fp = key.fingerprint[:16]
    if signature.hash not in SIGNATURE_HASHES:
        raise QuoteSignatureError(
            f"the quote of host {host!r} is signed with {signature.hash}; accepted: "
            f"{', '.join(SIGNATURE_HASHES)}",
            "quote with tpm2_quote -g sha256",
        )
    algorithm = SIGNATURE_HASHES[signature.hash]()
    public = key.public_key
    try:
        if signature.scheme in ("rsassa", "rsapss") and isinstance(public, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if signature.scheme == "rsassa"
                else padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO)
            )
            public.verify(signature.rsa, message, pad, algorithm)
        elif signature.scheme == "ecdsa" and isinstance(public, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(
                int.from_bytes(signature.ecc_r, "big"), int.from_bytes(signature.ecc_s, "big")
            )
            public.verify(der, message, ec.ECDSA(algorithm))
        else:
            kind = "RSA" if isinstance(public, rsa.RSAPublicKey) else "ECC"
            raise QuoteSignatureError(
                f"the quote of host {host!r} carries an {signature.scheme} signature, but "
                f"attestation key {fp} is an {kind} key",
                "send the signature that the named attestation key made",
            )
    except (InvalidSignature, ValueError):
        raise QuoteSignatureError(
            f"the quote's {signature.scheme}/{signature.hash} signature does not verify under "
            f"attestation key {fp} of host {host!r}: the message or the signature was altered, "
            "or another key signed it",
            "send tpm2_quote's message and signature unchanged, signed by the host's enrolled "
            "AK (TENSAFE_TPM_AK)",
        ) from None


def check_pcrs(
    host: str, policy: HostPolicy, attest: Attest, bundle: QuoteBundle, hash_name: str
) -> None:
    """The quote covers the policy's PCRs, the reported values are the signed ones, and they
    are values the policy accepts."""
    wanted = PcrSelection(policy.pcr_bank, policy.selection)
    if attest.pcr_selection != (wanted,):
        quoted = " ".join(str(sel) for sel in attest.pcr_selection) or "(nothing)"
        raise PcrMismatchError(
            f"the quote of host {host!r} covers PCRs {quoted}; its policy requires {wanted}",
            "quote the PCRs that the nonce reply names (pcr_bank, pcrs)",
        )
    reported = bundle.pcr_values()
    if bundle.pcr_bank != policy.pcr_bank or sorted(reported) != list(policy.selection):
        raise PcrMismatchError(
            f"the bundle of host {host!r} reports PCRs {bundle.pcr_bank}:"
            f"{','.join(str(i) for i in sorted(reported))} but its quote covers {wanted}",
            "send the PCR values tpm2_quote wrote (-o) with the quote",
        )
    size = DIGEST_SIZES[policy.pcr_bank]
    values = [reported[index] for index in policy.selection]
    if any(len(value) != size for value in values):
        raise MalformedQuoteError(
            f"a reported {policy.pcr_bank} PCR value is not {size} bytes",
            "send the PCR values tpm2_quote wrote (-o, -F values) unchanged",
        )
    if len(attest.pcr_digest) != DIGEST_SIZES[hash_name] or (
        pcr_digest(hash_name, values) != attest.pcr_digest
    ):
        raise PcrMismatchError(
            f"the PCR values host {host!r} reports do not hash to the pcrDigest its TPM signed: "
            "they were changed after the quote",
            "send the PCR values tpm2_quote wrote (-o) unchanged",
        )
    wrong = [
        f"PCR {index} is {reported[index].hex()[:16]}…, accepted "
        + " or ".join(f"{v.hex()[:16]}…" for v in sorted(policy.accepted_values(index)))
        for index in policy.selection
        if reported[index] not in policy.accepted_values(index)
    ]
    if wrong:
        raise PcrMismatchError(
            f"host {host!r} booted something its policy does not accept ({policy.pcr_bank}): "
            + "; ".join(wrong),
            "boot the approved image; if this boot is approved, add its PCR values to the "
            "host's policy (vllm-tensafe attestation enrol prints them)",
        )


class AttestationVerifier:
    """Issues nonces, verifies quote bundles against the policy, keeps the sessions."""

    def __init__(
        self, policy: AttestationPolicy, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostState] = {}
        self._nonces: dict[bytes, _NonceRecord] = {}
        self._sessions: dict[tuple[str, bytes | None], Session] = {}

    @property
    def policy(self) -> AttestationPolicy:
        return self._policy

    def replace_policy(self, policy: AttestationPolicy) -> None:
        """Swap the policy; a session whose host, AK or PCRs it no longer accepts ends."""
        with self._lock:
            self._policy = policy

    def now(self) -> float:
        return self._clock()

    # --- nonces ----------------------------------------------------------------------------

    def _host_policy(self, host: str, token_fingerprint: str | None) -> HostPolicy:
        policy = self._policy.host(host)
        if policy is None:
            raise UnknownHostError(
                f"host {host!r} has no entry in the key holder's attestation policy",
                f"add hosts.{host} with its attestation key and PCR values to the policy "
                "(docs/attestation.md, 'Enrolling a host')",
            )
        if policy.tokens and token_fingerprint not in policy.tokens:
            raise UnknownHostError(
                f"token {token_fingerprint or '-'} may not attest as host {host!r} (the host's "
                "policy lists other tokens)",
                f"use the host's own token, or add this token's fingerprint to hosts.{host}.tokens",
            )
        return policy

    def issue_nonce(
        self, host: str, *, channel: bytes | None = None, token_fingerprint: str | None = None
    ) -> Challenge:
        """A fresh single-use nonce for ``host``; it supersedes the host's earlier ones on the
        same channel (another connection of the host, a second vLLM worker, keeps its own)."""
        policy = self._host_policy(host, token_fingerprint)
        now = self.now()
        challenge = Challenge(
            nonce=secrets.token_bytes(NONCE_BYTES),
            host=host,
            issued_at=now,
            expires_at=now + self._policy.nonce_lifetime,
            pcr_bank=policy.pcr_bank,
            pcrs=policy.selection,
        )
        with self._lock:
            state = self._hosts.setdefault(host, _HostState())
            for older in state.nonces:
                if older.channel == channel:
                    older.superseded = True
            if len(state.nonces) == state.nonces.maxlen:
                self._nonces.pop(state.nonces[0].challenge.nonce, None)
            record = _NonceRecord(challenge, channel)
            state.nonces.append(record)
            self._nonces[challenge.nonce] = record
        return challenge

    def _consume_nonce(
        self, host: str, policy: HostPolicy, nonce: bytes, channel: bytes | None
    ) -> Challenge:
        now = self.now()
        shown = nonce.hex()[:16] or "(empty)"
        with self._lock:
            record = self._nonces.get(nonce)
            if record is None:
                raise NonceError(
                    f"the quote's nonce {shown} was not issued by this key holder (or before "
                    "it restarted)",
                    _FRESH_NONCE_FIX,
                )
            issued = record.challenge
            if issued.host != host:
                raise ForeignNonceError(
                    f"the quote's nonce {shown} was issued to host {issued.host!r}, not to "
                    f"{host!r}",
                    "each host quotes the nonce the key holder issued to it",
                )
            if record.channel != channel:
                raise ForeignNonceError(
                    f"the quote's nonce {shown} was issued to host {host!r} on another connection",
                    "request the nonce and send the quote over the same TLS connection",
                )
            if record.used_at is not None:
                raise ReplayedQuoteError(
                    f"the quote's nonce {shown} was already used {now - record.used_at:.1f}s "
                    "ago: a quote is accepted once (replayed quote)",
                    "request a fresh nonce for every attestation",
                )
            if record.superseded:
                raise StaleNonceError(
                    f"the quote's nonce {shown} is stale: a newer nonce was issued to host "
                    f"{host!r} on this connection since",
                    "quote the newest nonce the key holder issued",
                )
            if now > issued.expires_at:
                raise StaleNonceError(
                    f"the quote's nonce {shown} is stale: it expired "
                    f"{now - issued.expires_at:.1f}s ago (nonces live "
                    f"{self._policy.nonce_lifetime:g}s)",
                    _FRESH_NONCE_FIX,
                )
            record.used_at = now
        # The TPM signed the nonce, so the quote cannot be older than the nonce's issue.
        age = now - issued.issued_at
        if age > policy.max_quote_age:
            raise QuoteTooOldError(
                f"the quote of host {host!r} is up to {age:.1f}s old (its nonce was issued "
                f"then); the host's policy accepts quotes up to {policy.max_quote_age:g}s old",
                "quote right after requesting the nonce; if the TPM is this slow, raise the "
                "host's max_quote_age",
            )
        return issued

    # --- quotes ----------------------------------------------------------------------------

    def verify_and_bind(
        self,
        host: str,
        bundle: QuoteBundle | dict[str, Any] | bytes,
        *,
        channel: bytes | None = None,
        token_fingerprint: str | None = None,
    ) -> Session:
        """Verify ``bundle`` for ``host``; on success bind and return its session."""
        policy = self._host_policy(host, token_fingerprint)
        if not isinstance(bundle, QuoteBundle):
            bundle = QuoteBundle.from_json(bundle)
        key = self._accepted_key(host, policy, bundle.ak_public)
        signature = parse_signature(bundle.signature_bytes)
        message = bundle.message_bytes
        # The signature first: nothing in the message means anything until it verifies.
        verify_signature(key, signature, message, host)
        attest = parse_attest(message)
        self._consume_nonce(host, policy, attest.extra_data, channel)
        check_pcrs(host, policy, attest, bundle, signature.hash)
        now = self.now()
        session = Session(
            host=host,
            ak_fingerprint=key.fingerprint,
            token_fingerprint=token_fingerprint,
            channel=channel,
            attested_at=now,
            expires_at=now + policy.session_lifetime,
            clock_info=attest.clock_info,
            pcr_digest=attest.pcr_digest,
            pcr_bank=policy.pcr_bank,
            pcr_values=tuple(sorted(bundle.pcr_values().items())),
        )
        with self._lock:
            self._store_session(session, now)
        return session

    @staticmethod
    def _accepted_key(host: str, policy: HostPolicy, pem: str) -> AttestationKey:
        presented = AttestationKey.from_pem(pem, "the quote bundle")
        key = policy.key(presented.fingerprint)
        if key is None:
            accepted = ", ".join(k.fingerprint[:16] for k in policy.attestation_keys)
            raise UnknownAttestationKeyError(
                f"the quote is signed by attestation key {presented.fingerprint[:16]}, which "
                f"the policy for host {host!r} does not accept (accepted: {accepted})",
                f"enrol the host's AK: add its PEM to hosts.{host}.attestation_keys "
                "(vllm-tensafe attestation enrol prints it), or set TENSAFE_TPM_AK to the "
                "enrolled key",
            )
        return key

    def _store_session(self, session: Session, now: float) -> None:
        for slot, old in list(self._sessions.items()):
            if old.expires_at <= now:
                del self._sessions[slot]
        mine = [slot for slot in self._sessions if slot[0] == session.host]
        if len(mine) >= SESSIONS_PER_HOST and (session.host, session.channel) not in mine:
            oldest = min(mine, key=lambda slot: self._sessions[slot].expires_at)
            del self._sessions[oldest]
        self._sessions[(session.host, session.channel)] = session

    # --- decryptions -----------------------------------------------------------------------

    def require(
        self, host: str, channel: bytes | None = None, *, token_fingerprint: str | None = None
    ) -> Session:
        """The host's valid session on this channel, or AttestationRequiredError."""
        now = self.now()
        with self._lock:
            session = self._sessions.get((host, channel))
            policy = self._policy.host(host)
            other = any(slot[0] == host for slot in self._sessions)
        if policy is None and session is None:
            self._host_policy(host, token_fingerprint)  # raises UnknownHostError
        if session is None:
            where = " on this connection" if other and channel is not None else ""
            raise AttestationRequiredError(
                f"host {host!r} has no attestation session{where}: decryptions need a good "
                "TPM quote first",
                _ATTEST_FIX,
            )
        if now >= session.expires_at:
            raise AttestationRequiredError(
                f"the attestation session of host {host!r} expired "
                f"{now - session.expires_at:.1f}s ago",
                "attest again (the host renews its session before it expires)",
            )
        if policy is None or policy.key(session.ak_fingerprint) is None:
            raise AttestationRequiredError(
                f"the key holder's policy no longer accepts host {host!r} or its attestation "
                f"key {session.ak_fingerprint[:16]}",
                "enrol the host again in the policy, then attest",
            )
        if not _still_accepted(policy, session):
            raise AttestationRequiredError(
                f"the key holder's policy no longer accepts the PCR values host {host!r} "
                "attested with",
                "attest again; the host must boot a state the current policy accepts",
            )
        if session.token_fingerprint is not None and token_fingerprint != session.token_fingerprint:
            raise AttestationRequiredError(
                f"host {host!r} attested with token {session.token_fingerprint}, not "
                f"{token_fingerprint or '-'}",
                "attest with the token that requests the decryptions",
            )
        return session


def _still_accepted(policy: HostPolicy, session: Session) -> bool:
    """The session's attested PCRs still satisfy the (possibly reloaded) policy."""
    values = dict(session.pcr_values)
    return (
        session.pcr_bank == policy.pcr_bank
        and tuple(sorted(values)) == policy.selection
        and all(values[i] in policy.accepted_values(i) for i in policy.selection)
    )
