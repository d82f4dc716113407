"""The remote key holder: ``vllm-tensafe key-holder serve``.

A small stdlib HTTP(S) service that holds the CKKS secret key and decrypts the host's masked
delta batches, one request per LoRA layer per engine step. Every decryption is authenticated
(bearer token), metered (per-adapter budget in ciphertexts), revocable within one request (API or
a watched revocation file) and audited (one log line per request on the
``vllm_tensafe.key_holder`` logger, naming the caller by address and token fingerprint, never
by token).

Endpoints::

    GET  /health                          no auth   {"status": "ok", "key_id": ..., "profile": ...}
    POST /v1/decrypt                      bearer    binary request/response, see keyholder.py
    POST /v1/adapters/{adapter_id}/revoke bearer    {"adapter_id": ..., "revoked": true}
    GET  /v1/adapters/{adapter_id}        bearer    {"adapter_id", "budget", "used", "revoked"}

Budgets and API revocations live in memory; an API revocation is also appended to the
revocation file when one is configured, so it survives a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from vllm_tensafe.errors import ConfigError, ForeignCiphertextError, HEError, ProtocolVersionError

if TYPE_CHECKING:
    from vllm_tensafe.he.keyholder import AdapterRef
    from vllm_tensafe.he.keys import SecretKeySet

# TenSEAL (via keyholder/keys) is imported only when a service is built: registering the CLI
# command must stay cheap (see vllm_tensafe/cli.py).
# Wire protocol v2 (keyholder.py); kept as literals so the CLI need not import TenSEAL.
REQUEST_CONTENT_TYPE = "application/vnd.tensafe.decrypt-v2"
RESPONSE_CONTENT_TYPE = "application/vnd.tensafe.reply-v2"
_V1_REQUEST_CONTENT_TYPE = "application/vnd.tensafe.decrypt-v1"

audit = logging.getLogger("vllm_tensafe.key_holder")
log = logging.getLogger(__name__)

DEFAULT_PORT = 8443
# A request is one layer of one engine step; 256 MiB is ~650 ciphertexts at N=8192.
DEFAULT_MAX_REQUEST_BYTES = 256 << 20
# Largest body of an unauthenticated request that is read (and dropped) before the 401.
DISCARD_LIMIT = 64 << 20
# Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 60.0


class _Refusal(Exception):
    def __init__(self, status: int, code: str, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.status, self.code, self.cause, self.fix = status, code, cause, fix
        # Filled in once the request is parsed, for the audit line.
        self.adapter = "-"
        self.count = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, service: KeyHolderService):
        self.service = service
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            self._active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._active_lock:
            self._active.discard(request)
        super().shutdown_request(request)

    def close_active(self) -> None:
        """Cut keep-alive connections too: a stopped key holder must answer nothing."""
        with self._active_lock:
            active = list(self._active)
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class KeyHolderService:
    """The key holder as an HTTP(S) service (usable in-process: start()/stop())."""

    def __init__(
        self,
        secret: SecretKeySet,
        tokens: set[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        budgets: dict[str, int] | None = None,
        default_budget: int | None = None,
        revoked_file: Path | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        from vllm_tensafe.he.keyholder import LocalKeyHolder, check_adapter_id

        clean = {t for t in tokens if isinstance(t, str) and t and not any(c.isspace() for c in t)}
        if not clean or len(clean) != len(tokens):
            raise ConfigError(
                "the key holder needs at least one bearer token, each non-empty without spaces",
                "put one token per line in the --token-file",
            )
        for adapter, budget in (budgets or {}).items():
            check_adapter_id(adapter)
            if not isinstance(budget, int) or budget < 0:
                raise ConfigError(f"budget for {adapter!r} must be an integer >= 0", "fix it")
        if default_budget is not None and (
            not isinstance(default_budget, int) or default_budget < 0
        ):
            raise ConfigError("default budget must be an integer >= 0", "use e.g. --budget 100000")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError(
                "TLS needs both a certificate and its key", "pass --tls-cert and --tls-key"
            )
        self.holder = LocalKeyHolder(secret)
        self.key_id = secret.key_id
        self.profile = secret.profile
        # Digests, so comparisons are constant-time and of equal length whatever was sent.
        self._tokens = {hashlib.sha256(t.encode("utf-8")).digest(): t for t in clean}
        self.host = host
        self.port = port
        self.budgets = dict(budgets or {})
        self.default_budget = default_budget
        self.max_request_bytes = max_request_bytes
        self._max_count = max(1, max_request_bytes // (self.profile.ciphertext_bytes // 2))
        self._used: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._api_revoked: set[str] = set()
        self._file_revoked: set[str] = set()
        self._revoked_file = Path(revoked_file) if revoked_file is not None else None
        self._revoked_state: tuple[int, int, int] | None = None
        self._state_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None and tls_key is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                self._tls.load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load TLS certificate {tls_cert!r} / key {tls_key!r}: {exc}",
                    "pass a PEM certificate and its unencrypted PEM private key",
                ) from None
        if self._revoked_file is not None:
            if not self._revoked_file.is_file():
                raise ConfigError(
                    f"revocation file {str(self._revoked_file)!r} does not exist",
                    "create it (it may be empty): one adapter id per line",
                )
            self._refresh_revoked()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> int:
        if self._server is not None:
            return self.port
        server = _Server((self.host, self.port), _make_handler(), self)
        if self._tls is not None:
            # The handshake runs in the connection's own thread, not in the accept loop.
            server.socket = self._tls.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name="tensafe-key-holder", daemon=True
        )
        self._thread.start()
        audit.info(
            "key holder started on %s key=%s profile=%s protocol=v2",
            self.url,
            self.key_id[:16],
            self.profile.name,
        )
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_active()
        if self._thread is not None:
            self._thread.join(timeout=5)
        audit.info("key holder stopped on port %s", self.port)

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def __enter__(self) -> KeyHolderService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state -----------------------------------------------------------------------------

    def authenticate(self, header: str | None) -> tuple[bool, str]:
        """(accepted, fingerprint of the presented token or '-')."""
        from vllm_tensafe.he.keyholder import token_fingerprint

        if not header or not header.startswith("Bearer "):
            return False, "-"
        presented = header[len("Bearer ") :].strip()
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        accepted = False
        for known in self._tokens:
            # Compare against every token: timing does not reveal which one (or whether) matched.
            accepted |= _consteq(digest, known)
        return accepted, token_fingerprint(presented)

    def _refresh_revoked(self) -> None:
        path = self._revoked_file
        if path is None:
            return
        try:
            st = path.stat()
            state = (st.st_mtime_ns, st.st_size, st.st_ino)
            if state == self._revoked_state:
                return
            ids = {
                line.strip()
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            }
        except (OSError, UnicodeDecodeError) as exc:
            # Keep the last list: losing the file must not un-revoke anything.
            log.error("cannot read revocation file %s: %s; keeping the last list", path, exc)
            return
        self._file_revoked = ids
        self._revoked_state = state
        audit.info("revocation list reloaded from %s: %d adapters", path, len(ids))

    def is_revoked(self, adapter_id: str) -> bool:
        with self._state_lock:
            self._refresh_revoked()
            return adapter_id in self._api_revoked or adapter_id in self._file_revoked

    def revoke(self, adapter_id: str) -> None:
        with self._state_lock:
            self._api_revoked.add(adapter_id)
            if self._revoked_file is not None:
                try:
                    with self._revoked_file.open("a", encoding="utf-8") as fh:
                        fh.write(adapter_id + "\n")
                except OSError as exc:
                    log.error("revocation of %s not persisted: %s", adapter_id, exc)

    def budget_of(self, adapter_id: str) -> int | None:
        return self.budgets.get(adapter_id, self.default_budget)

    def status(self, adapter_id: str) -> dict[str, Any]:
        revoked = self.is_revoked(adapter_id)
        with self._state_lock:
            return {
                "adapter_id": adapter_id,
                "budget": self.budget_of(adapter_id),
                "used": self._used.get(adapter_id, 0),
                "revoked": revoked,
            }

    def _reserve(self, adapter_id: str, count: int) -> None:
        with self._state_lock:
            budget = self.budget_of(adapter_id)
            used = self._used.get(adapter_id, 0) + self._reserved.get(adapter_id, 0)
            if budget is not None and used + count > budget:
                raise _Refusal(
                    429,
                    "budget_exhausted",
                    f"adapter {adapter_id!r} has used {used} of its {budget} ciphertexts; "
                    f"{count} more were requested",
                    "ask the adapter owner to raise the budget",
                )
            self._reserved[adapter_id] = self._reserved.get(adapter_id, 0) + count

    def _settle(self, adapter_id: str, count: int, decrypted: bool) -> None:
        with self._state_lock:
            self._reserved[adapter_id] -= count
            if decrypted:
                self._used[adapter_id] = self._used.get(adapter_id, 0) + count

    # --- request handling (called from handler threads) ------------------------------------

    def handle_decrypt(self, body: bytes) -> tuple[str, int, bytes]:
        from vllm_tensafe.he.keyholder import decode_request

        try:
            ref, blobs = decode_request(body, self._max_count)
        except ProtocolVersionError as exc:
            raise _Refusal(400, "protocol_version", exc.cause, exc.fix or "") from None
        except HEError as exc:
            raise _Refusal(400, "bad_request", exc.cause, exc.fix or "") from None
        try:
            return ref.name, len(blobs), self._decrypt(ref, blobs)
        except _Refusal as refusal:
            refusal.adapter, refusal.count = ref.name, len(blobs)
            raise

    def _decrypt(self, ref: AdapterRef, blobs: list[memoryview]) -> bytes:
        from vllm_tensafe.he.keyholder import encode_response

        adapter_id, key_id = ref.name, ref.key_id
        count = len(blobs)
        if key_id != self.key_id:
            raise _Refusal(
                422,
                "foreign_ciphertext",
                f"ciphertexts declare key {key_id[:16]}, this key holder holds {self.key_id[:16]}",
                "route the adapter to the key holder of the key it was packed with",
            )
        if self.is_revoked(adapter_id):
            raise _Refusal(
                410,
                "adapter_revoked",
                f"adapter {adapter_id!r} was revoked by its owner",
                "stop serving this adapter; ask its owner",
            )
        self._reserve(adapter_id, count)
        decrypted = False
        try:
            values = self.holder.decrypt(ref, [bytes(b) for b in blobs])
            decrypted = True
        except ForeignCiphertextError as exc:
            raise _Refusal(422, "foreign_ciphertext", exc.cause, exc.fix or "") from None
        except HEError as exc:
            raise _Refusal(400, "bad_request", exc.cause, exc.fix or "") from None
        finally:
            self._settle(adapter_id, count, decrypted)
        return encode_response(values)


def _consteq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _make_handler() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body are separate writes: without this, Nagle + delayed ACK add ~40 ms.
        disable_nagle_algorithm = True
        server_version = "vllm-tensafe-key-holder"
        sys_version = ""
        timeout = IDLE_TIMEOUT
        server: _Server

        def log_message(self, format: str, *args: Any) -> None:
            # The audit line per request replaces http.server's stderr access log.
            return

        @property
        def service(self) -> KeyHolderService:
            return self.server.service

        def _caller(self, fingerprint: str) -> str:
            host, port = self.client_address[:2]
            return f"{host}:{port} token={fingerprint}"

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

        def _refuse(self, refusal: _Refusal) -> None:
            self._send_json(
                refusal.status,
                {"error": refusal.code, "cause": refusal.cause, "fix": refusal.fix},
            )

        def _audit(
            self, route: str, adapter: str, count: int, fingerprint: str, outcome: str
        ) -> None:
            level = logging.INFO if outcome == "ok" else logging.WARNING
            audit.log(
                level,
                "route=%s adapter=%s ciphertexts=%d caller=%s outcome=%s",
                route,
                json.dumps(adapter),
                count,
                self._caller(fingerprint),
                outcome,
            )

        def _read_body(self, required: bool = True) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None and not required and "Transfer-Encoding" not in self.headers:
                return b""
            if length is None or not length.isdigit():
                self.close_connection = True
                raise _Refusal(411, "bad_request", "Content-Length is required", "send it")
            size = int(length)
            if size > self.service.max_request_bytes:
                self.close_connection = True
                raise _Refusal(
                    413,
                    "too_large",
                    f"request of {size} bytes exceeds {self.service.max_request_bytes}",
                    "send fewer ciphertexts per request",
                )
            return self.rfile.read(size)

        def _discard_body(self) -> None:
            """Read and drop a refused request's body (up to a cap).

            A client still sending when the connection closes sees a reset, not the 401, and
            would report "unreachable" instead of "wrong token". Bodies beyond the cap are not
            read: the connection is simply closed.
            """
            length = self.headers.get("Content-Length", "")
            remaining = int(length) if length.isdigit() else 0
            if remaining > DISCARD_LIMIT:
                return
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)

        def _adapter_from_path(self, path: str, suffix: str) -> str:
            from vllm_tensafe.he.keyholder import check_adapter_id

            raw = path[len("/v1/adapters/") : len(path) - len(suffix)]
            try:
                return check_adapter_id(unquote(raw, errors="strict"))
            except (HEError, UnicodeDecodeError):
                raise _Refusal(
                    400, "bad_request", "malformed adapter id in the URL", "percent-encode it"
                ) from None

        def _authorized(self, route: str, adapter: str, count: int) -> str | None:
            ok, fingerprint = self.service.authenticate(self.headers.get("Authorization"))
            if not ok:
                self._discard_body()
                self.close_connection = True
                self._audit(route, adapter, count, fingerprint, "unauthorized")
                self._refuse(
                    _Refusal(
                        401,
                        "unauthorized",
                        "missing or unknown bearer token",
                        "send Authorization: Bearer <token from the key holder's token file>",
                    )
                )
                return None
            return fingerprint

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send_json(
                    200,
                    {
                        "status": "ok",
                        "key_id": self.service.key_id,
                        "profile": self.service.profile.name,
                    },
                )
                return
            if path.startswith("/v1/adapters/") and "/" not in path[len("/v1/adapters/") :]:
                fingerprint = self._authorized("status", "-", 0)
                if fingerprint is None:
                    return
                try:
                    adapter = self._adapter_from_path(path, "")
                except _Refusal as refusal:
                    self._refuse(refusal)
                    return
                status = self.service.status(adapter)
                self._audit("status", adapter, 0, fingerprint, "ok")
                self._send_json(200, status)
                return
            self._not_found()

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/v1/decrypt":
                self._decrypt()
            elif path.startswith("/v1/adapters/") and path.endswith("/revoke"):
                fingerprint = self._authorized("revoke", "-", 0)
                if fingerprint is None:
                    return
                try:
                    self._read_body(required=False)
                    adapter = self._adapter_from_path(path, "/revoke")
                except _Refusal as refusal:
                    self._refuse(refusal)
                    return
                self.service.revoke(adapter)
                self._audit("revoke", adapter, 0, fingerprint, "ok")
                self._send_json(200, {"adapter_id": adapter, "revoked": True})
            else:
                self.close_connection = True
                self._not_found()

        def _not_found(self) -> None:
            self._send_json(
                404,
                {"error": "not_found", "cause": f"no route {self.path}", "fix": "see the docs"},
            )

        def _decrypt(self) -> None:
            fingerprint = self._authorized("decrypt", "-", 0)
            if fingerprint is None:
                return
            adapter, count = "-", 0
            try:
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith(_V1_REQUEST_CONTENT_TYPE):
                    self.close_connection = True
                    raise _Refusal(
                        400,
                        "protocol_version",
                        "the host speaks key-holder protocol v1, this key holder speaks v2",
                        "run the same vllm-tensafe release on the host and the key holder",
                    )
                if not ctype.startswith(REQUEST_CONTENT_TYPE):
                    self.close_connection = True
                    raise _Refusal(
                        415, "bad_request", f"content type {ctype!r}", f"use {REQUEST_CONTENT_TYPE}"
                    )
                body = self._read_body()
                adapter, count, payload = self.service.handle_decrypt(body)
            except _Refusal as refusal:
                self._audit("decrypt", refusal.adapter, refusal.count, fingerprint, refusal.code)
                self._refuse(refusal)
                return
            except Exception:
                log.exception("key holder failed on a decrypt request")
                self._audit("decrypt", adapter, count, fingerprint, "internal_error")
                self._refuse(_Refusal(500, "internal", "the key holder failed", "see its log"))
                return
            # Logged before the reply leaves, so the audit trail never misses a release.
            self._audit("decrypt", adapter, count, fingerprint, "ok")
            self._send(200, payload, RESPONSE_CONTENT_TYPE)

    return Handler


# --- CLI -----------------------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Register ``key-holder serve``."""
    group = subparsers.add_parser(
        "key-holder",
        help="run the remote CKKS key holder",
        description="The remote key holder holds the CKKS secret key and decrypts the host's "
        "masked, per-step delta batches. The host never holds the key; every use of an "
        "adapter is authenticated, metered, audited and revocable.",
    )
    actions = group.add_subparsers(dest="key_holder_command", metavar="ACTION")
    group.set_defaults(handler=lambda args: (group.print_help(), 2)[1])
    serve = actions.add_parser(
        "serve",
        help="serve decryptions over HTTP(S) until SIGINT/SIGTERM",
        description="Serve POST /v1/decrypt for vLLM hosts (TENSAFE_KEY_HOLDER=remote). "
        "Runs until SIGINT or SIGTERM. One audit line per request goes to the "
        "'vllm_tensafe.key_holder' logger (stderr).",
    )
    serve.add_argument(
        "--he-secret",
        required=True,
        type=Path,
        metavar="PREFIX.secret",
        help="CKKS secret key file written by the key generator (keep it mode 600).",
    )
    serve.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="name of the environment variable that holds the secret file's passphrase "
        "(the passphrase itself never goes on the command line, where `ps` would show it).",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1). Use TLS for anything but loopback: "
        "tokens and masked deltas cross the network.",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free port and prints it).",
    )
    serve.add_argument(
        "--token-file",
        required=True,
        type=Path,
        metavar="F",
        help="file with the bearer tokens hosts must present, one per line ('#' comments "
        "allowed). Requests without a listed token get 401 and no decryption.",
    )
    serve.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help="default per-adapter budget: at most N ciphertexts decrypted per adapter over the "
        "life of this process (default: unlimited). Exhausted adapters get HTTP 429.",
    )
    serve.add_argument(
        "--revoked-file",
        type=Path,
        metavar="F",
        help="revocation list, one adapter id per line; re-read whenever it changes, so a "
        "revocation takes effect on the next request. API revocations are appended to it.",
    )
    serve.add_argument(
        "--tls-cert", metavar="F", help="PEM certificate (chain) to serve HTTPS with."
    )
    serve.add_argument("--tls-key", metavar="F", help="PEM private key of --tls-cert.")
    serve.set_defaults(handler=_serve)


