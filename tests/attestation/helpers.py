"""A software attestation key: signs TPMS_ATTEST structures as a TPM would, so that the key
holder's checks (and the fuzzing behind the signature) run without a TPM."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from vllm_tensafe.attestation import AttestationKey, QuoteBundle
from vllm_tensafe.attestation.tpms import (
    Attest,
    ClockInfo,
    PcrSelection,
    marshal_attest,
    pcr_digest,
)

SHA256 = 0x000B


@dataclass
class SoftAk:
    kind: str = "rsa"
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.private = (
            rsa.generate_private_key(65537, 2048)
            if self.kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )

    @property
    def key(self) -> AttestationKey:
        from cryptography.hazmat.primitives import serialization

        pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return AttestationKey.from_pem(pem)

    def sign(self, message: bytes) -> bytes:
        """A marshalled TPMT_SIGNATURE (RSASSA or ECDSA, SHA-256) over ``message``."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            sig = self.private.sign(message, padding.PKCS1v15(), hashes.SHA256())
            return struct.pack(">HHH", 0x0014, SHA256, len(sig)) + sig
        r, s = decode_dss_signature(self.private.sign(message, ec.ECDSA(hashes.SHA256())))
        rb, sb = r.to_bytes(32, "big"), s.to_bytes(32, "big")
        return struct.pack(">HHH", 0x0018, SHA256, 32) + rb + struct.pack(">H", 32) + sb

    def quote(self, nonce: bytes, pcrs: dict[int, bytes], *, bank: str = "sha256") -> QuoteBundle:
        message = marshal_attest(attest_for(nonce, pcrs, bank=bank))
        return QuoteBundle.build(
            ak_public=self.key.pem(),
            message=message,
            signature=self.sign(message),
            bank=bank,
            pcrs=pcrs,
        )


def attest_for(nonce: bytes, pcrs: dict[int, bytes], *, bank: str = "sha256") -> Attest:
    indices = tuple(sorted(pcrs))
    return Attest(
        qualified_signer=b"\x00\x0b" + bytes(32),
        extra_data=nonce,
        clock_info=ClockInfo(clock=1234, reset_count=1, restart_count=0, safe=True),
        firmware_version=0x2019102300163636,
        pcr_selection=(PcrSelection(bank, indices),),
        pcr_digest=pcr_digest("sha256", [pcrs[i] for i in indices]),
    )
