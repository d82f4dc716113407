"""Attestation through the real key holder (``KeyHolderService`` over HTTPS, its audit log) and
its real client (``RemoteKeyHolder``), with a real software TPM: a good quote is accepted and
the host's decryptions are served; every attack on a quote is refused with its own message,
audited, and leaves the connection without decryptions; the session is bound to the token and
to the TLS connection; the client attests first, renews, re-attests once, starts over on a new
connection. No vLLM here (tests/attestation/test_e2e.py has it).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vllm_tensafe.attestation.client import Attester
from vllm_tensafe.attestation.swtpm import expected_pcrs
from vllm_tensafe.errors import (
    AttestationRequiredError,
    PcrMismatchError,
    UnknownAttestationKeyError,
    UnknownHostError,
)
from vllm_tensafe.keyholder.server.tokens import token_fingerprint

from .conftest import GOOD_BOOT, FakeClock, Host, _unrelated_pem, a_policy, write_policy
from .service import ADMIN_TOKEN, SECOND_TOKEN, TOKEN, UNLISTED_TOKEN, RunningKeyHolder

MakeKeyHolder = Callable[..., RunningKeyHolder]


@pytest.fixture
def key_holder(make_key_holder: MakeKeyHolder, host_a: Host) -> RunningKeyHolder:
    return make_key_holder(a_policy(host_a))


def _refused_then_no_decryption(
    key_holder: RunningKeyHolder, wire: Any, sql: Any, status: int, reply: dict[str, Any]
) -> str:
    """The quote's refusal is audited with its reason, and the connection still gets no
    decryption. Returns the refusal's cause."""
    assert status == 403, reply
    (event,) = [e for e in key_holder.events("attestation_quote") if e["outcome"] != "ok"][-1:]
    assert event["outcome"] == reply["error"] and event["cause"] == reply["cause"]
    assert event["host"] == "host-a" and event["status"] == 403
    status, refused = wire.decrypt(sql.ref, [sql.blob])
    assert status == 403 and refused["error"] == "attestation_required", refused
    return str(reply["cause"])


# --- a good host ------------------------------------------------------------------------------


def test_good_quote_is_accepted_and_decryptions_are_served(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any
) -> None:
    client = key_holder.client(Attester(host_a.quoter))
    (reply,) = client.decrypt(sql.ref, [sql.blob])
    assert reply.dtype == np.uint64 and reply.shape == (sql.ctx.profile.poly_modulus_degree,)
    client.decrypt(sql.ref, [sql.blob])  # the session holds: no second quote
    grant = client.attester.grant if client.attester else None
    assert grant is not None and grant.host == "host-a" and grant.channel_bound
    assert grant.ak == host_a.key.key.fingerprint
    routes = [(e["route"], e["outcome"]) for e in key_holder.events() if e["route"] != "start"]
    assert routes == [
        ("attestation_nonce", "ok"),
        ("attestation_quote", "ok"),
        ("decrypt", "ok"),
        ("decrypt", "ok"),
    ]
    (quote,) = key_holder.events("attestation_quote")
    assert quote["ak"] == host_a.key.key.fingerprint and quote["channel_bound"] is True
    assert quote["attested_as"] == "host-a" and quote["token"] == token_fingerprint(TOKEN)


def test_a_host_that_does_not_attest_gets_no_decryption(
    make_key_holder: MakeKeyHolder, key_holder: RunningKeyHolder, sql: Any
) -> None:
    with pytest.raises(AttestationRequiredError, match=r"decrypts only for attested hosts: .*"):
        key_holder.client().decrypt(sql.ref, [sql.blob])
    (event,) = key_holder.events("decrypt")
    assert event["outcome"] == "attestation_required" and event["status"] == 403
    assert "no attestation session" in event["cause"] and event["adapter"] == sql.name
    # Guard: the same host and request, against a key holder without a policy, is served.
    plain = make_key_holder(None)
    assert len(plain.client().decrypt(sql.ref, [sql.blob])) == 1
    assert plain.service.health()["attestation"] is False


# --- each attack on a quote, refused with its own message --------------------------------------


