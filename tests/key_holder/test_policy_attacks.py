"""Each attack on the key holder's authority, replayed: every one now gets a typed refusal.

Found against the old service (any adapter id the host wrote was served under the one key):
renamed ids after a revocation, invented ids over budget, a revoked adapter under a new id,
crafted ciphertexts under a key bound to another adapter, any token revoking any adapter.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.key_holder.conftest import (
    ADMIN_TOKEN,
    BILLING_ONLY_TOKEN,
    DECRYPT_TOKEN,
    Adapter,
    digest_of,
    policy_for,
    u,
)
from vllm_tensafe.errors import (
    AdapterRevokedError,
    BudgetExhaustedError,
    ConfigError,
    KeyHolderAuthError,
    KeyHolderForbiddenError,
    ProtocolVersionError,
)
from vllm_tensafe.he import DeltaEngine
from vllm_tensafe.keyholder.remote import RemoteKeyHolder
from vllm_tensafe.keyholder.wire import AdapterRef


def _count_decryptions(service: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on every LocalKeyHolder of the service: the ciphertexts it was asked to decrypt."""
    seen: list[int] = []
    for holder in service.holders.values():
        original = holder.decrypt

        def spy(ref: Any, blobs: Any, original: Any = original) -> Any:
            seen.append(len(blobs))
            return original(ref, blobs)

        monkeypatch.setattr(holder, "decrypt", spy)
    return seen


def _engine(service: Any, adapter: Adapter, token: str = DECRYPT_TOKEN) -> DeltaEngine:
    return DeltaEngine(adapter.ctx, RemoteKeyHolder(service.url, token, timeout=30))


def test_the_adapter_itself_is_served(service: Any, sql: Adapter) -> None:
    (delta,) = _engine(service, sql).compute(sql.ref, [(u(4), sql.matrix)])
    assert delta.shape == (4, 128)
    assert service.status("sql-adapter")["used"] == 1


