"""The TPMS_ATTEST / TPMT_SIGNATURE parsers: exact structures in, typed errors for the rest."""

from __future__ import annotations

import struct

import pytest

from vllm_tensafe.attestation.tpms import (
    TPM_GENERATED_VALUE,
    PcrSelection,
    marshal_attest,
    parse_attest,
    parse_signature,
)
from vllm_tensafe.errors import MalformedQuoteError

from .helpers import SoftAk, attest_for

PCRS = {0: b"\x11" * 32, 7: b"\x77" * 32}


def test_round_trip() -> None:
    attest = attest_for(b"n" * 32, PCRS)
    parsed = parse_attest(marshal_attest(attest))
    assert parsed == attest
    assert parsed.pcr_selection == (PcrSelection("sha256", (0, 7)),)


def test_wrong_magic_is_not_tpm_generated() -> None:
    data = bytearray(marshal_attest(attest_for(b"n", PCRS)))
    data[0:4] = struct.pack(">I", TPM_GENERATED_VALUE ^ 1)
    with pytest.raises(MalformedQuoteError, match=r"not TPM_GENERATED_VALUE.*did not produce"):
        parse_attest(bytes(data))


def test_other_attestation_type_is_not_a_quote() -> None:
    data = bytearray(marshal_attest(attest_for(b"n", PCRS)))
    data[4:6] = struct.pack(">H", 0x8017)  # TPM_ST_ATTEST_CERTIFY
    with pytest.raises(MalformedQuoteError, match=r"not TPM_ST_ATTEST_QUOTE"):
        parse_attest(bytes(data))


def test_trailing_and_truncated_bytes_are_refused() -> None:
    data = marshal_attest(attest_for(b"n", PCRS))
    with pytest.raises(MalformedQuoteError, match=r"1 trailing bytes"):
        parse_attest(data + b"\x00")
    with pytest.raises(MalformedQuoteError, match=r"pcrDigest needs 32 bytes, 31 left"):
        parse_attest(data[:-1])


def test_pcr_above_23_and_duplicate_banks_are_refused() -> None:
    data = bytearray(marshal_attest(attest_for(b"n", PCRS)))
    # The selection bitmap is the 3 bytes before the digest's size and bytes.
    start = len(data) - 2 - 32 - 3
    sized = data[: start - 1] + bytes([4]) + data[start : start + 3] + b"\x01" + data[start + 3 :]
    with pytest.raises(MalformedQuoteError, match=r"PCR 24 selected"):
        parse_attest(bytes(sized))
    two = attest_for(b"n", PCRS)
    doubled = marshal_attest(type(two)(**{**two.__dict__, "pcr_selection": two.pcr_selection * 2}))
    with pytest.raises(MalformedQuoteError, match=r"selected twice"):
        parse_attest(doubled)


def test_oversized_fields_are_refused() -> None:
    attest = attest_for(b"n" * 67, PCRS)  # extraData above sizeof(TPMT_HA)
    with pytest.raises(MalformedQuoteError, match=r"extraData of 67 bytes exceeds"):
        parse_attest(marshal_attest(attest))


def test_signatures_parse() -> None:
    rsa_sig = parse_signature(SoftAk("rsa").sign(b"m"))
    assert (rsa_sig.scheme, rsa_sig.hash, len(rsa_sig.rsa)) == ("rsassa", "sha256", 256)
    ecc_sig = parse_signature(SoftAk("ecc").sign(b"m"))
    assert (ecc_sig.scheme, len(ecc_sig.ecc_r), len(ecc_sig.ecc_s)) == ("ecdsa", 32, 32)


def test_unknown_signature_algorithms_are_refused() -> None:
    with pytest.raises(MalformedQuoteError, match=r"signature algorithm 0x0010"):
        parse_signature(struct.pack(">HH", 0x0010, 0x000B))  # TPM_ALG_NULL... HMAC
    with pytest.raises(MalformedQuoteError, match=r"signature hash 0x0099"):
        parse_signature(struct.pack(">HHH", 0x0014, 0x0099, 0))
    with pytest.raises(MalformedQuoteError, match=r"is not bytes"):
        parse_signature("text")  # type: ignore[arg-type]
