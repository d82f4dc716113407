"""The original TenSafe guide's Python API, mapped onto stock vLLM objects.

* ``TenSafeVLLMConfig``: the guide's fields (plus what the plugin needs and the guide lacked),
  validated; ``to_engine_args()`` gives vLLM's own ``AsyncEngineArgs``;
* ``TenSafeAsyncEngine``: vLLM's own ``AsyncLLM`` serving the configured encrypted adapter;
* ``TenSafeVLLMServer``: vLLM's own OpenAI-compatible FastAPI app, built with vLLM's builders;
* ``TSSPService``: load and verify packages (``vllm_tensafe.tssp`` underneath).

There is no second engine and no second server: the encrypted adapter is an ordinary vLLM
LoRA whose path ends in ``.tssp``, handled by the plugin's hooks. Configuration reaches vLLM's
engine and worker processes the way it does for ``vllm serve``: through ``TENSAFE_*``
variables (``apply_environment``). Where the guide promised something that does not exist
(attestation), the config refuses with a ``ConfigError`` instead of pretending.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
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

from vllm_tensafe.errors import ConfigError, TenSafeError, TsspError
from vllm_tensafe.settings import TenSafeSettings, config_error_from, env_name

if TYPE_CHECKING:
    from vllm_tensafe.tssp import PackageSummary, TsspPackage

logger = logging.getLogger("vllm_tensafe.compat")

__all__ = [
    "PackageHandle",
    "TSSPService",
    "TenSafeAsyncEngine",
    "TenSafeVLLMConfig",
    "TenSafeVLLMServer",
    "VerificationResult",
]

# vLLM's LoRAConfig accepts only these max_lora_rank values (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ATTESTATION_REFUSAL = (
    "require_attestation=True: attestation is not implemented; vllm-tensafe cannot prove the "
    "host runs in a TEE, and HE-LoRA in a plaintext forward pass does not stop the host from "
    "extracting the adapter's function (docs/threat-model.md). Set require_attestation=False, "
    "or use a TEE-based deployment (confidential computing with remote attestation) if the "
    "host itself must not learn the adapter"
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
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    # HE-LoRA
    enable_he_lora: bool = True
    he_lora_adapter_path: str | None = None
    he_lora_rank: int | None = Field(None, ge=1)
    he_lora_alpha: float | None = Field(None, gt=0)
    he_lora_target_modules: list[str] | None = None
    # serving
    max_num_seqs: int = Field(256, ge=1)
    # The guide's default was 16; None lets vLLM choose per platform (16 on GPUs; its CPU
    # attention accepts only multiples of 32 and refuses 16).
    block_size: int | None = Field(None, ge=1)
    # privacy
    verify_tssp_signature: bool = True
    require_attestation: bool = False
    # what the plugin needs and the guide lacked
    trusted_keys: list[str] = Field(default_factory=list)
    he_secret: str | None = None
    key_holder: Literal["local", "remote"] = "local"
    key_holder_url: str | None = None
    key_holder_token_file: str | None = None
    dtype: str = "auto"
    adapter_name: str = Field("he-lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    # Anything else AsyncEngineArgs takes (enforce_eager, max_loras, ...), passed unchanged.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

    _facts: _PackageFacts | None = PrivateAttr(None)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @field_validator("require_attestation")
    @classmethod
    def _no_attestation(cls, value: bool) -> bool:
        if value:
            raise ValueError(ATTESTATION_REFUSAL)
        return value

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
        optional = {
            "trusted_keys": ",".join(self.trusted_keys) if self.trusted_keys else None,
            "he_secret": self.he_secret,
            "key_holder_url": self.key_holder_url,
            "key_holder_token_file": self.key_holder_token_file,
        }
        env.update({env_name(k): v for k, v in optional.items() if v is not None})
        return env

    def to_settings(self) -> TenSafeSettings:
        """The plugin settings this config gives, over the current ``TENSAFE_*`` variables."""
        fields = TenSafeSettings.model_fields
        overrides = {
            name: value
            for name in fields
            if (value := self.tensafe_environment().get(env_name(name))) is not None
        }
        # Passed as init values they win over the environment, as apply_environment will.
        try:
            return TenSafeSettings(
                **{k: (v.split(",") if k == "trusted_keys" else v) for k, v in overrides.items()}
            )
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
        from vllm_tensafe import observability
        from vllm_tensafe.tssp import TrustStore, open_package

        settings = self.to_settings()
        trust = TrustStore.from_files(settings.trusted_keys) if settings.verify_signature else None
        try:
            package = open_package(
                self.he_lora_adapter_path,
                trust_store=trust,
                verify_signature=settings.verify_signature,
                base_model_config=_local_model_config(self.model),
            )
        except TenSafeError as exc:
            observability.record_tssp_verification(observability.verification_outcome(exc))
            raise
        observability.record_tssp_verification("ok")
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


def _local_model_config(model: str | None) -> dict[str, Any] | None:
    """config.json of a local model folder (None for hub ids: the worker checks those)."""
    if not model or not (Path(model) / "config.json").is_file():
        return None
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config", config) if isinstance(config, dict) else None


# --- the engine --------------------------------------------------------------------------------


class TenSafeAsyncEngine:
    """The guide's engine: vLLM's ``AsyncLLM`` serving the configured encrypted adapter.

    ``await engine.initialize()`` verifies the package (a bad one is refused before vLLM spends
    a minute starting), writes the settings into ``TENSAFE_*`` and builds the stock engine.
    ``engine.engine`` is that ``AsyncLLM``, for anything the guide's API does not cover.
    """

    def __init__(self, config: TenSafeVLLMConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.lora_request: Any = None

    async def initialize(self) -> None:
        if self.engine is not None:
            return
        self.config.check_package()
        self.config.apply_environment()
        from vllm_tensafe.plugin import register

        register()
        from vllm_tensafe.vllm import entrypoints

        self.engine = entrypoints.start_async_llm(self.config.to_engine_args())
        self.lora_request = self.config.lora_request()

    async def generate(
        self, prompt: Any, request_id: str, sampling_params: Any = None
    ) -> AsyncIterator[Any]:
        """Yield vLLM ``RequestOutput``s for ``prompt`` from the encrypted adapter.

        Without ``he_lora_adapter_path`` the base model answers (nothing else was asked for).
        A request whose adapter fails (key holder refused or unreachable) ends with vLLM's
        error for it; it is never answered from the base model instead.
        """
        if self.engine is None:
            raise ConfigError(
                "TenSafeAsyncEngine.generate was called before the engine was started",
                "await engine.initialize() first",
            )
        if sampling_params is None:
            from vllm_tensafe.vllm import entrypoints

            sampling_params = entrypoints.sampling_params()
        async for output in self.engine.generate(
            prompt, sampling_params, request_id, lora_request=self.lora_request
        ):
            yield output

    def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()

    async def __aenter__(self) -> TenSafeAsyncEngine:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()


# --- the server --------------------------------------------------------------------------------


class TenSafeVLLMServer:
    """The guide's server: vLLM's own OpenAI-compatible app, the adapter as a static LoRA.

    The app is built by vLLM's own builders (``build_async_engine_client``, ``build_app``,
    ``init_app_state``) inside a running event loop, because vLLM's engine client belongs to
    the loop that created it. So, unlike the guide's ``uvicorn.run(server.app)``::

        asyncio.run(TenSafeVLLMServer(config).serve(host="0.0.0.0", port=8000))

        # or, to mount or test the app yourself:
        async with TenSafeVLLMServer(config) as server:
            app = server.app

    The one change to vLLM's app: ``GET /health`` answers ``{"status": "healthy", "model":
    ...}`` as the guide documents (vLLM's own answers an empty 200); it still returns 503 when
    the engine is dead.
    """

    def __init__(self, config: TenSafeVLLMConfig, *, extra_cli_args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.extra_cli_args = tuple(extra_cli_args)
        self.args: Any = None
        self._app: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def app(self) -> Any:
        if self._app is None:
            raise ConfigError(
                "TenSafeVLLMServer.app does not exist before the engine is started",
                "use `await server.serve(host, port)`, or `async with server:` and then "
                "server.app (vLLM builds its app inside a running event loop)",
            )
        return self._app

    def cli_args(self) -> Any:
        """The ``vllm serve`` arguments for this config, parsed by vLLM's own parser."""
        from vllm_tensafe.plugin import register
        from vllm_tensafe.vllm import entrypoints

        register()  # the parser learns the TenSafe flags; our settings go by environment
        argv = [self.config.model, *self.extra_cli_args]
        request = self.config.lora_request()
        if request is not None:
            argv += ["--lora-modules", f"{request.lora_name}={request.lora_path}"]
        return entrypoints.serve_cli_args(argv, self.config.to_engine_args())

    async def build(self) -> Any:
        """Start vLLM's engine and build its app in the running loop. Idempotent."""
        if self._app is not None:
            return self._app
        from vllm_tensafe.vllm import entrypoints

        self.config.check_package()
        self.config.apply_environment()
        self.args = self.cli_args()
        stack = contextlib.AsyncExitStack()
        try:
            app = await entrypoints.build_app(self.args, stack, self.config.model)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._app = app
        return app

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._app = None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> TenSafeVLLMServer:
        await self.build()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve(self, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs: Any) -> None:
        """Build, then serve the app under uvicorn until SIGINT/SIGTERM; then stop the engine.

        Runs through vLLM's own ``serve_http``, as ``vllm serve`` does: on a signal it stops the
        engine first (draining or aborting requests per vLLM's shutdown settings), then uvicorn.
        """
        from vllm_tensafe.vllm import entrypoints

        app = await self.build()
        try:
            await entrypoints.serve_http(app, host, port, **uvicorn_kwargs)
        finally:
            await self.close()


# --- packages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageHandle:
    """A package file whose container structure was read. NOT verified: nothing in it is
    trusted until ``TSSPService.verify_package`` says so."""

    path: Path
    size_bytes: int
    format_version: int


@dataclass(frozen=True)
class VerificationResult:
    valid: bool
    reason: str | None = None
    summary: PackageSummary | None = None

    def __bool__(self) -> bool:
        return self.valid


class TSSPService:
    """The guide's ``TSSPService``: ``load_package`` then ``verify_package``.

    ``trusted_keys`` are the signers' ``.pub`` files (PEM); without them (here, per call, or in
    ``TENSAFE_TRUSTED_KEYS``) no package verifies. ``base_model`` (a local model folder) adds
    the base-model binding check.
    """

    def __init__(
        self,
        trusted_keys: list[str | os.PathLike[str]] | None = None,
        *,
        base_model: str | os.PathLike[str] | None = None,
    ) -> None:
        self.trusted_keys = list(trusted_keys or [])
        self.base_model = base_model

    def load_package(self, path: str | os.PathLike[str]) -> PackageHandle:
        """Read the container structure (raises a TsspError if it is not a TSSP file)."""
        from vllm_tensafe.tssp.format import ContainerReader

        with ContainerReader(path) as reader:
            return PackageHandle(
                path=Path(path),
                size_bytes=reader.layout.total_size,
                format_version=reader.layout.version,
            )

    def verify_package(
        self,
        package: PackageHandle | str | os.PathLike[str],
        trusted_keys: list[str | os.PathLike[str]] | None = None,
    ) -> VerificationResult:
        """Signature by a trusted key, every digest, the HE context, the base binding.

        Never raises for a bad package: ``valid`` is False and ``reason`` is the error's
        message (its cause and fix).
        """
        from vllm_tensafe import observability
        from vllm_tensafe.tssp import TrustStore, verify_package

        path = package.path if isinstance(package, PackageHandle) else Path(package)
        keys = list(trusted_keys or self.trusted_keys or _env_trusted_keys())
        try:
            trust = TrustStore.from_files(keys) if keys else None
            base = _local_model_config(os.fspath(self.base_model)) if self.base_model else None
            summary = verify_package(path, trust_store=trust, base_model_config=base)  # type: ignore[arg-type]
        except TsspError as exc:
            observability.record_tssp_verification(observability.verification_outcome(exc))
            return VerificationResult(False, str(exc))
        except TenSafeError as exc:  # e.g. an unreadable trusted key file
            return VerificationResult(False, str(exc))
        observability.record_tssp_verification("ok")
        return VerificationResult(True, None, summary)


def _env_trusted_keys() -> list[str]:
    value = os.environ.get(env_name("trusted_keys"), "")
    return [part.strip() for part in value.split(",") if part.strip()]