@pytest.mark.parametrize("alias", ["sql-adapter2", "SQL-adapter", "sql-adapter.x", "sql"])
def test_revoked_adapter_under_a_new_name_is_refused(
    alias: str, service: Any, sql: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.revoke("sql-adapter")
    seen = _count_decryptions(service, monkeypatch)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    with pytest.raises(AdapterRevokedError):
        holder.decrypt(sql.ref, [sql.blob])
    with pytest.raises(KeyHolderForbiddenError, match="not one of this key holder's adapters"):
        holder.decrypt(AdapterRef(alias, sql.ctx.key_id, sql.digest), [sql.blob])
    assert seen == []


def test_invented_names_do_not_multiply_the_budget(
    make_service: Callable[..., Any], sql: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service(budgets={"sql-adapter": 2})
    seen = _count_decryptions(service, monkeypatch)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    holder.decrypt(sql.ref, [sql.blob] * 2)
    with pytest.raises(BudgetExhaustedError, match="used 2 of its 2"):
        holder.decrypt(sql.ref, [sql.blob])
    for i in range(10):
        with pytest.raises(KeyHolderForbiddenError, match="not one of"):
            holder.decrypt(AdapterRef(f"invented-{i}", sql.ctx.key_id, sql.digest), [sql.blob] * 2)
    assert seen == [2]  # 2 ciphertexts in all, not 20
    status = service.status("sql-adapter")
    assert status["used"] == 2 and status["key_used"] == {sql.ctx.key_id: 2}


def test_budget_is_per_key_too(
    make_service: Callable[..., Any], sql: Adapter, billing: Adapter
) -> None:
    # Budgets count per adapter and per key: the key's counter alone stops it.
    service = make_service(budgets={"sql-adapter": 3})
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    holder.decrypt(sql.ref, [sql.blob] * 3)
    service.core.state.used["sql-adapter"] = 0  # even if the name's counter were reset
    with pytest.raises(BudgetExhaustedError):
        holder.decrypt(sql.ref, [sql.blob])


def test_crafted_ciphertexts_under_another_adapters_key_are_refused(
    service: Any, sql: Adapter, billing: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host asks as billing, but with sql-adapter's key: it could decrypt only under the
    key the request names, and that key is not billing's. Nothing is decrypted."""
    from tests.he.test_keyholder import _crafted_query

    crafted = [_crafted_query(sql.ctx, 1 << 100)]
    seen = _count_decryptions(service, monkeypatch)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    with pytest.raises(KeyHolderForbiddenError, match="not bound to key"):
        holder.decrypt(AdapterRef("billing", sql.ctx.key_id, billing.digest), crafted)
    service.revoke("sql-adapter")
    with pytest.raises(AdapterRevokedError):
        holder.decrypt(sql.ref, crafted)
    with pytest.raises(KeyHolderForbiddenError, match="not one of"):
        holder.decrypt(AdapterRef("sql-adapter-copy", sql.ctx.key_id, sql.digest), crafted)
    assert seen == []


def test_one_key_bound_to_two_adapters_is_refused(sql: Adapter) -> None:
    """The old service served any name under its one key; now the policy cannot say so."""
    from vllm_tensafe.keyholder.server import AdapterPolicy

    policy = AdapterPolicy()
    policy.bind_manifest("sql-adapter", sql.ctx.key_id, sql.digest, 1)
    with pytest.raises(ConfigError, match="bound to adapters 'sql-adapter' and 'other'"):
        policy.bind_manifest("other", sql.ctx.key_id, digest_of("other"), 1)


def test_a_package_the_key_holder_was_not_given_is_refused(
    service: Any, sql: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _count_decryptions(service, monkeypatch)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    with pytest.raises(KeyHolderForbiddenError, match="not one this key holder accepts"):
        holder.decrypt(AdapterRef(sql.name, sql.ctx.key_id, digest_of("forged")), [sql.blob])
    assert seen == []


def test_older_package_is_refused_once_a_newer_one_was_served(
    make_service: Callable[..., Any], sql: Adapter, billing: Adapter
) -> None:
    policy = policy_for(sql, billing)
    newer = digest_of("sql-adapter-v2")
    policy.bind_manifest(sql.name, sql.ctx.key_id, newer, 2)
    service = make_service(policy=policy)
    holder = RemoteKeyHolder(service.url, DECRYPT_TOKEN)
    holder.decrypt(sql.ref, [sql.blob])  # v1 is fine before v2 was ever used
    holder.decrypt(AdapterRef(sql.name, sql.ctx.key_id, newer), [sql.blob])
    with pytest.raises(KeyHolderForbiddenError, match="adapter_version 1; version 2 was"):
        holder.decrypt(sql.ref, [sql.blob])


def test_expired_package_is_refused(make_service: Callable[..., Any], sql: Adapter) -> None:
    from vllm_tensafe.keyholder.server import AdapterPolicy

    policy = AdapterPolicy()
    policy.bind_manifest(sql.name, sql.ctx.key_id, sql.digest, 1, "2000-01-01T00:00:00Z")
    service = make_service(policy=policy)
    with pytest.raises(KeyHolderForbiddenError, match="expired at 2000-01-01"):
        RemoteKeyHolder(service.url, DECRYPT_TOKEN).decrypt(sql.ref, [sql.blob])


def test_token_scopes(service: Any, sql: Adapter, billing: Adapter) -> None:
    scoped = RemoteKeyHolder(service.url, BILLING_ONLY_TOKEN)
    scoped.decrypt(billing.ref, [billing.blob])
    with pytest.raises(KeyHolderForbiddenError, match="may not decrypt for adapter 'sql-adapter'"):
        scoped.decrypt(sql.ref, [sql.blob])
    # Decrypt tokens cannot revoke or read state; admin tokens cannot decrypt.
    with pytest.raises(KeyHolderForbiddenError, match="may not call revoke"):
        RemoteKeyHolder(service.url, DECRYPT_TOKEN).revoke("billing")
    with pytest.raises(KeyHolderForbiddenError, match="may not call status"):
        RemoteKeyHolder(service.url, DECRYPT_TOKEN).adapter_status("billing")
    admin = RemoteKeyHolder(service.url, ADMIN_TOKEN)
    with pytest.raises(KeyHolderForbiddenError, match="scope: no decryption"):
        admin.decrypt(billing.ref, [billing.blob])
    assert admin.adapter_status("billing")["revoked"] is False
    assert admin.revoke("billing")["revoked"] is True
    assert admin.unrevoke("billing")["revoked"] is False
    with pytest.raises(KeyHolderAuthError, match="refused the host's token"):
        RemoteKeyHolder(service.url, "unknown-token-0123456789").decrypt(billing.ref, [b"x"])


def test_every_use_is_audited_with_the_tokens_fingerprint(
    service: Any, sql: Adapter, billing: Adapter
) -> None:
    from vllm_tensafe.keyholder.server.audit import iter_records
    from vllm_tensafe.keyholder.server.tokens import token_fingerprint

    RemoteKeyHolder(service.url, DECRYPT_TOKEN).decrypt(sql.ref, [sql.blob])
    with pytest.raises(KeyHolderForbiddenError):
        RemoteKeyHolder(service.url, BILLING_ONLY_TOKEN).decrypt(sql.ref, [sql.blob])
    RemoteKeyHolder(service.url, ADMIN_TOKEN).revoke("billing")
    with pytest.raises(KeyHolderAuthError):
        RemoteKeyHolder(service.url, "not-a-known-token-0000").revoke("billing")
    events = [r.event for r in iter_records(service.audit.path)]
    by_route = {(e["route"], e["outcome"]): e for e in events}
    ok = by_route[("decrypt", "ok")]
    assert ok["token"] == token_fingerprint(DECRYPT_TOKEN) and ok["host"] == "gpu-1"
    assert ok["adapter"] == "sql-adapter" and ok["ciphertexts"] == 1
    assert ok["key_id"] == sql.ctx.key_id and ok["manifest_digest"] == sql.digest
    assert by_route[("decrypt", "token_scope")]["token"] == token_fingerprint(BILLING_ONLY_TOKEN)
    assert by_route[("revoke", "ok")]["token"] == token_fingerprint(ADMIN_TOKEN)
    assert ("revoke", "unauthorized") in by_route
    text = service.audit.path.read_text()
    for secret in (DECRYPT_TOKEN, BILLING_ONLY_TOKEN, ADMIN_TOKEN):
        assert secret not in text


def test_v1_host_gets_a_clear_protocol_error(service: Any, sql: Adapter) -> None:
    body = b"TSKHREQ1" + b"\x00" * 64
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request(
        "POST",
        "/v1/decrypt",
        body=body,
        headers={
            "Authorization": f"Bearer {DECRYPT_TOKEN}",
            "Content-Type": "application/vnd.tensafe.decrypt-v2",
        },
    )
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    assert resp.status == 400 and reply["error"] == "protocol_version"
    assert "protocol v1" in reply["cause"] and "v2" in reply["cause"]
    # A v1 host also says so in its content type: the same refusal, before the body is used.
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request(
        "POST",
        "/v1/decrypt",
        body=body,
        headers={
            "Authorization": f"Bearer {DECRYPT_TOKEN}",
            "Content-Type": "application/vnd.tensafe.decrypt-v1",
        },
    )
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"] == "protocol_version"
    error = RemoteKeyHolder(service.url, DECRYPT_TOKEN)._error(
        resp.status, json.dumps(reply).encode()
    )
    assert isinstance(error, ProtocolVersionError)