def test_wrong_pcr_value_is_refused(key_holder: RunningKeyHolder, host_a: Host, sql: Any) -> None:
    host_a.tpm.extend(7, b"secure boot: disabled")  # the host booted something else
    wire = key_holder.wire()
    status, reply = wire.send_quote(wire.quote_for(host_a.quoter, wire.nonce()))
    assert reply["error"] == "attestation_pcr_mismatch"
    cause = _refused_then_no_decryption(key_holder, wire, sql, status, reply)
    assert "host 'host-a' booted something its policy does not accept" in cause
    assert "PCR 7 is" in cause
    # The client gets it typed, with the key holder's reason.
    client = key_holder.client(Attester(host_a.quoter))
    with pytest.raises(PcrMismatchError, match=r"refused the attestation: host 'host-a' booted"):
        client.decrypt(sql.ref, [sql.blob])


def test_stale_nonce_is_refused(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any, clock: FakeClock
) -> None:
    wire = key_holder.wire()
    first, second = wire.nonce(), wire.nonce()
    bundle = wire.quote_for(host_a.quoter, first)
    status, reply = wire.send_quote(bundle)
    assert reply["error"] == "attestation_stale_nonce"
    cause = _refused_then_no_decryption(key_holder, wire, sql, status, reply)
    assert "is stale: a newer nonce was issued to host 'host-a' on this connection" in cause
    # A nonce past its lifetime (120 s) is stale too.
    late = wire.quote_for(host_a.quoter, second)
    clock.advance(121)
    status, reply = wire.send_quote(late)
    assert status == 403 and reply["error"] == "attestation_stale_nonce"
    assert "expired 1.0s ago (nonces live 120s)" in reply["cause"]
    # Guard: the newest nonce, quoted in time, is accepted.
    assert wire.attest(host_a.quoter)["host"] == "host-a"


def test_replayed_quote_is_refused(key_holder: RunningKeyHolder, host_a: Host, sql: Any) -> None:
    wire = key_holder.wire()
    bundle = wire.quote_for(host_a.quoter, wire.nonce())
    status, _ = wire.send_quote(bundle)
    assert status == 200
    status, reply = wire.send_quote(bundle)
    assert status == 403 and reply["error"] == "attestation_replayed"
    assert "was already used" in reply["cause"] and "replayed quote" in reply["cause"]
    # Recorded and replayed by someone else holding the host's token, on their connection.
    thief = key_holder.wire()
    status, reply = thief.send_quote(bundle)
    assert reply["error"] == "attestation_foreign_nonce"
    cause = _refused_then_no_decryption(key_holder, thief, sql, status, reply)
    assert "issued to host 'host-a' on another connection" in cause


def test_unknown_attestation_key_is_refused(
    key_holder: RunningKeyHolder, rogue: Any, sql: Any
) -> None:
    wire = key_holder.wire()
    status, reply = wire.send_quote(wire.quote_for(rogue, wire.nonce()))  # same TPM, other AK
    assert reply["error"] == "attestation_unknown_key"
    cause = _refused_then_no_decryption(key_holder, wire, sql, status, reply)
    assert "which the policy for host 'host-a' does not accept" in cause
    with pytest.raises(UnknownAttestationKeyError, match=r"refused the attestation"):
        key_holder.client(Attester(rogue)).decrypt(sql.ref, [sql.blob])


def test_forged_signature_is_refused(key_holder: RunningKeyHolder, host_a: Host, sql: Any) -> None:
    wire = key_holder.wire()
    bundle = wire.quote_for(host_a.quoter, wire.nonce()).to_json()
    signature = bytearray(base64.b64decode(bundle["signature"]))
    signature[-1] ^= 0x01
    status, reply = wire.send_quote({**bundle, "signature": base64.b64encode(signature).decode()})
    assert reply["error"] == "attestation_bad_signature"
    cause = _refused_then_no_decryption(key_holder, wire, sql, status, reply)
    assert "signature does not verify under attestation key" in cause
    # The PCR values swapped for the approved ones after the host's TPM quoted a bad boot.
    host_a.tpm.extend(4, b"rootkit")
    forged = wire.quote_for(host_a.quoter, wire.nonce()).to_json()
    forged["pcrs"] = {str(i): v.hex() for i, v in expected_pcrs(GOOD_BOOT).items()}
    status, reply = wire.send_quote(forged)
    assert status == 403 and reply["error"] == "attestation_pcr_mismatch"
    assert "do not hash to the pcrDigest its TPM signed" in reply["cause"]


