"""Quotes of a real (software) TPM verified by the key holder: one good path, every refusal.

Each attack test also runs a guard: the same bundle, with only the attacked check satisfied,
is accepted, so the refusal comes from that check and not from some unrelated defect.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest

from vllm_tensafe.attestation import AttestationPolicy, AttestationVerifier, QuoteBundle
from vllm_tensafe.attestation.swtpm import expected_pcrs
from vllm_tensafe.attestation.tpms import marshal_attest, parse_attest
from vllm_tensafe.errors import (
    AttestationError,
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

from .conftest import GOOD_BOOT, FakeClock, Host, host_policy


def _quote(verifier: AttestationVerifier, host: Host, **nonce_kw: object) -> QuoteBundle:
    challenge = verifier.issue_nonce(host.name, **nonce_kw)  # type: ignore[arg-type]
    return host.quoter.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)


def _with(bundle: QuoteBundle, **changes: object) -> QuoteBundle:
    return QuoteBundle.model_validate({**bundle.to_json(), **changes})


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


# --- the good path ------------------------------------------------------------------------------


def test_good_rsa_quote_is_accepted_and_binds_a_session(
    verifier: AttestationVerifier, host_a: Host, clock: FakeClock
) -> None:
    bundle = _quote(verifier, host_a)
    session = verifier.verify_and_bind("host-a", bundle.to_json())
    assert session.host == "host-a"
    assert session.ak_fingerprint == host_a.key.key.fingerprint
    assert session.expires_at == clock.now + 600
    assert verifier.require("host-a") == session
    # The reported PCRs are the values of the measured boot, computed without the TPM.
    assert bundle.pcr_values() == expected_pcrs(GOOD_BOOT)


def test_good_ecc_quote_is_accepted(verifier: AttestationVerifier, host_b: Host) -> None:
    bundle = _quote(verifier, host_b)
    assert verifier.verify_and_bind("host-b", bundle).ak_fingerprint == host_b.key.key.fingerprint
    assert verifier.require("host-b").host == "host-b"


def test_bundle_travels_as_json_bytes(verifier: AttestationVerifier, host_a: Host) -> None:
    bundle = _quote(verifier, host_a)
    raw = QuoteBundle.model_dump_json(bundle).encode()
    assert verifier.verify_and_bind("host-a", raw).host == "host-a"


# --- PCRs ---------------------------------------------------------------------------------------


def test_wrong_pcr_value_is_refused(
    verifier: AttestationVerifier, host_a: Host, clock: FakeClock
) -> None:
    host_a.tpm.extend(7, b"secure boot: disabled")  # booted something else
    bundle = _quote(verifier, host_a)
    with pytest.raises(PcrMismatchError, match=r"booted something its policy does not accept"):
        verifier.verify_and_bind("host-a", bundle)
    with pytest.raises(AttestationRequiredError):
        verifier.require("host-a")
    # Guard: a policy that accepts this boot's PCR 7 takes a quote of the same state.
    pcrs = {str(i): v.hex() for i, v in expected_pcrs(GOOD_BOOT).items()}
    pcrs["7"] = [pcrs["7"], bundle.pcrs["7"]]  # type: ignore[assignment]
    lenient = AttestationVerifier(
        AttestationPolicy.from_mapping({"hosts": {"host-a": host_policy(host_a, pcrs=pcrs)}}),
        clock=clock,
    )
    challenge = lenient.issue_nonce("host-a")
    again = host_a.quoter.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)
    assert lenient.verify_and_bind("host-a", again).host == "host-a"


def test_wrong_pcr_message_names_the_pcr(verifier: AttestationVerifier, host_a: Host) -> None:
    host_a.tpm.extend(4, b"another kernel")
    with pytest.raises(PcrMismatchError) as err:
        verifier.verify_and_bind("host-a", _quote(verifier, host_a))
    assert "PCR 4 is" in str(err.value) and "PCR 7" not in str(err.value)
    assert "vllm-tensafe attestation enrol" in str(err.value)


def test_reported_pcr_values_changed_after_the_quote_are_refused(
    verifier: AttestationVerifier, host_a: Host
) -> None:
    # The host booted badly and reports the good values instead of the quoted ones.
    host_a.tpm.extend(7, b"secure boot: disabled")
    bundle = _quote(verifier, host_a)
    good = {str(i): v.hex() for i, v in expected_pcrs(GOOD_BOOT).items()}
    with pytest.raises(PcrMismatchError, match=r"do not hash to the pcrDigest its TPM signed"):
        verifier.verify_and_bind("host-a", _with(bundle, pcrs=good))


def test_quote_over_fewer_pcrs_than_the_policy_is_refused(
    verifier: AttestationVerifier, host_a: Host
) -> None:
    challenge = verifier.issue_nonce("host-a")
    bundle = host_a.quoter.quote(challenge.nonce, "sha256", [0, 4])  # leaves out PCR 7
    with pytest.raises(PcrMismatchError, match=r"covers PCRs sha256:0,4; its policy requires"):
        verifier.verify_and_bind("host-a", bundle)


# --- nonces -------------------------------------------------------------------------------------


def test_superseded_nonce_is_stale(verifier: AttestationVerifier, host_a: Host) -> None:
    old = verifier.issue_nonce("host-a")
    verifier.issue_nonce("host-a")
    bundle = host_a.quoter.quote(old.nonce, old.pcr_bank, old.pcrs)
    with pytest.raises(StaleNonceError, match=r"stale: a newer nonce was issued"):
        verifier.verify_and_bind("host-a", bundle)


def test_expired_nonce_is_stale(
    verifier: AttestationVerifier, host_a: Host, clock: FakeClock
) -> None:
    bundle = _quote(verifier, host_a)
    clock.advance(121)  # nonce_lifetime is 120 s
    with pytest.raises(StaleNonceError, match=r"stale: it expired 1\.0s ago \(nonces live 120s\)"):
        verifier.verify_and_bind("host-a", bundle)


def test_replayed_quote_is_refused(
    verifier: AttestationVerifier, host_a: Host, clock: FakeClock
) -> None:
    bundle = _quote(verifier, host_a)
    verifier.verify_and_bind("host-a", bundle)  # accepted once
    clock.advance(5)
    with pytest.raises(ReplayedQuoteError, match=r"already used 5\.0s ago.*replayed quote"):
        verifier.verify_and_bind("host-a", bundle)


def test_nonce_never_issued_is_refused(verifier: AttestationVerifier, host_a: Host) -> None:
    bundle = host_a.quoter.quote(b"\x42" * 32, "sha256", [0, 4, 7])
    with pytest.raises(NonceError, match=r"was not issued by this key holder") as err:
        verifier.verify_and_bind("host-a", bundle)
    assert type(err.value) is NonceError


def test_nonce_of_another_host_is_refused(
    verifier: AttestationVerifier, host_a: Host, host_b: Host
) -> None:
    for_a = verifier.issue_nonce("host-a")
    bundle = host_b.quoter.quote(for_a.nonce, for_a.pcr_bank, for_a.pcrs)
    with pytest.raises(ForeignNonceError, match=r"issued to host 'host-a', not to 'host-b'"):
        verifier.verify_and_bind("host-b", bundle)
    # Guard: host A's own quote of that nonce is accepted (the nonce was not burned).
    mine = host_a.quoter.quote(for_a.nonce, for_a.pcr_bank, for_a.pcrs)
    assert verifier.verify_and_bind("host-a", mine).host == "host-a"


def test_nonce_from_another_connection_is_refused(
    verifier: AttestationVerifier, host_a: Host
) -> None:
    bundle = _quote(verifier, host_a, channel=b"tls-unique of connection 1")
    with pytest.raises(ForeignNonceError, match=r"on another connection"):
        verifier.verify_and_bind("host-a", bundle, channel=b"tls-unique of connection 2")
    session = verifier.verify_and_bind("host-a", bundle, channel=b"tls-unique of connection 1")
    assert session.channel == b"tls-unique of connection 1"


def test_quote_older_than_the_policy_age_is_refused(
    verifier: AttestationVerifier, host_a: Host, clock: FakeClock
) -> None:
    bundle = _quote(verifier, host_a)
    clock.advance(31)  # max_quote_age is 30 s; the nonce itself lives 120 s
    with pytest.raises(QuoteTooOldError, match=r"up to 31\.0s old.*accepts quotes up to 30s old"):
        verifier.verify_and_bind("host-a", bundle)
    # Guard: within the age the same kind of quote is accepted.
    fresh = _quote(verifier, host_a)
    clock.advance(29)
    assert verifier.verify_and_bind("host-a", fresh).host == "host-a"


# --- keys and signatures ------------------------------------------------------------------------


def test_unknown_attestation_key_is_refused(
    verifier: AttestationVerifier, host_a: Host, rogue: object
) -> None:
    challenge = verifier.issue_nonce("host-a")
    bundle = rogue.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)  # type: ignore[attr-defined]
    with pytest.raises(UnknownAttestationKeyError, match=r"does not accept \(accepted: "):
        verifier.verify_and_bind("host-a", bundle)


def test_signature_by_another_ak_under_the_enrolled_key_is_refused(
    verifier: AttestationVerifier, host_a: Host, rogue: object
) -> None:
    # The rogue key signs; the bundle claims the enrolled key signed.
    challenge = verifier.issue_nonce("host-a")
    signed = rogue.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)  # type: ignore[attr-defined]
    claimed = _with(signed, ak_public=host_a.key.key.pem())
    with pytest.raises(QuoteSignatureError, match=r"does not verify under attestation key"):
        verifier.verify_and_bind("host-a", claimed)


def test_flipped_signature_byte_is_refused(verifier: AttestationVerifier, host_a: Host) -> None:
    bundle = _quote(verifier, host_a)
    sig = bundle.signature_bytes
    forged = _with(bundle, signature=base64.b64encode(_flip(sig, len(sig) - 7)).decode())
    with pytest.raises(QuoteSignatureError, match=r"rsassa/sha256 signature does not verify"):
        verifier.verify_and_bind("host-a", forged)
    # Guard: the unforged bundle is accepted (the nonce was not consumed by the forgery).
    assert verifier.verify_and_bind("host-a", bundle).host == "host-a"


def test_flipped_ecdsa_signature_byte_is_refused(
    verifier: AttestationVerifier, host_b: Host
) -> None:
    bundle = _quote(verifier, host_b)
    sig = bundle.signature_bytes
    forged = _with(bundle, signature=base64.b64encode(_flip(sig, len(sig) - 1)).decode())
    with pytest.raises(QuoteSignatureError, match=r"ecdsa/sha256 signature does not verify"):
        verifier.verify_and_bind("host-b", forged)


def test_message_edited_to_carry_good_pcrs_is_refused(
    verifier: AttestationVerifier, host_a: Host
) -> None:
    # A badly booted host rewrites pcrDigest in the signed message to the good boot's digest.
    host_a.tpm.extend(7, b"secure boot: disabled")
    bundle = _quote(verifier, host_a)
    attest = parse_attest(bundle.message_bytes)
    good = expected_pcrs(GOOD_BOOT)
    from vllm_tensafe.attestation.tpms import pcr_digest

    edited = dataclasses.replace(
        attest, pcr_digest=pcr_digest("sha256", [good[i] for i in sorted(good)])
    )
    forged = _with(
        bundle,
        message=base64.b64encode(marshal_attest(edited)).decode(),
        pcrs={str(i): v.hex() for i, v in good.items()},
    )
    with pytest.raises(QuoteSignatureError):
        verifier.verify_and_bind("host-a", forged)
    # Guard: marshal_attest reproduces the TPM's bytes, so the only change is the digest.
    assert marshal_attest(attest) == bundle.message_bytes


def test_malformed_bundle_is_refused(verifier: AttestationVerifier, host_a: Host) -> None:
    bundle = _quote(verifier, host_a)
    with pytest.raises(MalformedQuoteError, match=r"bundle field message: .*base64"):
        verifier.verify_and_bind("host-a", {**bundle.to_json(), "message": "not base64!"})
    with pytest.raises(MalformedQuoteError, match=r"not a PEM public key"):
        verifier.verify_and_bind("host-a", _with(bundle, ak_public="-----BEGIN nothing"))


# --- hosts, sessions ----------------------------------------------------------------------------


def test_unknown_host_gets_no_nonce(verifier: AttestationVerifier) -> None:
    with pytest.raises(UnknownHostError, match=r"host 'host-z' has no entry"):
        verifier.issue_nonce("host-z")


def test_token_bound_host(host_a: Host, clock: FakeClock) -> None:
    policy = AttestationPolicy.from_mapping(
        {"hosts": {"host-a": host_policy(host_a, tokens=["0123456789ab"])}}
    )
    verifier = AttestationVerifier(policy, clock=clock)
    with pytest.raises(UnknownHostError, match=r"token ffffffffffff may not attest"):
        verifier.issue_nonce("host-a", token_fingerprint="ffffffffffff")
    challenge = verifier.issue_nonce("host-a", token_fingerprint="0123456789ab")
    bundle = host_a.quoter.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)
    verifier.verify_and_bind("host-a", bundle, token_fingerprint="0123456789ab")
    assert verifier.require("host-a", token_fingerprint="0123456789ab").host == "host-a"
    with pytest.raises(AttestationRequiredError, match=r"attested with token 0123456789ab"):
        verifier.require("host-a", token_fingerprint="ffffffffffff")


def test_session_is_required_bound_to_its_channel_and_expires(
    verifier: AttestationVerifier, host_a: Host, clock: FakeClock
) -> None:
    with pytest.raises(AttestationRequiredError, match=r"has no attestation session"):
        verifier.require("host-a", b"conn-1")
    verifier.verify_and_bind(
        "host-a", _quote(verifier, host_a, channel=b"conn-1"), channel=b"conn-1"
    )
    assert verifier.require("host-a", b"conn-1").channel == b"conn-1"
    with pytest.raises(
        AttestationRequiredError, match=r"no attestation session on this connection"
    ):
        verifier.require("host-a", b"conn-2")
    # A second worker's connection attests on its own; both sessions hold.
    verifier.verify_and_bind(
        "host-a", _quote(verifier, host_a, channel=b"conn-2"), channel=b"conn-2"
    )
    assert verifier.require("host-a", b"conn-1") and verifier.require("host-a", b"conn-2")
    clock.advance(600)
    with pytest.raises(AttestationRequiredError, match=r"session of host 'host-a' expired 0\.0s"):
        verifier.require("host-a", b"conn-1")


def test_policy_that_drops_the_ak_ends_the_session(
    verifier: AttestationVerifier, host_a: Host, host_b: Host
) -> None:
    verifier.verify_and_bind("host-a", _quote(verifier, host_a))
    verifier.replace_policy(
        AttestationPolicy.from_mapping(
            {"hosts": {"host-a": host_policy(host_a, attestation_keys=[host_b.key.key.pem()])}}
        )
    )
    with pytest.raises(AttestationRequiredError, match=r"no longer accepts"):
        verifier.require("host-a")


def test_each_refusal_has_its_own_type_and_message() -> None:
    refusals = [
        PcrMismatchError,
        StaleNonceError,
        ReplayedQuoteError,
        UnknownAttestationKeyError,
        QuoteSignatureError,
        QuoteTooOldError,
        ForeignNonceError,
        UnknownHostError,
        AttestationRequiredError,
    ]
    assert len(set(refusals)) == len(refusals)
    assert all(issubclass(cls, AttestationError) for cls in refusals)
    # Siblings: catching one never catches another.
    for cls in refusals:
        assert [other for other in refusals if issubclass(other, cls)] == [cls]


def test_policy_that_no_longer_accepts_the_pcrs_ends_the_session(
    verifier: AttestationVerifier, host_a: Host
) -> None:
    verifier.verify_and_bind("host-a", _quote(verifier, host_a))
    pcrs = {str(i): v.hex() for i, v in expected_pcrs(GOOD_BOOT).items()}
    pcrs["4"] = "00" * 32  # the owner withdraws the kernel this host booted
    verifier.replace_policy(
        AttestationPolicy.from_mapping({"hosts": {"host-a": host_policy(host_a, pcrs=pcrs)}})
    )
    with pytest.raises(AttestationRequiredError, match=r"no longer accepts the PCR values"):
        verifier.require("host-a")
