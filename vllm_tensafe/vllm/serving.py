"""API-server side: refuse bad packages with HTTP 400 and resolve ``model: NAME`` to NAME.tssp.

The worker verifies every package again when it loads it; checking here first lets the user
read the TSSP error (cause and fix) as a 400 instead of an opaque 500 from the engine.
"""

from __future__ import annotations

import logging
import os
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import ConfigError, TenSafeError
from vllm_tensafe.settings import TenSafeSettings
from vllm_tensafe.vllm import patches
from vllm_tensafe.vllm.loader import TSSP_SUFFIX, is_tssp_path, text_config_dict
from vllm_tensafe.vllm.runtime import get_runtime

logger = logging.getLogger("vllm_tensafe.serving")

RESOLVER_NAME = "TenSafe TSSP resolver"
# Adapter names that can never be read as a path: no separators, no "..", no leading dot.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_package_for_serving(path: str, hf_config: Any) -> None:
    """Open the package as the worker will (signature, trust, digests, base binding)."""
    get_runtime().open_package(path, text_config_dict(hf_config))


def resolve_adapter_path(adapter_dir: Path, name: str) -> Path | None:
    """``adapter_dir/NAME.tssp`` if NAME is a plain name and the file stays inside the folder.

    NAME comes from the client. vLLM 0.32's own filesystem resolver joins it into a path
    unchecked; here a separator, "..", an absolute path or a symlink leading out is refused.
    """
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        logger.warning("Refusing adapter name %r: not a plain adapter name", name)
        return None
    root = adapter_dir.resolve()
    candidate = adapter_dir / f"{name}{TSSP_SUFFIX}"
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        return None
    if resolved.parent != root or not resolved.is_file():
        logger.warning("Refusing adapter %r: %s leads outside %s", name, candidate, root)
        return None
    return resolved


def install_serving_hooks(settings: TenSafeSettings) -> None:
    """API-server checks of ``.tssp`` paths, and the ``TENSAFE_ADAPTER_DIR`` resolver.

    The resolver is required when ``TENSAFE_ADAPTER_DIR`` is set; the early checks are
    optional (without them the worker still refuses a bad package, as an HTTP 500).
    """
    if settings.adapter_dir is not None:
        if not patches.env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            raise ConfigError(
                "--tensafe-adapter-dir / TENSAFE_ADAPTER_DIR needs vLLM's on-demand adapter "
                "loading, which is off",
                "set VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 in the server's environment",
            )
        patches.resolve("create_error_response")
        _register_resolver(settings.adapter_dir)
        patches.replace("serving.resolve_lora", _wrap_resolve_lora)

    def install_load_check() -> None:
        patches.resolve("create_error_response")
        patches.replace("serving.load_lora_adapter", _wrap_load_lora_adapter)

    patches.optional(
        "serving.load_lora_adapter",
        install_load_check,
        "the API server's check of packages sent to /v1/load_lora_adapter (the worker still "
        "refuses a bad package, but as an opaque HTTP 500 instead of a 400 naming the cause)",
    )


def _wrap_load_lora_adapter(original: Any) -> Any:
    async def load_lora_adapter(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if is_tssp_path(request.lora_path):
            error = _check_or_error(request.lora_path, self.model_config.hf_config)
            if error is not None:
                return error
        return await original(self, request, *args, **kwargs)

    return load_lora_adapter


def _wrap_resolve_lora(original: Any) -> Any:
    async def resolve_lora(self: Any, lora_name: str, *args: Any, **kwargs: Any) -> Any:
        adapter_dir = get_runtime().settings.adapter_dir
        if adapter_dir is not None and lora_name not in self.lora_requests:
            path = resolve_adapter_path(adapter_dir, lora_name)
            if path is not None:
                error = _check_or_error(str(path), self.model_config.hf_config)
                if error is not None:
                    return error
        return await original(self, lora_name, *args, **kwargs)

    return resolve_lora


def _check_or_error(path: str, hf_config: Any) -> Any:
    create_error_response = patches.resolve("create_error_response")

    if not os.path.isfile(path):
        return create_error_response(
            message=f"TSSP package {path} does not exist or is not a file",
            err_type="NotFoundError",
            status_code=HTTPStatus.NOT_FOUND,
        )
    try:
        check_package_for_serving(path, hf_config)
    except TenSafeError as exc:
        logger.error("Refused TSSP package %s: %s", path, exc)
        return create_error_response(
            message=str(exc), err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
        )
    return None


def _register_resolver(adapter_dir: Path) -> None:
    lora_request_cls = patches.resolve("LoRARequest")
    resolver_base = patches.resolve("LoRAResolver")
    registry = patches.resolve("LoRAResolverRegistry")

    if RESOLVER_NAME in registry.get_supported_resolvers():
        return

    class TsspResolver(resolver_base):  # type: ignore[misc,valid-type]
        """Resolves ``model: NAME`` to ``TENSAFE_ADAPTER_DIR/NAME.tssp``."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            path = resolve_adapter_path(adapter_dir, lora_name)
            if path is None:
                return None
            # vLLM's serving layer overwrites lora_int_id with its own counter.
            return lora_request_cls(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    registry.register_resolver(RESOLVER_NAME, TsspResolver())
