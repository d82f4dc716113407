"""Host side of the attestation exchange: ``attest()``, ``Attester`` and the start-up gate.

The key-holder client (``RemoteKeyHolder``, vllm_tensafe/he/remote.py) owns the transport;
this module needs only a ``post(path, json) -> (status, json)`` function over the client's
own connection (the key holder binds the session to that connection's TLS channel). The
client does::

    attester = Attester(quoter_from_settings(settings))    # when require_attestation is on
    attester.ensure(post)               # before each decrypt: attests first, renews near expiry
    if is_attestation_refusal(status, payload):            # a 403 "attestation_required"
        attester.invalidate(); attester.ensure(post)       # then retry the request once
    attester.connection_reset()         # when the client opened a new connection

``startup_gate(settings)`` runs the key-holder start-up check (``check_key_holder``, which
attests) once per process: a host without a TPM, or one the key holder refuses, never starts
serving. Nothing is ever pretended: every failure raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_tensafe.attestation.routes import ERROR_CODES, NONCE_PATH, QUOTE_PATH
from vllm_tensafe.attestation.tpm import TpmQuoter, TpmTools
from vllm_tensafe.errors import (
    AttestationError,
    ConfigError,
    MalformedQuoteError,
    StaleNonceError,
    TpmError,
)

if TYPE_CHECKING:
    from vllm_tensafe.settings import TenSafeSettings

logger = logging.getLogger("vllm_tensafe.attestation")

PostJson = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]
# Renew when this fraction of the session's lifetime is left: a renewal then never races
# the expiry, even with a slow TPM.
RENEW_AT_REMAINING = 0.2
_CODES = {code: cls for cls, _, code in ERROR_CODES}


@dataclass(frozen=True)
class Grant:
    """The key holder's answer to a good quote."""

    host: str
    ak: str
    expires_in: float
    channel_bound: bool


def error_from_reply(
    status: int, payload: dict[str, Any], url: str = "the key holder"
) -> AttestationError:
    """The typed error for a refused attestation request (the key holder's cause and fix)."""
    code = str(payload.get("error", ""))
    cause = str(payload.get("cause", "")) or f"HTTP {status}"
    fix = str(payload.get("fix", "")) or None
    if status == 404:
        return AttestationError(
            f"{url} does not offer attestation (no route {NONCE_PATH})",
            "run a key holder with an attestation policy (docs/attestation.md), or turn "
            "require_attestation off",
        )
    cls = _CODES.get(code)
    if cls is not None:
        return cls(f"{url} refused the attestation: {cause}", fix)
    return AttestationError(f"{url} refused the attestation: {cause}", fix or "see its log")


def is_attestation_refusal(status: int, payload: dict[str, Any]) -> bool:
    """A decrypt answered 403 because the host's session is missing or expired."""
    return status == 403 and payload.get("error") == "attestation_required"


def _challenge(payload: dict[str, Any]) -> tuple[bytes, str, list[int]]:
    try:
        nonce = bytes.fromhex(str(payload["nonce"]))
        bank = str(payload["pcr_bank"])
        pcrs = [int(i) for i in payload["pcrs"]]
    except (KeyError, TypeError, ValueError):
        raise MalformedQuoteError(
            "the key holder's nonce reply lacks nonce, pcr_bank or pcrs",
            "check that the URL points at a vllm-tensafe key holder",
        ) from None
    if not 16 <= len(nonce) <= 64:
        raise MalformedQuoteError(
            f"the key holder's nonce is {len(nonce)} bytes; 16 to 64 are expected",
            "check that the URL points at a vllm-tensafe key holder",
        )
    return nonce, bank, pcrs


