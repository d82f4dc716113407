"""The key holder's checks with a software AK (no TPM): the parts a TPM cannot easily show."""

from __future__ import annotations

import base64
import struct

import pytest

from vllm_tensafe.attestation import AttestationPolicy, AttestationVerifier
from vllm_tensafe.attestation.tpms import marshal_attest
from vllm_tensafe.errors import MalformedQuoteError, QuoteSignatureError

from .conftest import FakeClock
from .helpers import SoftAk, attest_for

PCRS = {0: b"\x11" * 32, 7: b"\x77" * 32}


def _verifier(ak: SoftAk, clock: FakeClock) -> AttestationVerifier:
    policy = AttestationPolicy.from_mapping(
        {
            "hosts": {
                "h": {
                    "attestation_keys": [ak.key.pem()],
                    "pcrs": {str(i): v.hex() for i, v in PCRS.items()},
                }
            }
        }
    )
    return AttestationVerifier(policy, clock=clock)


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_soft_quote_is_accepted(kind: str) -> None:
    ak = SoftAk(kind)
    verifier = _verifier(ak, FakeClock())
    nonce = verifier.issue_nonce("h").nonce
    assert verifier.verify_and_bind("h", ak.quote(nonce, PCRS)).host == "h"


def test_signed_non_tpm_message_is_refused_after_the_signature() -> None:
    # An AK that is not restricted could sign any bytes; the magic check refuses them.
    ak = SoftAk()
    verifier = _verifier(ak, FakeClock())
    nonce = verifier.issue_nonce("h").nonce
    message = b"\x00\x00\x00\x00" + marshal_attest(attest_for(nonce, PCRS))[4:]
    bundle = ak.quote(nonce, PCRS).model_copy(
        update={
            "message": base64.b64encode(message).decode(),
            "signature": base64.b64encode(ak.sign(message)).decode(),
        }
    )
    with pytest.raises(MalformedQuoteError, match=r"not TPM_GENERATED_VALUE"):
        verifier.verify_and_bind("h", bundle)


def test_sha1_signatures_are_refused() -> None:
    ak = SoftAk()
    verifier = _verifier(ak, FakeClock())
    bundle = ak.quote(verifier.issue_nonce("h").nonce, PCRS)
    sig = bytearray(bundle.signature_bytes)
    sig[2:4] = struct.pack(">H", 0x0004)
    with pytest.raises(QuoteSignatureError, match=r"signed with sha1; accepted: sha256"):
        verifier.verify_and_bind(
            "h", bundle.model_copy(update={"signature": base64.b64encode(sig).decode()})
        )


def test_rsa_signature_under_an_ecc_key_is_refused() -> None:
    ecc, rsa_ak = SoftAk("ecc"), SoftAk("rsa")
    verifier = _verifier(ecc, FakeClock())
    bundle = rsa_ak.quote(verifier.issue_nonce("h").nonce, PCRS)
    with pytest.raises(QuoteSignatureError, match=r"rsassa signature, but .* is an ECC key"):
        verifier.verify_and_bind("h", bundle.model_copy(update={"ak_public": ecc.key.pem()}))
