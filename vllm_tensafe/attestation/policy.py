"""The key holder's attestation policy: which hosts may attest, with which keys, to what.

One entry per host identity (the fingerprint of the host's bearer token, as the key holder's
audit log prints it, or a host name the service maps tokens to). Loaded from a TOML or JSON
file (docs/attestation.md shows one)::

    nonce_lifetime = 120
    unlisted_hosts = "refuse"                    # or "allow": hosts without an entry skip it

    [hosts.gpu-node-1]
    attestation_keys = ["gpu-node-1.ak.pem"]     # PEM files (relative to this file) or PEM text
    tokens = ["3f2a9c0d11b7"]                    # optional: token fingerprints allowed to speak
    pcr_bank = "sha256"
    max_quote_age = 60
    session_lifetime = 3600

    [hosts.gpu-node-1.pcrs]
    0 = "9ef814b4..."                            # or a list of accepted values
    7 = ["3d458cfe...", "b5710bf5..."]
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vllm_tensafe.attestation.tpms import DIGEST_SIZES, PCR_COUNT
from vllm_tensafe.errors import ConfigError, MalformedQuoteError

PcrBank = Literal["sha1", "sha256", "sha384", "sha512"]
# RSA keys below 2048 bits and curves other than these are refused as attestation keys.
MIN_RSA_BITS = 2048
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{12,64}$")


@dataclass(frozen=True)
class AttestationKey:
    """An accepted AK public key, named by the SHA-256 of its DER SubjectPublicKeyInfo."""

    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    fingerprint: str
    source: str

    @classmethod
    def from_pem(cls, pem: bytes | str, source: str = "PEM") -> AttestationKey:
        data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise MalformedQuoteError(
                f"attestation key from {source} is not a PEM public key",
                "export it with tpm2_readpublic -c AK -f pem (or tpm2_createak -f pem)",
            ) from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                raise MalformedQuoteError(
                    f"attestation key from {source} is RSA-{key.key_size}; at least "
                    f"{MIN_RSA_BITS} bits are required",
                    "create the AK with tpm2_createak -G rsa (RSA-2048)",
                )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in CURVES:
                raise MalformedQuoteError(
                    f"attestation key from {source} is on curve {key.curve.name}; accepted: "
                    f"{', '.join(CURVES.values())}",
                    "create the AK with tpm2_createak -G ecc (P-256)",
                )
        else:
            raise MalformedQuoteError(
                f"attestation key from {source} is neither RSA nor ECC",
                "create the AK with tpm2_createak -G rsa or -G ecc",
            )
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(key, hashlib.sha256(der).hexdigest(), source)

    def pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


def _load_key(value: object, info: ValidationInfo) -> object:
    if isinstance(value, AttestationKey):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("an attestation key is a PEM file path or PEM text")
    if "-----BEGIN" in value:
        return _key_or_value_error(value.encode("ascii", "replace"), "inline PEM")
    base = (info.context or {}).get("base_dir")
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"attestation key file {str(path)!r} cannot be read: {exc.strerror}"
        ) from None
    return _key_or_value_error(data, str(path))


def _key_or_value_error(data: bytes, source: str) -> AttestationKey:
    try:
        return AttestationKey.from_pem(data, source)
    except MalformedQuoteError as exc:
        raise ValueError(exc.cause) from None


def _listify(value: object) -> object:
    if isinstance(value, dict):
        return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
    return value


class HostPolicy(BaseModel):
    """What one host must prove: a quote by one of its AKs over these PCRs with these values."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    attestation_keys: list[Annotated[AttestationKey, BeforeValidator(_load_key)]] = Field(
        min_length=1,
        description="AK public keys (PEM files or PEM text) whose quotes this host may send.",
    )
    tokens: list[str] = Field(
        default_factory=list,
        description="Fingerprints of the bearer tokens that may attest as this host "
        "(empty: any token the service maps to this host).",
    )
    pcr_bank: PcrBank = Field("sha256", description="PCR bank the quote must cover.")
    pcrs: Annotated[dict[int, list[str]], BeforeValidator(_listify)] = Field(
        min_length=1,
        description="Expected PCR values (hex), one or a list of accepted values per PCR; "
        "the keys are the PCR selection the quote must cover.",
    )
    max_quote_age: float = Field(
        60.0, gt=0, description="Seconds from the nonce's issue within which the quote counts."
    )
    session_lifetime: float = Field(
        3600.0, gt=0, description="Seconds a good quote lets the host decrypt before it renews."
    )

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, value: list[str]) -> list[str]:
        for fingerprint in value:
            if not _FINGERPRINT.match(fingerprint):
                raise ValueError(
                    f"token fingerprint {fingerprint!r} is not 12 to 64 lowercase hex "
                    "characters (the key holder's audit log prints them)"
                )
        return value

    @model_validator(mode="after")
    def _pcr_values(self) -> HostPolicy:
        size = DIGEST_SIZES[self.pcr_bank]
        for index, values in self.pcrs.items():
            if not 0 <= index < PCR_COUNT:
                raise ValueError(f"PCR {index} does not exist (0 to {PCR_COUNT - 1})")
            if not values:
                raise ValueError(f"PCR {index} lists no accepted value")
            for value in values:
                text = value.lower().removeprefix("0x")
                if len(text) != 2 * size or not re.fullmatch(r"[0-9a-f]+", text):
                    raise ValueError(
                        f"PCR {index} value {value!r} is not {2 * size} hex characters "
                        f"(a {self.pcr_bank} digest)"
                    )
        return self

    @property
    def selection(self) -> tuple[int, ...]:
        return tuple(sorted(self.pcrs))

    def accepted_values(self, index: int) -> frozenset[bytes]:
        return frozenset(bytes.fromhex(v.lower().removeprefix("0x")) for v in self.pcrs[index])

    def key(self, fingerprint: str) -> AttestationKey | None:
        for key in self.attestation_keys:
            if key.fingerprint == fingerprint:
                return key
        return None