def test_quote_older_than_the_policy_age_is_refused(
    make_key_holder: MakeKeyHolder, host_a: Host, sql: Any, clock: FakeClock
) -> None:
    key_holder = make_key_holder(a_policy(host_a, max_quote_age=30))
    wire = key_holder.wire()
    challenge = wire.nonce()
    bundle = wire.quote_for(host_a.quoter, challenge)
    clock.advance(31)  # within the nonce's 120 s, beyond the host's 30 s
    status, reply = wire.send_quote(bundle)
    assert reply["error"] == "attestation_quote_too_old"
    cause = _refused_then_no_decryption(key_holder, wire, sql, status, reply)
    assert "is up to 31.0s old" in cause and "accepts quotes up to 30s old" in cause


def test_admin_token_and_unlisted_host_cannot_attest(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any
) -> None:
    status, reply = key_holder.wire(ADMIN_TOKEN).post_json("/v1/attestation/nonce", {})
    assert status == 403 and reply["error"] == "token_scope" and "may not attest" in reply["cause"]
    unlisted = key_holder.wire(UNLISTED_TOKEN)
    status, reply = unlisted.post_json("/v1/attestation/nonce", {})
    assert status == 403 and reply["error"] == "attestation_unknown_host"
    assert "host 'host-z' has no entry in the key holder's attestation policy" in reply["cause"]
    status, reply = unlisted.decrypt(sql.ref, [sql.blob])
    assert status == 403 and reply["error"] == "attestation_unknown_host"
    with pytest.raises(UnknownHostError):
        key_holder.client(token=UNLISTED_TOKEN).decrypt(sql.ref, [sql.blob])


def test_unlisted_hosts_may_be_allowed_and_are_audited_as_such(
    make_key_holder: MakeKeyHolder, host_a: Host, sql: Any
) -> None:
    key_holder = make_key_holder(a_policy(host_a, unlisted_hosts="allow"))
    status, _ = key_holder.wire(UNLISTED_TOKEN).decrypt(sql.ref, [sql.blob])
    assert status == 200
    (event,) = key_holder.events("decrypt")
    assert event["outcome"] == "ok" and event["attestation"] == "unlisted host, not required"
    # A listed host still must attest.
    status, reply = key_holder.wire().decrypt(sql.ref, [sql.blob])
    assert status == 403 and reply["error"] == "attestation_required"


# --- the session: bound to the TLS connection and to the token ---------------------------------


def test_session_is_bound_to_the_connection_and_the_token(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any
) -> None:
    wire = key_holder.wire()
    assert wire.attest(host_a.quoter)["channel_bound"] is True
    assert wire.decrypt(sql.ref, [sql.blob])[0] == 200
    # Another connection with the same token has another TLS channel: no session.
    status, reply = key_holder.wire().decrypt(sql.ref, [sql.blob])
    assert status == 403 and "no attestation session on this connection" in reply["cause"]
    # Another token of the same host, on the attested connection: not the attested token.
    wire.token = SECOND_TOKEN
    status, reply = wire.decrypt(sql.ref, [sql.blob])
    assert status == 403 and reply["error"] == "attestation_required"
    assert "attested with token" in reply["cause"]
    wire.token = TOKEN
    assert wire.decrypt(sql.ref, [sql.blob])[0] == 200  # guard: the attested pair still works


def test_check_route_needs_the_session_too(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any
) -> None:
    body = {"adapter": sql.name, "key_id": sql.ctx.key_id, "manifest_digest": sql.digest}
    wire = key_holder.wire()
    status, reply = wire.post_json("/v1/check", body)
    assert status == 403 and reply["error"] == "attestation_required"
    wire.attest(host_a.quoter)
    status, reply = wire.post_json("/v1/check", body)
    assert status == 200 and reply["ok"] is True
    assert key_holder.outcomes("check") == ["attestation_required", "ok"]


# --- the client: first request, renewal, re-attestation, new connection -----------------------


