"""The key holder's decisions, independent of HTTP: who may decrypt what, how much, and a trail.

``KeyHolderCore.decrypt`` is the whole decrypt route:

1. ``ref, blobs = decode_request(body, max_count)`` (400, or ``protocol_version`` for a v1 host);
2. with an attestation policy (``--attestation-policy``), the host's attestation session on
   this connection (403 with the verifier's code, e.g. ``attestation_required``); then the
   policy checks, each refused with its own code before anything is decrypted: the token's
   scope (403 ``token_scope``), the adapter is one of this key holder's (403
   ``unknown_adapter``), the key is bound to it (403 ``key_not_bound``), the package is one it
   accepts (403 ``manifest_not_accepted``), not expired (403 ``expired``), not older than the
   newest version already served (409 ``rollback``), not revoked, by name or by key (410
   ``adapter_revoked``), within budget, per adapter and per key (429 ``budget_exhausted``);
3. ``holder.decrypt(ref, blobs)`` on the ``LocalKeyHolder`` of ``ref.key_id``;
4. the audit line, fsynced (503 ``audit_unavailable`` if it cannot be written: the reply is
   then not released), then ``encode_response(replies)``.

Budgets count ciphertexts over the life of the audit log: the counters, API revocations and
the version high-water marks are replayed from it at start (audit.py).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_tensafe.errors import ForeignCiphertextError, HEError, ProtocolVersionError
from vllm_tensafe.keyholder.server.audit import AuditLog, AuditRecord, AuditWriteError
from vllm_tensafe.keyholder.server.policy import AdapterPolicy
from vllm_tensafe.keyholder.server.revocation import RevocationFile, Revocations
from vllm_tensafe.keyholder.server.tokens import Token

if TYPE_CHECKING:
    from vllm_tensafe.attestation.routes import AttestationRoutes
    from vllm_tensafe.attestation.routes import Caller as AttestationCaller
    from vllm_tensafe.keyholder.local import LocalKeyHolder
    from vllm_tensafe.keyholder.wire import AdapterRef

log = logging.getLogger("vllm_tensafe.key_holder")


class Refusal(Exception):
    """An HTTP refusal with the JSON body ``{"error": code, "cause": ..., "fix": ...}``."""

    def __init__(self, status: int, code: str, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.status, self.code, self.cause, self.fix = status, code, cause, fix

    def body(self) -> dict[str, str]:
        return {"error": self.code, "cause": self.cause, "fix": self.fix}


@dataclass
class Caller:
    """Who sent a request, for the audit trail (never the token itself)."""

    client: str  # "ip:port"
    token: Token | None
    # The TLS channel binding (tls-unique) of the request's connection, None without TLS:
    # attestation sessions are bound to it. Never written to the audit log.
    channel: bytes | None = None

    def fields(self) -> dict[str, Any]:
        if self.token is None:
            return {"client": self.client, "token": None, "host": None, "role": None}
        return {
            "client": self.client,
            "token": self.token.fingerprint,
            "host": self.token.host,
            "role": self.token.role,
        }


class UsageState:
    """Ciphertexts used per adapter and per key, API revocations, version high-water marks."""

    def __init__(self) -> None:
        self.used: dict[str, int] = defaultdict(int)
        self.key_used: dict[str, int] = defaultdict(int)
        self.reserved: dict[str, int] = defaultdict(int)
        self.key_reserved: dict[str, int] = defaultdict(int)
        self.revoked: set[str] = set()
        self.highest: dict[str, int] = {}
        self.decrypt_requests: dict[str, int] = defaultdict(int)
        self.refusals: dict[str, int] = defaultdict(int)

    def replay(self, records: Sequence[AuditRecord]) -> None:
        for record in records:
            event = record.event
            route, outcome = event.get("route"), event.get("outcome")
            name = event.get("adapter")
            if route == "decrypt" and outcome == "ok" and isinstance(name, str):
                self._count(name, str(event.get("key_id")), int(event.get("ciphertexts", 0)))
                version = event.get("adapter_version")
                if isinstance(version, int):
                    self.highest[name] = max(version, self.highest.get(name, 0))
            elif route == "decrypt" and isinstance(name, str) and outcome != "unauthorized":
                self.refusals[name] += 1
            elif route == "revoke" and outcome == "ok" and isinstance(name, str):
                self.revoked.add(name)
            elif route == "unrevoke" and outcome == "ok" and isinstance(name, str):
                self.revoked.discard(name)

    def _count(self, name: str, key_id: str, count: int) -> None:
        self.used[name] += count
        self.key_used[key_id] += count
        self.decrypt_requests[name] += 1


class KeyHolderCore:
    def __init__(
        self,
        holders: dict[str, LocalKeyHolder],
        policy: AdapterPolicy,
        audit: AuditLog,
        *,
        default_budget: int | None = None,
        revocation_file: RevocationFile | None = None,
        max_count: int = 4096,
        attestation: AttestationRoutes | None = None,
    ) -> None:
        self.holders = holders
        # With an attestation policy every decryption (and check) needs a good TPM quote of
        # the host first, on the same connection (docs/attestation.md).
        self.attestation = attestation
        self.policy = policy
        self.audit = audit
        self.default_budget = default_budget
        self.revocation_file = revocation_file
        self.max_count = max_count
        self.state = UsageState()
        self.state.replay(list(audit.records))
        self.state.refusals = defaultdict(
            int, {n: c for n, c in self.state.refusals.items() if policy.binding(n)}
        )
        if audit.path is not None:
            audit.records = []  # replayed; not kept in memory
        self._lock = threading.Lock()

    # --- decisions -------------------------------------------------------------------------

    def budget_of(self, name: str) -> int | None:
        binding = self.policy.binding(name)
        if binding is not None and binding.budget is not None:
            return binding.budget
        return self.default_budget

    def _revocations(self) -> Revocations:
        if self.revocation_file is None:
            return Revocations()
        return self.revocation_file.revocations()

    def is_revoked(self, name: str, key_id: str | None = None) -> bool:
        listed = self._revocations()
        if name in listed.names or name in self.state.revoked:
            return True
        if key_id is None:
            return False
        # A key is revoked with every adapter it is bound to, and by a key: line.
        owner = self.policy.key_owner.get(key_id)
        revoked_owner = owner is not None and (owner in listed.names or owner in self.state.revoked)
        return key_id in listed.keys or revoked_owner

    def authorize(self, ref: AdapterRef, token: Token) -> int:
        """The policy checks of one request; returns the package's adapter_version."""
        if not token.may_decrypt(ref.name):
            scope = "any adapter" if token.adapters is None else ", ".join(token.adapters)
            if token.role != "decrypt":
                scope = "no decryption"
            raise Refusal(
                403,
                "token_scope",
                f"token {token.fingerprint} ({token.role}, host {token.host}) may not decrypt "
                f"for adapter {ref.name!r} (its scope: {scope})",
                "use this host's decrypt token; the key holder's token file sets each scope",
            )
        binding = self.policy.binding(ref.name)
        if binding is None:
            raise Refusal(
                403,
                "unknown_adapter",
                f"adapter {ref.name!r} is not one of this key holder's adapters",
                "serve the package under the name it was signed with; the adapter owner adds "
                "its package to the key holder's --adapters",
            )
        if ref.key_id not in binding.key_ids:
            raise Refusal(
                403,
                "key_not_bound",
                f"adapter {ref.name!r} is not bound to key {ref.key_id[:16]}",
                "serve the adapter's own package: the key holder decrypts each adapter only "
                "under the key its package was made with",
            )
        manifest = binding.manifests.get(ref.manifest_digest)
        if manifest is None:
            raise Refusal(
                403,
                "manifest_not_accepted",
                f"the package of adapter {ref.name!r} (manifest {ref.manifest_digest[:16]}) is "
                "not one this key holder accepts",
                "serve a package the adapter owner gave the key holder (its --adapters)",
            )
        if manifest.expired():
            raise Refusal(
                403,
                "expired",
                f"the package of adapter {ref.name!r} (version {manifest.adapter_version}) "
                f"expired at {manifest.not_after}",
                "serve the adapter's newer package",
            )
        highest = self.state.highest.get(ref.name, 0)
        if manifest.adapter_version < highest:
            raise Refusal(
                409,
                "rollback",
                f"the package of adapter {ref.name!r} has adapter_version "
                f"{manifest.adapter_version}; version {highest} was already served (rollback)",
                "serve the adapter's newest package",
            )
        if self.is_revoked(ref.name, ref.key_id):
            raise Refusal(
                410,
                "adapter_revoked",
                f"adapter {ref.name!r} was revoked by its owner",
                "stop serving this adapter; ask its owner",
            )
        return manifest.adapter_version

    def _reserve(self, ref: AdapterRef, count: int) -> None:
        state = self.state
        with self._lock:
            budget = self.budget_of(ref.name)
            used = state.used[ref.name] + state.reserved[ref.name]
            key_used = state.key_used[ref.key_id] + state.key_reserved[ref.key_id]
            if budget is not None and max(used, key_used) + count > budget:
                raise Refusal(
                    429,
                    "budget_exhausted",
                    f"adapter {ref.name!r} has used {max(used, key_used)} of its {budget} "
                    f"ciphertexts; {count} more were requested",
                    "ask the adapter owner to raise the budget",
                )
            state.reserved[ref.name] += count
            state.key_reserved[ref.key_id] += count

    def _settle(self, ref: AdapterRef, count: int, version: int, released: bool) -> None:
        state = self.state
        with self._lock:
            state.reserved[ref.name] -= count
            state.key_reserved[ref.key_id] -= count
            if released:
                state._count(ref.name, ref.key_id, count)
                state.highest[ref.name] = max(version, state.highest.get(ref.name, 0))

    # --- routes ----------------------------------------------------------------------------

    def decrypt(self, body: bytes, caller: Caller) -> bytes:
        from vllm_tensafe.keyholder.wire import decode_request, encode_response

        assert caller.token is not None
        event: dict[str, Any] = {"route": "decrypt", **caller.fields()}
        try:
            try:
                ref, blobs = decode_request(body, self.max_count)
            except ProtocolVersionError as exc:
                raise Refusal(400, "protocol_version", exc.cause, exc.fix or "") from None
            except HEError as exc:
                raise Refusal(400, "bad_request", exc.cause, exc.fix or "") from None
            event.update(
                adapter=ref.name,
                key_id=ref.key_id,
                manifest_digest=ref.manifest_digest,
                ciphertexts=len(blobs),
            )
            self.require_attestation(caller, event)
            version = self.authorize(ref, caller.token)
            event["adapter_version"] = version
            holder = self.holders.get(ref.key_id)
            if holder is None:  # the policy binds only keys this key holder holds
                raise Refusal(503, "internal", "no secret key for a bound key", "see the log")
            self._reserve(ref, len(blobs))
            released = False
            try:
                try:
                    replies = holder.decrypt(ref, blobs)
                except ForeignCiphertextError as exc:
                    raise Refusal(422, "foreign_ciphertext", exc.cause, exc.fix or "") from None
                except HEError as exc:
                    raise Refusal(400, "bad_request", exc.cause, exc.fix or "") from None
                payload = encode_response(replies)
                # The decryption leaves only once its audit line is on disk.
                self._audit({**event, "outcome": "ok"})
                released = True
            finally:
                self._settle(ref, len(blobs), version, released)
            return payload
        except Refusal as refusal:
            if refusal.code != "audit_unavailable":
                self._audit_refusal(event, refusal)
            raise

    def check(self, ref: AdapterRef, caller: Caller) -> dict[str, Any]:
        """The decrypt route's policy checks without a decryption (host start-up check)."""
        assert caller.token is not None
        event = {
            "route": "check",
            **caller.fields(),
            "adapter": ref.name,
            "key_id": ref.key_id,
            "manifest_digest": ref.manifest_digest,
        }
        try:
            self.require_attestation(caller, event)
            version = self.authorize(ref, caller.token)
        except Refusal as refusal:
            self._audit_refusal(event, refusal)
            raise
        self._audit({**event, "outcome": "ok", "adapter_version": version})
        return {"adapter": ref.name, "key_id": ref.key_id, "adapter_version": version, "ok": True}

    # --- attestation -----------------------------------------------------------------------

    def _attestation_caller(self, caller: Caller) -> AttestationCaller:
        from vllm_tensafe.attestation.routes import Caller as AttestationCaller
        from vllm_tensafe.attestation.routes import host_identity

        assert caller.token is not None
        token = caller.token
        return AttestationCaller(
            host_identity(token.fingerprint, token.host), token.fingerprint, caller.channel
        )

    def require_attestation(self, caller: Caller, event: dict[str, Any]) -> None:
        """Refuse (403, the verifier's reason) a host without a valid attestation session on
        this connection; a no-op without an attestation policy."""
        if self.attestation is None:
            return
        who = self._attestation_caller(caller)
        refused = self.attestation.check(who)
        if refused is not None:
            event["attested_as"] = who.host
            event["cause"] = refused.body["cause"]
            raise Refusal(
                refused.status, refused.body["error"], refused.body["cause"], refused.body["fix"]
            )
        if self.attestation.exempt(who):
            event["attestation"] = "unlisted host, not required"

    def attest(self, route: str, body: bytes, caller: Caller) -> tuple[int, dict[str, Any]]:
        """``POST /v1/attestation/nonce`` or ``/quote`` (``route``: "nonce" or "quote"), audited.

        Returns the status and JSON body to send (refusals included: the verifier's
        ``{"error", "cause", "fix"}``).
        """
        from vllm_tensafe.attestation.routes import NONCE_PATH, QUOTE_PATH

        assert self.attestation is not None and caller.token is not None
        event: dict[str, Any] = {"route": f"attestation_{route}", **caller.fields()}
        if caller.token.role != "decrypt":
            refusal = Refusal(
                403,
                "token_scope",
                f"token {caller.token.fingerprint} (role {caller.token.role}) may not attest: "
                "hosts attest with their decrypt token",
                "use the host's decrypt token",
            )
            self._audit_refusal(event, refusal)
            raise refusal
        who = self._attestation_caller(caller)
        path = NONCE_PATH if route == "nonce" else QUOTE_PATH
        reply = self.attestation.handle("POST", path, who, body)
        assert reply is not None
        event.update(attested_as=who.host, outcome=reply.outcome, status=reply.status)
        if reply.status != 200:
            event["cause"] = reply.body.get("cause")
        elif route == "quote":
            session = reply.body["session"]
            event.update(
                ak=session["ak"],
                session_seconds=session["expires_in"],
                channel_bound=session["channel_bound"],
            )
        self._audit(event)
        return reply.status, reply.body

    def revoke(self, name: str, caller: Caller) -> dict[str, Any]:
        self._need_known(name, "revoke", caller)
        self._audit({"route": "revoke", **caller.fields(), "adapter": name, "outcome": "ok"})
        with self._lock:
            self.state.revoked.add(name)
        if self.revocation_file is not None:
            try:
                self.revocation_file.add(name)
            except OSError as exc:
                log.error("revocation of %s not written to the revocation file: %s", name, exc)
        return self.status(name)

    def unrevoke(self, name: str, caller: Caller) -> dict[str, Any]:
        self._need_known(name, "unrevoke", caller)
        self._audit({"route": "unrevoke", **caller.fields(), "adapter": name, "outcome": "ok"})
        with self._lock:
            self.state.revoked.discard(name)
        if self.revocation_file is not None:
            try:
                self.revocation_file.remove(name)
            except OSError as exc:
                log.error("un-revocation of %s not written to the revocation file: %s", name, exc)
        return self.status(name)

    def status_route(self, name: str | None, caller: Caller) -> dict[str, Any]:
        if name is not None:
            self._need_known(name, "status", caller)
        self._audit({"route": "status", **caller.fields(), "adapter": name, "outcome": "ok"})
        if name is not None:
            return self.status(name)
        return {"adapters": [self.status(n) for n in self.policy.names()]}

    def status(self, name: str) -> dict[str, Any]:
        binding = self.policy.binding(name)
        assert binding is not None
        state = self.state
        return {
            "adapter": name,
            "key_ids": sorted(binding.key_ids),
            "budget": self.budget_of(name),
            "used": state.used.get(name, 0),
            "key_used": {k: state.key_used.get(k, 0) for k in sorted(binding.key_ids)},
            "revoked": self.is_revoked(name),
            "decrypt_requests": state.decrypt_requests.get(name, 0),
            "refused_requests": state.refusals.get(name, 0),
            "highest_version_served": state.highest.get(name),
            "accepted_versions": sorted({m.adapter_version for m in binding.manifests.values()}),
        }

    def refuse_admin(self, route: str, caller: Caller, name: str | None) -> None:
        """Audit and refuse a non-admin token on an admin route."""
        assert caller.token is not None
        refusal = Refusal(
            403,
            "token_scope",
            f"token {caller.token.fingerprint} (role {caller.token.role}) may not call {route}",
            "use an admin token (role admin in the key holder's token file)",
        )
        self._audit_refusal({"route": route, **caller.fields(), "adapter": name}, refusal)
        raise refusal

    def audit_unauthorized(self, route: str, client: str) -> None:
        self._audit({"route": route, "client": client, "token": None, "outcome": "unauthorized"})

    def _need_known(self, name: str, route: str, caller: Caller) -> None:
        if self.policy.binding(name) is None:
            refusal = Refusal(
                404,
                "unknown_adapter",
                f"adapter {name!r} is not one of this key holder's adapters "
                f"({', '.join(self.policy.names()) or 'none'})",
                "use the adapter's package name (the manifest's name)",
            )
            self._audit_refusal({"route": route, **caller.fields(), "adapter": name}, refusal)
            raise refusal

    # --- audit -----------------------------------------------------------------------------

    def _audit(self, event: dict[str, Any]) -> None:
        try:
            self.audit.append(event)
        except AuditWriteError as exc:
            log.error("%s", exc)
            raise Refusal(
                503,
                "audit_unavailable",
                "the key holder cannot write its audit log, so it answers nothing",
                "the key holder's operator must fix its audit log (see its log)",
            ) from None
        level = logging.INFO if event.get("outcome") == "ok" else logging.WARNING
        log.log(
            level,
            "route=%s adapter=%s ciphertexts=%s client=%s token=%s host=%s outcome=%s",
            event.get("route"),
            event.get("adapter", "-"),
            event.get("ciphertexts", 0),
            event.get("client"),
            event.get("token"),
            event.get("host"),
            event.get("outcome"),
        )

    def _audit_refusal(self, event: dict[str, Any], refusal: Refusal) -> None:
        name = event.get("adapter")
        # Only adapters of the policy: invented names must not grow the key holder's memory.
        if isinstance(name, str) and event.get("route") == "decrypt" and self.policy.binding(name):
            with self._lock:
                self.state.refusals[name] += 1
        self._audit({**event, "outcome": refusal.code, "status": refusal.status})