def attest(post: PostJson, quoter: TpmQuoter, *, url: str = "the key holder") -> Grant:
    """One attestation: a nonce from the key holder, a TPM quote over it, the verdict."""
    status, payload = post(NONCE_PATH, {})
    if status != 200:
        raise error_from_reply(status, payload, url)
    nonce, bank, pcrs = _challenge(payload)
    try:
        bundle = quoter.quote(nonce, bank, pcrs)
    except OSError as exc:  # the quote's scratch files; not a connection failure
        raise TpmError(
            f"quoting with the TPM failed: {exc}", "check the host's temporary folder"
        ) from None
    status, payload = post(QUOTE_PATH, bundle.to_json())
    if status != 200:
        raise error_from_reply(status, payload, url)
    session = payload.get("session")
    if not isinstance(session, dict):
        raise MalformedQuoteError(
            "the key holder accepted the quote but sent no session", "check the key holder"
        )
    try:
        grant = Grant(
            host=str(session["host"]),
            ak=str(session["ak"]),
            expires_in=float(session["expires_in"]),
            channel_bound=bool(session.get("channel_bound", False)),
        )
    except (KeyError, TypeError, ValueError):
        raise MalformedQuoteError(
            "the key holder's session reply lacks host, ak or expires_in", "check it"
        ) from None
    logger.info(
        "attested to %s as host %s (AK %s, PCRs %s:%s), session for %.0fs%s",
        url,
        grant.host,
        grant.ak[:16],
        bank,
        ",".join(str(i) for i in pcrs),
        grant.expires_in,
        ", bound to this TLS connection" if grant.channel_bound else "",
    )
    return grant


class Attester:
    """Keeps one connection's attestation session: first attestation, renewal, re-attestation."""

    def __init__(
        self,
        quoter: TpmQuoter,
        *,
        url: str = "the key holder",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quoter = quoter
        self.url = url
        self._clock = clock
        self._grant: Grant | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()

    @property
    def grant(self) -> Grant | None:
        return self._grant

    def ensure(self, post: PostJson) -> Grant:
        """Attest now if there is no session or it is due for renewal; else do nothing."""
        with self._lock:
            if self._grant is None or self._clock() >= self._renew_at:
                self._attest(post)
            assert self._grant is not None
            return self._grant

    def _attest(self, post: PostJson) -> None:
        start = self._clock()
        try:
            grant = attest(post, self.quoter, url=self.url)
        except StaleNonceError:
            # Without TLS every connection of a host shares one channel, so another worker's
            # nonce can supersede this one between nonce and quote: once more, then give up.
            logger.info("nonce superseded during attestation to %s; attesting once more", self.url)
            start = self._clock()
            grant = attest(post, self.quoter, url=self.url)
        self._grant = grant
        self._renew_at = start + grant.expires_in * (1 - RENEW_AT_REMAINING)

    def invalidate(self) -> None:
        """Forget the session (the key holder said it is gone): the next ensure() attests."""
        with self._lock:
            self._grant = None

    def connection_reset(self) -> None:
        """The client opened a new connection: a channel-bound session does not carry over."""
        with self._lock:
            if self._grant is not None and self._grant.channel_bound:
                self._grant = None


# --- the start-up gate -------------------------------------------------------------------------


def quoter_from_settings(settings: TenSafeSettings) -> TpmQuoter:
    """The TPM quoter the settings name; raises TpmError when the TPM cannot be used."""
    if not settings.tpm_ak:
        raise ConfigError(
            "require_attestation is on but no attestation key is set",
            "enrol the host (vllm-tensafe attestation enrol) and set TENSAFE_TPM_AK",
        )
    tools = TpmTools(settings.tpm_tcti)
    tools.check_device()
    return TpmQuoter(tools, settings.tpm_ak)


_gate_lock = threading.Lock()
_gate_passed = False


def mark_attested() -> None:
    """The start-up check attested this process's host (``check_key_holder`` calls it)."""
    global _gate_passed
    _gate_passed = True


def startup_gate(settings: TenSafeSettings) -> None:
    """With require_attestation: the key-holder start-up check, attestation included, once
    per process (the Python API reaches here without ``vllm serve``'s start-up check)."""
    if not settings.require_attestation:
        return
    with _gate_lock:
        if _gate_passed:
            return
        from vllm_tensafe.keyholder.remote import check_key_holder

        check_key_holder(settings, [])