def read_tokens(path: Path) -> set[str]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(
            f"token file {str(path)!r} cannot be read: {exc.strerror}",
            "pass --token-file with one bearer token per line",
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is accessible to group/others; chmod 600 it", path)
    tokens = {
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    }
    if not tokens:
        raise ConfigError(f"token file {str(path)!r} holds no token", "add one token per line")
    short = [t for t in tokens if len(t) < 16]
    if short:
        raise ConfigError(
            f"token file {str(path)!r} has {len(short)} token(s) shorter than 16 characters",
            "use long random tokens, e.g. python -c 'import secrets; print(secrets.token_hex(32))'",
        )
    return tokens


def _serve(args: argparse.Namespace) -> int:
    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if passphrase is None:
            raise ConfigError(
                f"environment variable {args.passphrase_env} is not set",
                "export it with the secret file's passphrase, or drop --passphrase-env",
            )
    if args.budget is not None and args.budget < 0:
        raise ConfigError("--budget must be >= 0", "pass a non-negative number of ciphertexts")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from vllm_tensafe.he.keys import SecretKeySet

    tokens = read_tokens(args.token_file)
    secret = SecretKeySet.load(args.he_secret, passphrase)
    service = KeyHolderService(
        secret,
        tokens,
        host=args.host,
        port=args.port,
        default_budget=args.budget,
        revoked_file=args.revoked_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    if args.tls_cert is None and not _is_loopback(args.host):
        log.warning(
            "serving plain HTTP on %s: bearer tokens cross the network in clear; use --tls-cert",
            args.host,
        )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        print(
            f"vllm-tensafe key holder listening on {service.url} "
            f"(key {secret.key_id[:16]}, profile {secret.profile.name})",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
