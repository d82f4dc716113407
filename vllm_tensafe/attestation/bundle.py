"""What a host sends as its attestation: a quote bundle (JSON).

``message`` and ``signature`` are tpm2_quote's output files, base64 (TPMS_ATTEST and
TPMT_SIGNATURE, marshalled by the TPM); ``pcrs`` are the values of the quoted PCRs (their
digest is signed inside the message); ``ak_public`` names the attestation key that signed,
as PEM. Nothing in a bundle is trusted until the key holder verified it against its policy.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_tensafe.attestation.tpms import PCR_COUNT
from vllm_tensafe.errors import MalformedQuoteError

BUNDLE_VERSION = 1
# A bundle is a few kilobytes; anything far larger is refused before it is parsed.
MAX_BUNDLE_BYTES = 64 << 10
_FIX = "send the bundle that vllm_tensafe.attestation.TpmQuoter.quote() builds"


class QuoteBundle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1] = BUNDLE_VERSION
    ak_public: str = Field(max_length=4096)
    message: str = Field(max_length=4096)
    signature: str = Field(max_length=4096)
    pcr_bank: str = Field(max_length=16)
    pcrs: dict[str, str] = Field(max_length=PCR_COUNT)

    @field_validator("message", "signature")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not base64") from None
        return value

    @field_validator("pcrs")
    @classmethod
    def _pcr_map(cls, value: dict[str, str]) -> dict[str, str]:
        for index, digest in value.items():
            if not index.isdigit() or not 0 <= int(index) < PCR_COUNT or index != str(int(index)):
                raise ValueError(f"PCR index {index!r} is not 0 to {PCR_COUNT - 1}")
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise ValueError(f"PCR {index} value is not hex") from None
        return value

    @property
    def message_bytes(self) -> bytes:
        return base64.b64decode(self.message)

    @property
    def signature_bytes(self) -> bytes:
        return base64.b64decode(self.signature)

    def pcr_values(self) -> dict[int, bytes]:
        return {int(index): bytes.fromhex(value) for index, value in self.pcrs.items()}

    @classmethod
    def build(
        cls, *, ak_public: str, message: bytes, signature: bytes, bank: str, pcrs: dict[int, bytes]
    ) -> QuoteBundle:
        return cls(
            ak_public=ak_public,
            message=base64.b64encode(message).decode("ascii"),
            signature=base64.b64encode(signature).decode("ascii"),
            pcr_bank=bank,
            pcrs={str(index): value.hex() for index, value in sorted(pcrs.items())},
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_json(cls, data: object) -> QuoteBundle:
        """Validate a decoded JSON object (or its bytes); any defect is a MalformedQuoteError."""
        if isinstance(data, bytes | bytearray):
            if len(data) > MAX_BUNDLE_BYTES:
                raise MalformedQuoteError(
                    f"quote bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}", _FIX
                )
            try:
                data = json.loads(bytes(data).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise MalformedQuoteError("quote bundle is not UTF-8 JSON", _FIX) from None
        if not isinstance(data, dict):
            raise MalformedQuoteError("quote bundle is not a JSON object", _FIX)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "bundle"
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            raise MalformedQuoteError(f"quote bundle field {where}: {msg}", _FIX) from None
