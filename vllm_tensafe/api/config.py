"""The guide's ``TenSafeVLLMConfig``, validated, and what it gives vLLM.

Configuration reaches vLLM's engine and worker processes the way it does for ``vllm serve``:
through ``TENSAFE_*`` variables (``apply_environment``). ``to_engine_args()`` is vLLM's own
``AsyncEngineArgs``. ``require_attestation=True`` is TPM attestation to the remote key holder
(docs/attestation.md); without a TPM key and a remote key holder configured the config
refuses with a ``ConfigError`` instead of pretending.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.settings import TenSafeSettings, config_error_from, env_name, split_list

if TYPE_CHECKING:
    from vllm_tensafe.tssp import TsspPackage

logger = logging.getLogger("vllm_tensafe.api")

# vLLM's LoRAConfig accepts only these max_lora_rank values (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ATTESTATION_REFUSAL = (
    "require_attestation=True: this host proves its boot state with a TPM 2.0 quote to the "
    "remote key holder, which checks it against its attestation policy; {missing} not "
    "configured (docs/attestation.md). Set key_holder='remote', key_holder_url, "
    "key_holder_token_file and tpm_ak (the key `vllm-tensafe attestation enrol` persisted), "
    "or require_attestation=False"
)

# Fields of AsyncEngineArgs that the config sets itself; engine_kwargs may not override them.
_MANAGED_ENGINE_FIELDS = frozenset(
    {
        "model",
        "tokenizer",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "max_num_seqs",
        "block_size",
        "dtype",
        "enable_lora",
        "max_lora_rank",
    }
)


@dataclass(frozen=True)
class _PackageFacts:
    """What the config compares and sizes with; the package itself is not kept."""

    path: str
    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    signer_key_id: str | None


class TenSafeVLLMConfig(BaseModel):
    """The guide's ``TenSafeVLLMConfig``, validated. Unknown fields are refused.

    Fields left at None (trusted_keys empty) leave the matching ``TENSAFE_*`` variable in
    charge, as an unset ``vllm serve`` flag does.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model: str = Field(min_length=1, description="Hugging Face model id or local folder")
    tokenizer: str | None = None
    # hardware
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # The guide's default. None lets vLLM take the model's own maximum.
    max_model_len: int | None = Field(default=4096, ge=1)
    # HE-LoRA
    enable_he_lora: bool = True
    he_lora_adapter_path: str | None = None
    he_lora_rank: int | None = Field(default=None, ge=1)
    he_lora_alpha: float | None = Field(default=None, gt=0)
    he_lora_target_modules: list[str] | None = None
    # serving
    max_num_seqs: int = Field(default=256, ge=1)
    # The guide's default was 16; None lets vLLM choose per platform (16 on GPUs; its CPU
    # attention accepts only multiples of 32 and refuses 16).
    block_size: int | None = Field(default=None, ge=1)
    # privacy
    verify_tssp_signature: bool = True
    require_attestation: bool = False
    # what the plugin needs and the guide lacked
    trusted_keys: list[str] = Field(default_factory=list)
    he_secret: str | None = None
    key_holder: Literal["local", "remote"] = "local"
    key_holder_url: str | None = None
    key_holder_token_file: str | None = None
    tpm_tcti: str | None = None
    tpm_ak: str | None = None
    dtype: str = "auto"
    adapter_name: str = Field(default="he-lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    # Anything else AsyncEngineArgs takes (enforce_eager, max_loras, ...), passed unchanged.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

    _facts: _PackageFacts | None = PrivateAttr(None)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @field_validator("he_lora_adapter_path")
    @classmethod
    def _tssp_path(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".tssp"):
            raise ValueError(
                f"{value!r} is not a .tssp package; vllm-tensafe serves encrypted adapters "
                "packed with `vllm-tensafe pack` (plaintext PEFT folders go to vLLM directly)"
            )
        return value

    @field_validator("engine_kwargs")
    @classmethod
    def _engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        managed = sorted(_MANAGED_ENGINE_FIELDS & set(value))
        if managed:
            raise ValueError(
                f"engine_kwargs sets {', '.join(managed)}, which the config sets itself; "
                "use the config fields of those names"
            )
        return value

    @model_validator(mode="after")
    def _attestation_configured(self) -> TenSafeVLLMConfig:
        # Whether the TPM answers and the key holder accepts its quote is checked at start-up
        # (vllm_tensafe.attestation.client.startup_gate); here, that both are configured.
        if not self.require_attestation:
            return self
        missing = [
            what
            for what, present in (
                ("key_holder='remote'", self.key_holder == "remote"),
                ("key_holder_url", self.key_holder_url or os.environ.get("TENSAFE_KEY_HOLDER_URL")),
                (
                    "key_holder_token_file",
                    self.key_holder_token_file or os.environ.get("TENSAFE_KEY_HOLDER_TOKEN_FILE"),
                ),
                (
                    "tpm_ak (the host's TPM attestation key)",
                    self.tpm_ak or os.environ.get("TENSAFE_TPM_AK"),
                ),
            )
            if not present
        ]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ValueError(ATTESTATION_REFUSAL.format(missing=f"{', '.join(missing)} {verb}"))
        return self

    @model_validator(mode="after")
    def _coherent(self) -> TenSafeVLLMConfig:
        if self.he_lora_adapter_path and not self.enable_he_lora:
            raise ValueError(
                "he_lora_adapter_path is set but enable_he_lora=False; an encrypted adapter "
                "cannot be served without HE-LoRA (set enable_he_lora=True or drop the path)"
            )
        return self

    # --- the plugin's settings ------------------------------------------------------------

    def tensafe_environment(self) -> dict[str, str]:
        """The ``TENSAFE_*`` variables this config sets (unset fields are left out)."""
        env = {
            env_name("enabled"): "true" if self.enable_he_lora else "false",
            env_name("verify_signature"): "true" if self.verify_tssp_signature else "false",
            env_name("key_holder"): self.key_holder,
        }
        if self.require_attestation:
            # Only ever switched on here: a default False never overrides the environment's true.
            env[env_name("require_attestation")] = "true"
        optional = {
            "trusted_keys": ",".join(self.trusted_keys) if self.trusted_keys else None,
            "he_secret": self.he_secret,
            "key_holder_url": self.key_holder_url,
            "key_holder_token_file": self.key_holder_token_file,
            "tpm_tcti": self.tpm_tcti,
            "tpm_ak": self.tpm_ak,
        }
        env.update({env_name(k): v for k, v in optional.items() if v is not None})
        return env

    def to_settings(self) -> TenSafeSettings:
        """The plugin settings this config gives, over the current ``TENSAFE_*`` variables."""
        environment = self.tensafe_environment()
        # Field name -> value (of each field's own type; pydantic validates them).
        overrides: dict[str, Any] = {
            name: split_list(value) if name == "trusted_keys" else value
            for name in TenSafeSettings.model_fields
            if (value := environment.get(env_name(name))) is not None
        }
        # Passed as init values they win over the environment, as apply_environment will.
        try:
            return TenSafeSettings(**overrides)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    def apply_environment(self) -> TenSafeSettings:
        """Write the ``TENSAFE_*`` variables: vLLM's spawned processes read settings there.

        Validates the result first, so a bad combination (no trusted keys, no key holder) is
        one ConfigError here rather than an engine process dying later.
        """
        settings = self.to_settings()
        os.environ.update(self.tensafe_environment())
        return settings

    # --- the package ------------------------------------------------------------------------

    def check_package(self) -> TsspPackage | None:
        """Open the adapter package as the worker will, and compare it with this config.

        Verifies signature, trusted signer, digests and the base-model binding (when ``model``
        is a local folder), then refuses any contradiction between he_lora_rank /
        he_lora_alpha / he_lora_target_modules and the package. Returns the package, or None
        when no adapter is configured.
        """
        if not self.he_lora_adapter_path:
            return None
        from vllm_tensafe.tssp import open_configured
        from vllm_tensafe.tssp.base_model import local_model_config

        package = open_configured(
            self.he_lora_adapter_path,
            self.to_settings(),
            base_model_config=local_model_config(self.model),
        )
        self._compare(package.rank, package.alpha, package.target_modules)
        self._facts = _PackageFacts(
            path=self.he_lora_adapter_path,
            name=package.name,
            rank=package.rank,
            alpha=package.alpha,
            target_modules=tuple(package.target_modules),
            signer_key_id=package.signer_key_id,
        )
        return package

    def _compare(self, rank: int, alpha: float, targets: list[str]) -> None:
        path = self.he_lora_adapter_path
        if self.he_lora_rank is not None and self.he_lora_rank != rank:
            raise ConfigError(
                f"he_lora_rank={self.he_lora_rank} but the package {path} has rank {rank}",
                f"set he_lora_rank={rank} or leave it None (the package's rank is used)",
            )
        if self.he_lora_alpha is not None and not math.isclose(
            self.he_lora_alpha, alpha, rel_tol=1e-6
        ):
            raise ConfigError(
                f"he_lora_alpha={self.he_lora_alpha:g} but the package {path} has alpha {alpha:g}",
                f"set he_lora_alpha={alpha:g} or leave it None (the package's alpha is used)",
            )
        if self.he_lora_target_modules is not None and set(self.he_lora_target_modules) != set(
            targets
        ):
            raise ConfigError(
                f"he_lora_target_modules={sorted(self.he_lora_target_modules)} but the package "
                f"{path} targets {sorted(targets)}",
                "set he_lora_target_modules to the package's modules or leave it None "
                "(the modules are fixed when the adapter is packed)",
            )

    def _package_facts(self) -> _PackageFacts | None:
        path = self.he_lora_adapter_path
        if not path:
            return None
        if self._facts is None or self._facts.path != path:
            self.check_package()
        return self._facts

    # --- vLLM objects -----------------------------------------------------------------------

    def max_lora_rank(self) -> int:
        """The smallest rank vLLM accepts that holds the adapter (its LoRA buffers' size)."""
        facts = self._package_facts()
        rank = self.he_lora_rank or (facts.rank if facts else 8)
        for allowed in VLLM_LORA_RANKS:
            if allowed >= rank:
                return allowed
        raise ConfigError(
            f"the adapter's rank {rank} is above vLLM's largest max_lora_rank "
            f"{VLLM_LORA_RANKS[-1]}",
            "pack an adapter of a lower rank",
        )

    def to_engine_args(self) -> Any:
        """vLLM's own ``AsyncEngineArgs`` for this config."""
        from vllm_tensafe.vllm import entrypoints

        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "dtype": self.dtype,
            "enable_lora": self.enable_he_lora,
            **self.engine_kwargs,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if self.enable_he_lora:
            kwargs["max_lora_rank"] = self.max_lora_rank()
        return entrypoints.async_engine_args(**kwargs)

    def lora_request(self) -> Any:
        """The ``LoRARequest`` of the configured encrypted adapter (None without one)."""
        if not self.he_lora_adapter_path:
            return None
        from vllm_tensafe.vllm import entrypoints

        return entrypoints.lora_request(self.adapter_name, 1, self.he_lora_adapter_path)


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ()))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        return ConfigError(
            f"TenSafeVLLMConfig has no field {loc!r}",
            "see the fields in docs/configuration.md (Python API); other vLLM engine "
            "arguments go in engine_kwargs",
        )
    where = f"TenSafeVLLMConfig.{loc}: " if loc else "TenSafeVLLMConfig: "
    if msg.startswith("require_attestation=True"):
        cause, _, fix = msg.partition(". Set ")
        return ConfigError(cause, f"set {fix}")
    return ConfigError(f"{where}{msg}", "see docs/configuration.md (Python API)")
