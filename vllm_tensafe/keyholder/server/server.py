"""``KeyHolderService``: the key holder's app on uvicorn, in a thread of this process.

uvicorn serves each connection as a protocol object on one event loop (no thread per
connection); decryptions run in a bounded thread pool. Two things uvicorn does not bound are
added by ``_BoundedProtocol``: a deadline from a request's first byte to its complete header
(a slowloris connection is closed), and a cap on open connections (beyond it a new connection
is closed at once). TLS handshakes are bounded by asyncio (60 s).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.keyholder.server.app import CHANNEL_SCOPE_KEY, SERVICE_NAME, Limits, build_app
from vllm_tensafe.keyholder.server.audit import AuditLog
from vllm_tensafe.keyholder.server.core import Caller, KeyHolderCore
from vllm_tensafe.keyholder.server.policy import AdapterPolicy
from vllm_tensafe.keyholder.server.revocation import RevocationFile
from vllm_tensafe.keyholder.server.tls import TLSConfig
from vllm_tensafe.keyholder.server.tokens import TokenStore

if TYPE_CHECKING:
    from vllm_tensafe.attestation.routes import AttestationRoutes
    from vllm_tensafe.he.keys import SecretKeySet

log = logging.getLogger("vllm_tensafe.key_holder")

DEFAULT_PORT = 8443


# The ASGI scope key that says whether the peer presented a (CA-verified) client certificate.
CLIENT_CERT_SCOPE_KEY = "tensafe.client_certificate"


def quiet_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's event loop (uvloop when installed), logging expected network errors (a
    plain-HTTP probe of the TLS port, a refused client certificate, a reset) as one line."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    loop.set_exception_handler(_network_error_handler)
    return loop


def _network_error_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    if isinstance(exc, (OSError, ssl.SSLError, EOFError)):
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        log.info("connection dropped: %s (%s)", context.get("message", "network error"), reason)
        return
    loop.default_exception_handler(context)


def _protocol_class(limits: Limits) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from vllm_tensafe.attestation.routes import channel_binding

    class _BoundedProtocol(HttpToolsProtocol):
        _header_deadline: asyncio.TimerHandle | None = None
        _client_cert = False
        _channel: bytes | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # Set only by a verified handshake (the server context verifies it against
            # --client-ca), so a present certificate is a valid one.
            self._client_cert = bool(transport.get_extra_info("peercert"))
            # Called once the TLS handshake is done: this connection's tls-unique, which
            # attestation sessions are bound to (None over plain HTTP).
            self._channel = channel_binding(transport.get_extra_info("ssl_object"))
            if len(self.connections) > limits.max_connections:
                log.warning("connection limit (%d) reached; closing one", limits.max_connections)
                transport.close()
                return
            # Also a connection that sends nothing at all is closed after the deadline.
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._header_deadline = self.loop.call_later(
                limits.header_timeout, self._header_timeout
            )

        def _cancel_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_timeout(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[CLIENT_CERT_SCOPE_KEY] = self._client_cert  # type: ignore[literal-required]
            self.scope[CHANNEL_SCOPE_KEY] = self._channel  # type: ignore[literal-required]
            self._arm_header_deadline()

        def on_headers_complete(self) -> None:
            self._cancel_header_deadline()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

    return _BoundedProtocol


class KeyHolderService:
    """The key holder as an HTTP(S) service (``start()``/``stop()``, or ``with``)."""

    def __init__(
        self,
        secrets: SecretKeySet | Sequence[SecretKeySet],
        policy: AdapterPolicy,
        tokens: TokenStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        audit_log: str | Path | AuditLog | None = None,
        default_budget: int | None = None,
        revoked_file: str | Path | None = None,
        tls: TLSConfig | None = None,
        limits: Limits | None = None,
        attestation: str | Path | AttestationRoutes | None = None,
    ) -> None:
        """``attestation``: an attestation policy file (or its routes): every decryption then
        needs the host's TPM quote first (docs/attestation.md)."""
        from vllm_tensafe.he.keys import SecretKeySet
        from vllm_tensafe.keyholder.local import LocalKeyHolder

        secret_list = [secrets] if isinstance(secrets, SecretKeySet) else list(secrets)
        if not secret_list:
            raise ConfigError("the key holder needs a CKKS secret key", "pass --he-secret")
        if default_budget is not None and (
            not isinstance(default_budget, int) or default_budget < 0
        ):
            raise ConfigError("default budget must be an integer >= 0", "use e.g. --budget 100000")
        self.holders = {s.key_id: LocalKeyHolder(s) for s in secret_list}
        missing = sorted(policy.key_ids - set(self.holders))
        if missing:
            owner = policy.key_owner[missing[0]]
            raise ConfigError(
                f"adapter {owner!r} is bound to CKKS key {missing[0][:16]}, whose secret key "
                "this key holder was not given",
                "pass that key's PREFIX.secret with --he-secret (repeat it for each key)",
            )
        unused = sorted(set(self.holders) - policy.key_ids)
        for kid in unused:
            log.warning("secret key %s is bound to no adapter: nothing is decrypted with it", kid)
        if not policy.adapters:
            raise ConfigError(
                "the key holder has no adapters, so it would refuse every request",
                "pass --adapters with the packages (or their folder) it decrypts for",
            )
        self.policy = policy
        self.tokens = tokens
        self.limits = limits or Limits()
        self.tls = tls
        self.host = host
        self.port = port
        self._ssl: ssl.SSLContext | None = tls.server_context() if tls is not None else None
        self.audit = audit_log if isinstance(audit_log, AuditLog) else AuditLog(audit_log)
        revocations = RevocationFile(revoked_file) if revoked_file is not None else None
        from vllm_tensafe.keyholder.wire import ciphertext_size

        # The most ciphertexts that fit in one request, so a request's count field cannot ask
        # for more (every v2 request ciphertext has its profile's fixed size).
        smallest = min(ciphertext_size(h.profile) for h in self.holders.values())
        max_count = max(1, self.limits.max_request_bytes // smallest)
        self.attestation = _attestation_routes(attestation)
        if self.attestation is not None and tls is None:
            log.warning(
                "attestation without TLS: sessions bind to the host's token only, not to its "
                "connection (serve with --tls-cert to bind them to the TLS channel)"
            )
        self.core = KeyHolderCore(
            self.holders,
            policy,
            self.audit,
            default_budget=default_budget,
            revocation_file=revocations,
            max_count=max_count,
            attestation=self.attestation,
        )
        self.stopping = False
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # --- properties --------------------------------------------------------------------------

    @property
    def key_ids(self) -> list[str]:
        return sorted(self.holders)

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def client_certificates_required(self) -> bool:
        return self.tls is not None and self.tls.client_ca is not None

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "service": SERVICE_NAME,
            "protocol_version": _protocol_version(),
            "key_ids": self.key_ids,
            "profiles": sorted({h.profile.name for h in self.holders.values()}),
            "tls": self._ssl is not None,
            "client_certificates": self.tls is not None and self.tls.client_ca is not None,
            "attestation": self.attestation is not None,
        }

    # --- state (in-process use: tests, the CLI) ------------------------------------------------

    def revoke(self, name: str) -> dict[str, Any]:
        return self.core.revoke(name, Caller("in-process", None))

    def unrevoke(self, name: str) -> dict[str, Any]:
        return self.core.unrevoke(name, Caller("in-process", None))

    def status(self, name: str) -> dict[str, Any]:
        return self.core.status(name)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> int:
        if self._server is not None:
            return self.port
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                "choose another --port (0 picks a free one) or stop what uses it",
            ) from None
        sock.listen(2048)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        app = build_app(self.core, self.tokens, self.limits, self)
        context = self._ssl
        config = uvicorn.Config(
            app,
            http=_protocol_class(self.limits),
            lifespan="off",
            loop="vllm_tensafe.keyholder.server.server:quiet_loop",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=self.limits.keep_alive,
            timeout_graceful_shutdown=10,
            ssl_context_factory=(lambda cfg, default: context) if context is not None else None,
        )
        self._server = uvicorn.Server(config)
        self.stopping = False
        self.core._audit(
            {
                "route": "start",
                "outcome": "ok",
                "url": self.url,
                "key_ids": self.key_ids,
                "adapters": self.policy.names(),
                "attestation_policy": self._attestation_source(),
            }
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="tensafe-key-holder"
        )
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server = None
                raise ConfigError(f"the key holder did not start on {self.url}", "see its log")
            time.sleep(0.01)
        log.info(
            "key holder serving %s with keys %s, adapters %s; audit chain head %s",
            self.url,
            ", ".join(k[:16] for k in self.key_ids),
            self.policy.describe(),
            self.audit.head[:16],
        )
        if self.attestation is not None:
            from vllm_tensafe.attestation.routes import describe

            log.info(
                "decryptions need a TPM attestation (policy %s): %s",
                self._attestation_source(),
                describe(self.attestation.verifier.policy),
            )
        return self.port

    def _attestation_source(self) -> str | None:
        if self.attestation is None:
            return None
        path = self.attestation.policy_file
        return str(path) if path is not None else "in-process"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # Requests arriving on open connections from now on get 503 shutting_down.
        self.stopping = True
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=20)
            if self._thread.is_alive():
                server.force_exit = True
                self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        try:
            self.core._audit({"route": "stop", "outcome": "ok", "url": self.url})
        except Exception as exc:  # the service is down either way
            log.error("could not audit the stop: %s", exc)
        log.info("key holder stopped on %s; audit chain head %s", self.url, self.audit.head)

    def close(self) -> None:
        self.stop()
        self.audit.close()
        for holder in self.holders.values():
            holder.close()  # its worker threads

    def __enter__(self) -> KeyHolderService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _attestation_routes(
    attestation: str | Path | AttestationRoutes | None,
) -> AttestationRoutes | None:
    if attestation is None:
        return None
    from vllm_tensafe.attestation.routes import AttestationRoutes

    if isinstance(attestation, AttestationRoutes):
        return attestation
    return AttestationRoutes.from_policy_file(attestation)


def _protocol_version() -> int:
    from vllm_tensafe.keyholder.wire import PROTOCOL_VERSION

    return PROTOCOL_VERSION
