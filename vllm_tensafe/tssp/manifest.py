"""The manifest: canonical JSON bytes, a strict parser, and its schema.

The signature covers the exact manifest bytes, and the manifest carries the size and SHA-256
of every other member, so the manifest is the root of trust of a package. Two rules keep it
unambiguous:

* canonical encoding (sorted keys, no whitespace, UTF-8, no NaN/Infinity): the reader
  re-encodes what it parsed and refuses the file unless the bytes are identical, so one
  manifest has exactly one byte form (no duplicate keys, no alternate number spellings that
  two JSON parsers could read differently);
* a closed schema (unknown fields are refused): a new field is a new format version.
"""

from __future__ import annotations

import fnmatch
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vllm_tensafe.errors import MalformedPackageError
from vllm_tensafe.tssp.format import (
    DIGESTED_MEMBERS,
    FORMAT_VERSION,
    MEMBER_LIMITS,
    unsupported_version,
)

MANIFEST_DOMAIN = "tssp"
# The one definition of an adapter name ("adapter id"): the package's signed ``name``. The
# key holder meters, revokes and audits by it, vLLM serves it as a model name, and it appears
# in URLs, flags and line-based files, so it is short, ASCII and has no separators, spaces or
# line breaks of any kind (U+2028 included). Use ``is_adapter_name`` (fullmatch): ``NAME_RE``
# keeps ``^...$`` for pydantic's pattern, and Python's ``$`` also matches before a final "\n".
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"
# Glob patterns over adapter names (signer pins, token scopes): the name characters plus * ?.
NAME_PATTERN_RE = re.compile(r"^[A-Za-z0-9._*?-]{1,128}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
# Module names after normalisation (PEFT's "base_model.model." prefix removed).
MODULE_RE = re.compile(
    r"^model\.layers\.(0|[1-9][0-9]{0,4})\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bounds that keep a hostile (or merely absurd) manifest from making the reader allocate a lot:
# they are well above anything real (a 70B model has 80 layers x 7 projections = 560 modules).
MAX_MODULES = 8192
MAX_RANK = 4096
MAX_DIM = 1 << 20

MAX_ADAPTER_VERSION = (1 << 53) - 1  # exact in every JSON reader
DATETIME_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"

_FIX = "re-create the package with `vllm-tensafe pack`"


def is_adapter_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def is_name_pattern(pattern: object) -> bool:
    return isinstance(pattern, str) and NAME_PATTERN_RE.fullmatch(pattern) is not None


def name_matches(name: str, pattern: str) -> bool:
    """Glob match (``*`` any run, ``?`` one character), case-sensitive, on whole names."""
    return fnmatch.fnmatchcase(name, pattern)


def parse_utc(text: str) -> datetime:
    """``YYYY-MM-DDTHH:MM:SSZ`` (the manifest's form) as an aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


class ManifestError(MalformedPackageError):
    """Raised for a manifest that is not canonical JSON or does not fit the schema."""


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no whitespace, UTF-8, finite numbers."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_canonical_json(data: bytes, what: str = "manifest") -> dict[str, Any]:
    """Parse JSON that must be a canonical object; anything else raises ManifestError."""
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ManifestError(
            f"Invalid TSSP package: {what} is not valid JSON ({reason})", _FIX
        ) from None
    if not isinstance(obj, dict):
        raise ManifestError(f"Invalid TSSP package: {what} is not a JSON object", _FIX)
    try:
        canonical = canonical_json(obj)
    except (ValueError, RecursionError):
        canonical = b""
    if canonical != data:
        raise ManifestError(
            f"Invalid TSSP package: {what} is not in canonical form (sorted keys, no "
            "whitespace, UTF-8)",
            _FIX,
        )
    return obj


# --- schema ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class MemberDigest(_Strict):
    sha256: str = Field(pattern=HEX64_RE.pattern)
    size: int = Field(ge=0)


class LoraSection(_Strict):
    rank: int = Field(ge=1, le=MAX_RANK)
    alpha: float = Field(gt=0)
    # s = alpha/r (alpha/sqrt(r) with rsLoRA). Already multiplied into B' at pack time.
    scaling: float = Field(gt=0)
    use_rslora: bool
    target_modules: list[str] = Field(min_length=1, max_length=len(PROJECTIONS))
    mixed: bool
    scaling_in_b: Literal[True]

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        if any(t not in PROJECTIONS for t in value) or value != sorted(set(value)):
            raise ValueError(f"must be a sorted list of distinct names from {PROJECTIONS}")
        return value


class BaseModelSection(_Strict):
    architecture: str = Field(min_length=1, max_length=128)
    model_type: str = Field(min_length=1, max_length=64)
    fingerprint: str = Field(pattern=HEX64_RE.pattern)
    # The structural config fields the fingerprint hashes (kept so a mismatch can be named).
    config: dict[str, int | str | list[str]]
    # Shape (d_out, d_in) of every targeted base weight.
    weight_shapes: dict[str, list[int]]
    name_or_path: str | None = Field(default=None, max_length=1024)


class HESection(_Strict):
    profile: str = Field(min_length=1, max_length=64)
    poly_modulus_degree: int = Field(ge=1024, le=1 << 17)
    coeff_mod_bit_sizes: list[int] = Field(min_length=1, max_length=64)
    public_key_id: str = Field(pattern=HEX64_RE.pattern)


class ModuleSection(_Strict):
    d_in: int = Field(ge=1, le=MAX_DIM)
    d_out: int = Field(ge=1, le=MAX_DIM)
    ciphertexts: int = Field(ge=1)
    b_size: int = Field(ge=1, le=MEMBER_LIMITS["lora_b.he"])
    b_layout: dict[str, Any]


class Manifest(_Strict):
    format: Literal["tssp"]
    format_version: int
    name: str = Field(pattern=NAME_RE.pattern)
    # Monotonic per adapter name: hosts and key holders keep the highest version they have
    # seen and refuse older ones (a validly signed old package is a rollback).
    adapter_version: int = Field(ge=1, le=MAX_ADAPTER_VERSION)
    created: str = Field(pattern=DATETIME_RE)
    # Optional expiry (UTC): after it, hosts and key holders refuse the package.
    not_after: str | None = Field(default=None, pattern=DATETIME_RE)
    tool: str = Field(max_length=128)
    signer_key_id: str = Field(pattern=HEX64_RE.pattern)
    lora: LoraSection
    base_model: BaseModelSection
    he: HESection
    modules: dict[str, ModuleSection] = Field(min_length=1, max_length=MAX_MODULES)
    members: dict[str, MemberDigest]

    @model_validator(mode="before")
    @classmethod
    def _no_null_expiry(cls, value: Any) -> Any:
        # "No expiry" has one form, the absent field: a null would be a second byte form.
        if isinstance(value, dict) and "not_after" in value and value["not_after"] is None:
            raise ValueError("not_after must be a date-time or absent, not null")
        return value

    @field_validator("not_after")
    @classmethod
    def _real_date(cls, value: str | None) -> str | None:
        if value is not None:
            parse_utc(value)  # 2025-02-30 matches the pattern but is no date
        return value

    @field_validator("modules")
    @classmethod
    def _module_names(cls, value: dict[str, ModuleSection]) -> dict[str, ModuleSection]:
        for name in value:
            if not MODULE_RE.match(name):
                raise ValueError(f"module name {name[:100]!r} is not a supported projection")
        return value

    @field_validator("members")
    @classmethod
    def _member_names(cls, value: dict[str, MemberDigest]) -> dict[str, MemberDigest]:
        if set(value) != set(DIGESTED_MEMBERS):
            raise ValueError(f"must list exactly {', '.join(DIGESTED_MEMBERS)}")
        return value


def validate_manifest(obj: dict[str, Any]) -> Manifest:
    """Check a parsed manifest against the schema and its internal consistency."""
    version = obj.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
        raise unsupported_version(version, "manifest format version")
    try:
        manifest = Manifest.model_validate(obj)
    except (ValidationError, RecursionError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))[:200] or "manifest"
            reason = str(first.get("msg", "invalid"))[:200]
        else:
            where, reason = "manifest", "too deeply nested"
        raise ManifestError(
            f"Invalid TSSP package: manifest field {where!r} is invalid ({reason})", _FIX
        ) from None
    lora = manifest.lora
    short_names = sorted({m.rsplit(".", 1)[1] for m in manifest.modules})
    if short_names != lora.target_modules:
        raise ManifestError(
            "Invalid TSSP package: manifest target_modules do not match its module list", _FIX
        )
    if set(manifest.base_model.weight_shapes) != set(manifest.modules):
        raise ManifestError(
            "Invalid TSSP package: manifest base-model weight shapes do not cover exactly its "
            "modules",
            _FIX,
        )
    for name, mod in manifest.modules.items():
        if manifest.base_model.weight_shapes[name] != [mod.d_out, mod.d_in]:
            raise ManifestError(
                f"Invalid TSSP package: manifest module {name} disagrees with its base-model "
                "weight shape",
                _FIX,
            )
    return manifest