class AttestationPolicy(BaseModel):
    """The key holder's policy: every host that may attest, and how long a nonce lives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: dict[str, HostPolicy] = Field(
        min_length=1, description="Host identity (token fingerprint or host name) -> policy."
    )
    nonce_lifetime: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Seconds a nonce stays valid after the key holder issued it.",
    )
    unlisted_hosts: Literal["refuse", "allow"] = Field(
        "refuse",
        description="Decryptions for a host without an entry: 'refuse' (403 "
        "attestation_unknown_host) or 'allow' (no attestation asked of it, for hosts without "
        "a TPM; each such decryption's audit line says so).",
    )

    @field_validator("hosts")
    @classmethod
    def _identities(cls, value: dict[str, HostPolicy]) -> dict[str, HostPolicy]:
        for identity in value:
            if not _IDENTITY.match(identity):
                raise ValueError(
                    f"host identity {identity!r} must be 1 to 128 letters, digits or ._:@-"
                )
        return value

    def host(self, identity: str) -> HostPolicy | None:
        return self.hosts.get(identity)

    @classmethod
    def from_mapping(
        cls, data: dict[str, Any], *, base_dir: Path | None = None, source: str = "policy"
    ) -> AttestationPolicy:
        try:
            return cls.model_validate(data, context={"base_dir": base_dir})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            raise ConfigError(
                f"attestation policy {source}: {where}: {msg}",
                "fix the policy file (docs/attestation.md shows its fields)",
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> AttestationPolicy:
        """Read a ``.toml`` or ``.json`` policy; relative key paths are next to the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"attestation policy {str(path)!r} cannot be read: {exc}",
                "pass a readable .toml or .json policy file",
            ) from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"attestation policy {str(path)!r} does not parse: {exc}",
                "write it as TOML (.toml) or JSON (.json)",
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"attestation policy {str(path)!r} is not a table", "see the docs")
        return cls.from_mapping(data, base_dir=path.parent, source=str(path))