def test_client_renews_before_expiry_and_attests_again_on_a_new_connection(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any
) -> None:
    client_clock = FakeClock()
    client = key_holder.client(Attester(host_a.quoter, clock=client_clock))
    client.decrypt(sql.ref, [sql.blob])
    client_clock.advance(600 * 0.8)  # 80% of the session's 600 s: renew, same connection
    client.decrypt(sql.ref, [sql.blob])
    assert key_holder.outcomes("attestation_quote") == ["ok", "ok"]
    client.close()  # the next request opens a new connection: a new TLS channel
    client.decrypt(sql.ref, [sql.blob])
    assert key_holder.outcomes("attestation_quote") == ["ok", "ok", "ok"]
    clients = {e["client"] for e in key_holder.events("attestation_quote")}
    assert len(clients) == 2  # two connections
    assert key_holder.outcomes("decrypt") == ["ok", "ok", "ok"]


def test_client_attests_once_more_when_the_key_holder_ended_its_session(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any, clock: FakeClock
) -> None:
    client = key_holder.client(Attester(host_a.quoter, clock=FakeClock()))
    client.decrypt(sql.ref, [sql.blob])
    clock.advance(601)  # the key holder's clock: its session is over, the client's is not
    client.decrypt(sql.ref, [sql.blob])
    assert key_holder.outcomes("decrypt") == ["ok", "attestation_required", "ok"]
    assert key_holder.outcomes("attestation_quote") == ["ok", "ok"]
    assert "expired 1.0s ago" in key_holder.events("decrypt")[1]["cause"]


def test_client_attests_once_more_only_once(
    key_holder: RunningKeyHolder, host_a: Host, sql: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_tensafe.errors import AttestationRequiredError as Required

    routes = key_holder.service.attestation

    def never(caller: Any) -> Any:
        from vllm_tensafe.attestation.routes import refusal

        return refusal(Required("the session was lost", "attest again"))

    monkeypatch.setattr(routes, "check", never)
    with pytest.raises(Required, match=r"refused the attestation: the session was lost"):
        key_holder.client(Attester(host_a.quoter)).decrypt(sql.ref, [sql.blob])
    assert key_holder.outcomes("attestation_quote") == ["ok", "ok"]  # first, and once more


def test_policy_file_change_ends_the_session_at_the_next_decryption(
    make_key_holder: MakeKeyHolder, host_a: Host, sql: Any, tmp_path: Any
) -> None:
    key_holder = make_key_holder(a_policy(host_a))
    client = key_holder.client(Attester(host_a.quoter))
    client.decrypt(sql.ref, [sql.blob])  # guard: served under the first policy
    # The owner withdraws the host's AK (say, it leaked): edits the file, no restart.
    write_policy(
        tmp_path / "attestation.json", a_policy(host_a, attestation_keys=[_unrelated_pem()])
    )
    with pytest.raises(UnknownAttestationKeyError, match=r"does not accept"):
        client.decrypt(sql.ref, [sql.blob])
    first, *_ = [e for e in key_holder.events("decrypt") if e["outcome"] != "ok"]
    assert "no longer accepts host 'host-a' or its attestation key" in first["cause"]
    # A broken file keeps the last good policy (the AK stays withdrawn).
    (tmp_path / "attestation.json").write_text("{ not json")
    with pytest.raises(UnknownAttestationKeyError):
        client.decrypt(sql.ref, [sql.blob])


# --- the document -------------------------------------------------------------------------------


def test_openapi_and_health_describe_attestation(
    make_key_holder: MakeKeyHolder, key_holder: RunningKeyHolder
) -> None:
    import json
    import ssl
    import urllib.request

    def document(running: RunningKeyHolder) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(running.ca))
        with urllib.request.urlopen(f"{running.url}/openapi.json", context=context) as reply:
            return dict(json.loads(reply.read()))

    paths = document(key_holder)["paths"]
    quote = paths["/v1/attestation/quote"]["post"]
    schema = quote["requestBody"]["content"]["application/json"]["schema"]
    assert {"ak_public", "message", "signature", "pcr_bank", "pcrs"} <= set(schema["properties"])
    assert quote["security"] == [{"bearer": []}] and "403" in quote["responses"]
    assert "/v1/attestation/nonce" in paths
    assert key_holder.service.health()["attestation"] is True
    plain = document(make_key_holder(None))["paths"]
    assert not any(path.startswith("/v1/attestation") for path in plain)
