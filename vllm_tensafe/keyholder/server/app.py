"""The key holder's HTTP API (FastAPI on uvicorn) and its OpenAPI document.

Routes (docs/key-holder.md describes each; ``GET /openapi.json`` is the machine-readable form)::

    GET  /health                           no token  liveness, protocol version, key ids
    POST /v1/decrypt                       decrypt   binary request and reply (keyholder.py)
    POST /v1/check                         decrypt   the decrypt route's policy checks, no
                                                     decryption (the host's start-up check)
    POST /v1/attestation/nonce             decrypt   a nonce for the host's TPM quote (only
                                                     with --attestation-policy)
    POST /v1/attestation/quote             decrypt   the quote; binds an attestation session
    GET  /v1/adapters                      admin     every adapter's state
    GET  /v1/adapters/{adapter}            admin     one adapter's state
    POST /v1/adapters/{adapter}/revoke     admin     refuse it from the next request on
    POST /v1/adapters/{adapter}/unrevoke   admin     serve it again

Every refusal is JSON ``{"error": code, "cause": ..., "fix": ...}``. A request without a known
token gets 401 whatever else is wrong with it, so nothing about the key holder's adapters is
revealed to a caller without one. Request bodies are bounded in size and in time, and the
number of requests being read or decrypted at once is bounded (503 ``busy`` beyond it).

With an attestation policy, ``/v1/decrypt`` and ``/v1/check`` answer only a host that has
attested on the same connection (403 ``attestation_*`` otherwise; docs/attestation.md).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' parameter types at run
# time, and fastapi is imported inside build_app (importing this module must stay cheap).
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_tensafe.tssp.manifest import NAME_RE, is_adapter_name

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vllm_tensafe.keyholder.server.core import KeyHolderCore
    from vllm_tensafe.keyholder.server.tokens import Token, TokenStore

log = logging.getLogger("vllm_tensafe.key_holder")

SERVICE_NAME = "vllm-tensafe key holder"
DOCS = "docs/key-holder.md"
# The ASGI scope key of the connection's TLS channel binding (tls-unique; None without TLS),
# set by the server's protocol: attestation sessions are bound to it.
CHANNEL_SCOPE_KEY = "tensafe.channel_binding"


@dataclass
class Limits:
    """Bounds on what one caller can make the key holder hold or wait for."""

    max_request_bytes: int = 64 << 20  # one decrypt request (RemoteKeyHolder splits at 48 MiB)
    max_inflight: int = 4  # requests whose body is being read or decrypted at once
    busy_timeout: float = 30.0  # seconds a request waits for a free slot before 503 busy
    header_timeout: float = 10.0  # seconds from a connection's first byte to a full header
    body_timeout: float = 60.0  # seconds to receive a whole request body
    keep_alive: int = 60  # idle seconds before a keep-alive connection is closed
    max_connections: int = 1024  # open connections; more are closed at once
    decrypt_threads: int = 4  # decryptions running at once


class _Rejected(Exception):
    def __init__(self, status: int, code: str, cause: str, fix: str, close: bool = False) -> None:
        super().__init__(cause)
        self.status, self.code, self.cause, self.fix, self.close = status, code, cause, fix, close


def build_app(
    core: "KeyHolderCore", tokens: "TokenStore", limits: Limits, service: Any
) -> "FastAPI":
    """The ASGI app. ``service`` provides ``stopping`` (bool) and ``health()``."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, Response

    from vllm_tensafe.keyholder.server.core import Caller, Refusal
    from vllm_tensafe.keyholder.wire import (
        PROTOCOL_VERSION,
        REQUEST_CONTENT_TYPE,
        RESPONSE_CONTENT_TYPE,
        AdapterRef,
    )

    class ErrorBody(BaseModel):
        error: str
        cause: str
        fix: str

    class Health(BaseModel):
        status: str
        service: str
        protocol_version: int
        key_ids: list[str]
        profiles: list[str]
        tls: bool
        client_certificates: bool
        attestation: bool

    class CheckRequest(BaseModel):
        adapter: str
        key_id: str
        manifest_digest: str

    class CheckReply(BaseModel):
        adapter: str
        key_id: str
        adapter_version: int
        ok: bool

    class AdapterStatus(BaseModel):
        adapter: str
        key_ids: list[str]
        budget: int | None
        used: int
        key_used: dict[str, int]
        revoked: bool
        decrypt_requests: int
        refused_requests: int
        highest_version_served: int | None
        accepted_versions: list[int]

    class AdapterList(BaseModel):
        adapters: list[AdapterStatus]

    decrypt_limiter = anyio.CapacityLimiter(limits.decrypt_threads)
    admin_limiter = anyio.CapacityLimiter(2)
    inflight = asyncio.Semaphore(limits.max_inflight)

    def error(status: int, code: str, cause: str, fix: str, close: bool = False) -> JSONResponse:
        headers = {"Connection": "close"} if close else None
        return JSONResponse(
            {"error": code, "cause": cause, "fix": fix}, status_code=status, headers=headers
        )

    def caller_of(request: Request, token: "Token | None") -> Caller:
        client = request.client
        where = f"{client.host}:{client.port}" if client else "-"
        return Caller(where, token, request.scope.get(CHANNEL_SCOPE_KEY))

    def authenticate(request: Request) -> "Token | None":
        return tokens.authenticate(request.headers.get("authorization"))

    unauthorized_fix = (
        "send Authorization: Bearer <token>; the key holder's token file lists the accepted "
        "tokens (vllm-tensafe key-holder token makes one)"
    )

    async def unauthorized(request: Request, route: str) -> JSONResponse:
        await anyio.to_thread.run_sync(
            core.audit_unauthorized, route, caller_of(request, None).client
        )
        return error(401, "unauthorized", "missing or unknown bearer token", unauthorized_fix, True)

    async def read_body(request: Request, drain: bool = False, limit: int | None = None) -> bytes:
        """The body, bounded by ``limit`` (max_request_bytes) and body_timeout (``drain``:
        read, drop)."""
        declared = request.headers.get("content-length")
        limit = limits.max_request_bytes if limit is None else limit
        if declared is not None:
            if not declared.isascii() or not declared.isdigit():
                raise _Rejected(400, "bad_request", "malformed Content-Length", "send digits", True)
            if int(declared) > limit:
                raise _Rejected(
                    413,
                    "too_large",
                    f"request of {int(declared)} bytes exceeds the {limit}-byte limit",
                    "send fewer ciphertexts per request (RemoteKeyHolder splits large batches)",
                    True,
                )
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(limits.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _Rejected(
                            413,
                            "too_large",
                            f"request body exceeds {limit} bytes",
                            "send less",
                            True,
                        )
                    if not drain:
                        chunks.append(chunk)
        except TimeoutError:
            raise _Rejected(
                408,
                "timeout",
                f"the request body did not arrive within {limits.body_timeout:g}s",
                "check the network between host and key holder",
                True,
            ) from None
        return b"".join(chunks)

    async def drain(request: Request) -> bool:
        """Read and drop an unauthorized body, so the client reads the 401 and not a reset."""
        with contextlib.suppress(_Rejected, Exception):
            await read_body(request, drain=True)
            return True
        return False

    @contextlib.asynccontextmanager
    async def slot() -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(limits.busy_timeout):
                await inflight.acquire()
        except TimeoutError:
            raise _Rejected(
                503,
                "busy",
                f"the key holder is serving {limits.max_inflight} requests already",
                "retry; raise the key holder's --max-inflight if this persists",
            ) from None
        try:
            yield
        finally:
            inflight.release()

    app = FastAPI(
        title="vllm-tensafe key holder",
        version=str(PROTOCOL_VERSION),
        description="Decrypts the masked delta batches of vLLM hosts serving encrypted "
        f"LoRA adapters (TSSP). See {DOCS}.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )

    class Guard:
        """Refuses every request while stopping, and without a client certificate where mTLS
        requires one; turns a ``_Rejected`` raised outside a route into its JSON error.

        Pure ASGI: Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) passes every
        request and response body through a task group and memory streams, which measured
        ~2 ms more per 768 KiB decrypt request on 2 cores (docs/benchmarks.md, "Key holder").
        """

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            refusal = None
            if service.stopping:
                refusal = error(
                    503,
                    "shutting_down",
                    "the key holder is shutting down",
                    "retry once it is back; requests in flight were completed",
                    True,
                )
            elif service.client_certificates_required and not scope.get(
                "tensafe.client_certificate"
            ):
                refusal = error(
                    403,
                    "client_certificate_required",
                    "this key holder requires a client certificate (mTLS) and none was presented",
                    "set --tensafe-key-holder-client-cert/-key on the host to a certificate "
                    "signed by the key holder's --client-ca (vllm-tensafe key-holder cert "
                    "--client NAME)",
                    True,
                )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            started = False

            async def send_tracked(message: Any) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                await send(message)

            try:
                await self.app(scope, receive, send_tracked)
            except _Rejected as rejected:
                if started:  # too late for an error response: the connection is dropped
                    raise
                response = error(
                    rejected.status, rejected.code, rejected.cause, rejected.fix, rejected.close
                )
                await response(scope, receive, send)

    app.add_middleware(Guard)

    @app.exception_handler(_Rejected)
    async def rejected_handler(request: Request, exc: _Rejected) -> JSONResponse:
        return error(exc.status, exc.code, exc.cause, exc.fix, exc.close)

    @app.exception_handler(Refusal)
    async def refusal_handler(request: Request, exc: Refusal) -> JSONResponse:
        return error(exc.status, exc.code, exc.cause, exc.fix)

    @app.exception_handler(RequestValidationError)
    async def invalid_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(400, "bad_request", f"invalid {where}: {first.get('msg', 'invalid')}", DOCS)

    @app.exception_handler(StarletteHTTPException)
    async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(
                404,
                "not_found",
                f"no route {request.method} {request.url.path}",
                f"the routes are in {DOCS} and at GET /openapi.json",
            )
        if exc.status_code == 405:
            return error(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path}",
                f"the routes are in {DOCS} and at GET /openapi.json",
            )
        return error(exc.status_code, "bad_request", str(exc.detail), DOCS)

    @app.exception_handler(Exception)
    async def internal_handler(request: Request, exc: Exception) -> JSONResponse:
        log.error("key holder failed on %s %s: %r", request.method, request.url.path, exc)
        return error(500, "internal", "the key holder failed", "see the key holder's log")

    errors = {
        code: {"model": ErrorBody, "description": text}
        for code, text in {
            400: "malformed request, or a host of another protocol version (protocol_version)",
            401: "missing or unknown bearer token",
            403: "token_scope, unknown_adapter, key_not_bound, manifest_not_accepted, expired; "
            "with an attestation policy also attestation_required and the other "
            "attestation_* refusals (docs/attestation.md)",
            404: "unknown adapter (admin routes)",
            408: "the body did not arrive in time",
            409: "rollback: an older package than one already served",
            410: "adapter_revoked",
            413: "too_large",
            415: "wrong content type",
            422: "foreign_ciphertext",
            429: "budget_exhausted",
            503: "busy, shutting_down or audit_unavailable",
        }.items()
    }

    def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {c: errors[c] for c in (401, 503, *codes)}

    adapter_param = PathParam(
        description="the adapter's name (its package's signed name, the adapter id)",
        json_schema_extra={"pattern": NAME_RE.pattern, "maxLength": 128},
    )

    def checked_name(adapter: str) -> str:
        if not is_adapter_name(adapter):
            raise _Rejected(
                400,
                "bad_request",
                f"{adapter[:140]!r} is not an adapter name",
                "use the adapter's package name (the manifest's name)",
            )
        return adapter

    @app.get("/health", response_model=Health, tags=["health"], responses={503: errors[503]})
    async def health() -> Any:
        """Liveness, the protocol version and the CKKS key ids this key holder holds."""
        return service.health()

    @app.post(
        "/v1/decrypt",
        tags=["decrypt"],
        response_class=Response,
        responses={
            200: {
                "content": {
                    RESPONSE_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}
                },
                "description": "the replies, one per ciphertext (vllm_tensafe/he/keyholder.py)",
            },
            **responses(400, 403, 408, 409, 410, 413, 415, 422, 429),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "AdapterRef header and ciphertexts (vllm_tensafe/he/keyholder.py)",
                "content": {
                    REQUEST_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def decrypt(request: Request) -> Response:
        """Decrypt one batch of masked product ciphertexts (decrypt token)."""
        token = authenticate(request)
        if token is None:
            await drain(request)
            return await unauthorized(request, "decrypt")
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip() == "application/vnd.tensafe.decrypt-v1":
            await drain(request)
            raise _Rejected(
                400,
                "protocol_version",
                f"the host speaks key-holder protocol v1, this key holder speaks "
                f"v{PROTOCOL_VERSION}",
                "run the same vllm-tensafe release on the host and the key holder",
            )
        if ctype.split(";")[0].strip() != REQUEST_CONTENT_TYPE:
            await drain(request)
            raise _Rejected(
                415,
                "bad_request",
                f"content type {ctype[:80]!r}",
                f"send {REQUEST_CONTENT_TYPE} (RemoteKeyHolder does)",
            )
        async with slot():
            body = await read_body(request)
            payload = await anyio.to_thread.run_sync(
                core.decrypt, body, caller_of(request, token), limiter=decrypt_limiter
            )
        return Response(payload, media_type=RESPONSE_CONTENT_TYPE)

    @app.post(
        "/v1/check",
        response_model=CheckReply,
        tags=["decrypt"],
        responses=responses(400, 403, 409, 410, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": CheckRequest.model_json_schema()}},
            }
        },
    )
    async def check(request: Request) -> Any:
        """The decrypt route's policy checks for one package, without decrypting (decrypt
        token): hosts call it at start-up so a misconfiguration stops them at once."""
        token = authenticate(request)
        if token is None:
            await drain(request)
            return await unauthorized(request, "check")
        raw = await read_body(request)
        try:
            body = CheckRequest.model_validate_json(raw)
            ref = AdapterRef(body.adapter, body.key_id, body.manifest_digest)
        except Exception as exc:
            cause = getattr(exc, "cause", None) or "the body is not a check request"
            raise _Rejected(
                400, "bad_request", cause, 'send {"adapter", "key_id", "manifest_digest"}'
            ) from None
        return await anyio.to_thread.run_sync(
            core.check, ref, caller_of(request, token), limiter=admin_limiter
        )

    if core.attestation is not None:
        _attestation_routes(
            app, core, authenticate, caller_of, unauthorized, drain, read_body, responses
        )

    async def admin(request: Request, route: str, name: str | None, action: Any) -> Any:
        token = authenticate(request)
        if token is None:
            await drain(request)
            return await unauthorized(request, route)
        await drain(request)
        caller = caller_of(request, token)
        if not token.is_admin:
            await anyio.to_thread.run_sync(core.refuse_admin, route, caller, name)
        if name is not None:
            checked_name(name)
        return await anyio.to_thread.run_sync(action, caller, limiter=admin_limiter)

    @app.get("/v1/adapters", response_model=AdapterList, tags=["admin"], responses=responses(403))
    async def list_adapters(request: Request) -> Any:
        """Every adapter of the policy: budget, use, revocation, versions (admin token)."""
        return await admin(request, "status", None, lambda c: core.status_route(None, c))

    @app.get(
        "/v1/adapters/{adapter}",
        response_model=AdapterStatus,
        tags=["admin"],
        responses=responses(400, 403, 404),
    )
    async def adapter_status(request: Request, adapter: str = adapter_param) -> Any:
        """One adapter's budget, use, revocation and versions (admin token)."""
        return await admin(request, "status", adapter, lambda c: core.status_route(adapter, c))

    @app.post(
        "/v1/adapters/{adapter}/revoke",
        response_model=AdapterStatus,
        tags=["admin"],
        responses=responses(400, 403, 404),
    )
    async def revoke(request: Request, adapter: str = adapter_param) -> Any:
        """Revoke an adapter (and its key): every later decrypt for it is refused (admin)."""
        return await admin(request, "revoke", adapter, lambda c: core.revoke(adapter, c))

    @app.post(
        "/v1/adapters/{adapter}/unrevoke",
        response_model=AdapterStatus,
        tags=["admin"],
        responses=responses(400, 403, 404),
    )
    async def unrevoke(request: Request, adapter: str = adapter_param) -> Any:
        """Lift a revocation made through the API or the revocation file (admin token)."""
        return await admin(request, "unrevoke", adapter, lambda c: core.unrevoke(adapter, c))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for path, item in schema["paths"].items():
                if path == "/health":
                    continue
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _attestation_routes(
    app: "FastAPI",
    core: "KeyHolderCore",
    authenticate: Callable[..., Any],
    caller_of: Callable[..., Any],
    unauthorized: Callable[..., Awaitable[Any]],
    drain: Callable[..., Awaitable[Any]],
    read_body: Callable[..., Awaitable[bytes]],
    responses: Callable[..., dict[int | str, dict[str, Any]]],
) -> None:
    """Mount ``POST /v1/attestation/nonce`` and ``/quote`` (only with an attestation policy)."""
    import anyio
    from fastapi import Request
    from pydantic import BaseModel
    from starlette.responses import JSONResponse

    from vllm_tensafe.attestation.bundle import MAX_BUNDLE_BYTES, QuoteBundle
    from vllm_tensafe.attestation.routes import NONCE_PATH, QUOTE_PATH

    class NonceReply(BaseModel):
        nonce: str
        expires_in: float
        pcr_bank: str
        pcrs: list[int]

    class AttestationSession(BaseModel):
        host: str
        ak: str
        expires_in: float
        channel_bound: bool

    class QuoteReply(BaseModel):
        session: AttestationSession

    # Quote verification is a signature check or two: a few at once, off the event loop.
    limiter = anyio.CapacityLimiter(2)

    async def attestation(request: Request, route: str) -> Any:
        token = authenticate(request)
        if token is None:
            await drain(request)
            return await unauthorized(request, f"attestation_{route}")
        body = await read_body(request, limit=MAX_BUNDLE_BYTES)
        status, payload = await anyio.to_thread.run_sync(
            core.attest, route, body, caller_of(request, token), limiter=limiter
        )
        return JSONResponse(payload, status_code=status)

    @app.post(
        NONCE_PATH,
        response_model=NonceReply,
        tags=["attestation"],
        responses=responses(403, 413),
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    )
    async def attestation_nonce(request: Request) -> Any:
        """A fresh single-use nonce and the PCRs the host's TPM quote must cover (decrypt
        token). Request the nonce and send the quote over the same connection."""
        return await attestation(request, "nonce")

    @app.post(
        QUOTE_PATH,
        response_model=QuoteReply,
        tags=["attestation"],
        responses=responses(400, 403, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "tpm2_quote's message and signature (base64), the quoted PCR "
                "values and the AK's public key (vllm_tensafe/attestation/bundle.py)",
                "content": {"application/json": {"schema": QuoteBundle.model_json_schema()}},
            }
        },
    )
    async def attestation_quote(request: Request) -> Any:
        """Verify the host's TPM quote against the attestation policy; on success the
        host's decryptions on this connection are allowed until the session expires."""
        return await attestation(request, "quote")
