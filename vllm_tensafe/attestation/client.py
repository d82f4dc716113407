"""Host side of the attestation exchange: ``attest()``, ``Attester`` and the start-up check.

The key-holder client owns the transport; this module needs only a ``post(path, json) ->
(status, json)`` function over the client's own connection (the key holder binds the session
to that connection's TLS channel). The client calls::

    attester = Attester(quoter_from_settings(settings))    # when require_attestation is on
    attester.ensure(post)               # before each decrypt: attests first, renews near expiry
    if is_attestation_refusal(status, payload):            # a 403 "attestation_required"
        attester.invalidate(); attester.ensure(post)       # then retry the request once
    attester.connection_reset()         # when the client opened a new connection

``check_at_startup(settings)`` is the start-up gate: it quotes the TPM and has the key holder
verify the quote over a connection of its own, so a host without a TPM, or one the key holder
refuses, never starts serving. Nothing is ever pretended: every failure raises.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from vllm_tensafe.attestation.routes import ERROR_CODES, NONCE_PATH, QUOTE_PATH
from vllm_tensafe.attestation.tpm import TpmQuoter, TpmTools
from vllm_tensafe.errors import AttestationError, ConfigError, MalformedQuoteError

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
) -> Exception:
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
    bundle = quoter.quote(nonce, bank, pcrs)
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


class JsonPoster:
    """A small JSON-over-HTTP(S) client with the host's bearer token (one connection)."""

    def __init__(
        self, url: str, token: str, *, ca_file: str | None = None, timeout: float = 30.0
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"key holder URL {url!r} is not an http(s) URL", "fix it")
        self.url = url.rstrip("/")
        self._base = parsed.path.rstrip("/")
        self._token = token
        conn: http.client.HTTPConnection
        if parsed.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file)
            conn = http.client.HTTPSConnection(
                parsed.hostname, parsed.port or 443, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
        self._conn = conn

    def __call__(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from vllm_tensafe.errors import KeyHolderUnavailableError

        body = json.dumps(payload).encode("utf-8")
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Content-Type": "application/json",
        }
        try:
            self._conn.request("POST", self._base + path, body=body, headers=headers)
            resp = self._conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise KeyHolderUnavailableError(
                f"key holder {self.url} is unreachable for attestation: {type(exc).__name__}: "
                f"{exc}",
                "start the key holder or fix TENSAFE_KEY_HOLDER_URL / TENSAFE_KEY_HOLDER_CA",
            ) from None
        try:
            parsed = json.loads(data.decode("utf-8")) if data else {}
        except (UnicodeDecodeError, ValueError):
            parsed = {}
        return resp.status, parsed if isinstance(parsed, dict) else {}

    def close(self) -> None:
        self._conn.close()


def _read_token(path: Path) -> str:
    # The same rule as the key-holder client's token file: exactly one token.
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"key holder token file {str(path)!r} cannot be read: {exc}",
            "set TENSAFE_KEY_HOLDER_TOKEN_FILE to a readable file holding the token",
        ) from None
    tokens = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(tokens) != 1:
        raise ConfigError(
            f"key holder token file {str(path)!r} holds {len(tokens)} tokens, expected 1",
            "put exactly one bearer token in the file",
        )
    return tokens[0]


def check_at_startup(settings: TenSafeSettings) -> Grant | None:
    """With require_attestation: quote the TPM and have the key holder accept it, or raise.

    Returns None when attestation is not required. The session made here belongs to this
    check's own connection; the key-holder client attests again on its first request.
    """
    if not settings.require_attestation:
        return None
    if settings.key_holder != "remote" or not settings.key_holder_url:
        raise ConfigError(
            "require_attestation needs the remote key holder and its URL",
            "set TENSAFE_KEY_HOLDER=remote and TENSAFE_KEY_HOLDER_URL",
        )
    if settings.key_holder_token_file is None:
        raise ConfigError(
            "require_attestation needs the key holder token file",
            "set TENSAFE_KEY_HOLDER_TOKEN_FILE",
        )
    quoter = quoter_from_settings(settings)
    poster = JsonPoster(
        settings.key_holder_url,
        _read_token(settings.key_holder_token_file),
        ca_file=str(settings.key_holder_ca) if settings.key_holder_ca else None,
        timeout=max(settings.key_holder_timeout, 30.0),
    )
    try:
        return attest(poster, quoter, url=f"key holder {settings.key_holder_url}")
    finally:
        poster.close()


_gate_lock = threading.Lock()
_gate_passed = False


def startup_gate(settings: TenSafeSettings) -> None:
    """``check_at_startup`` once per process (``vllm serve`` reaches start-up twice)."""
    global _gate_passed
    if not settings.require_attestation:
        return
    with _gate_lock:
        if _gate_passed:
            return
        check_at_startup(settings)
        _gate_passed = True
