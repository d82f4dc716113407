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

from vllm_tensafe.containment import resolve_inside
from vllm_tensafe.errors import AdapterPathRefusedError, ConfigError, TenSafeError
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
        # The name is the client's: log a bounded prefix of it, never all of it.
        logger.warning("Refusing adapter name %r: not a plain adapter name", name[:80])
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
        # Runtime loads and unloads stay inside the folder: required, never optional here.
        patches.replace("serving.load_lora_adapter", _wrap_load_lora_adapter)
        patches.replace("serving.unload_lora_adapter", _wrap_unload_lora_adapter)

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
        contained = get_runtime().settings
        # vLLM loads --lora-modules through this method too: the operator's own list, exempt.
        static = {(m.name, m.path) for m in getattr(self, "static_lora_modules", None) or ()}
        if (
            contained.adapter_dir is not None
            and request.lora_name
            and request.lora_path
            and (request.lora_name, request.lora_path) not in static
        ):
            try:
                path = runtime_adapter_path(contained, request.lora_name, request.lora_path)
            except AdapterPathRefusedError as exc:
                return _refusal(exc)
            # Load what was checked: the real path inside the folder, no link, no "..".
            request = request.model_copy(update={"lora_path": str(path)})
        if is_tssp_path(request.lora_path):
            error = _check_or_error(request.lora_path, self.model_config.hf_config)
            if error is not None:
                return error
        return await original(self, request, *args, **kwargs)

    return load_lora_adapter


def _wrap_unload_lora_adapter(original: Any) -> Any:
    async def unload_lora_adapter(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        contained = get_runtime().settings
        loaded = self.lora_requests.get(request.lora_name) if request.lora_name else None
        if contained.adapter_dir is not None and loaded is not None:
            try:
                runtime_adapter_path(contained, loaded.lora_name, loaded.lora_path)
            except AdapterPathRefusedError:
                return _refusal(
                    AdapterPathRefusedError(
                        f"adapter {request.lora_name!r} was not loaded from the adapter folder "
                        "(--tensafe-adapter-dir), and only adapters from there are unloaded "
                        "at runtime",
                        "restart the server without it in --lora-modules to remove it",
                    )
                )
        return await original(self, request, *args, **kwargs)

    return unload_lora_adapter


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


def runtime_adapter_path(settings: TenSafeSettings, name: str, lora_path: str) -> Path:
    """What ``/v1/load_lora_adapter`` may load for (``name``, ``lora_path``) when
    ``TENSAFE_ADAPTER_DIR`` is set: the real path inside that folder, a ``.tssp`` package
    unless plaintext adapters are allowed. Raises AdapterPathRefusedError, whose message is
    the same for every path outside the folder (nothing outside is looked at)."""
    assert settings.adapter_dir is not None
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise AdapterPathRefusedError(
            "lora_name must be a plain adapter name: 1 to 128 letters, digits, '_', '-' or "
            "'.', starting with a letter or digit, without '..'",
            "choose such a name",
        )
    path = resolve_inside(settings.adapter_dir, lora_path)
    if path is None:
        raise AdapterPathRefusedError(
            "lora_path must name an adapter inside the adapter folder "
            "(--tensafe-adapter-dir); paths outside it, and links leading out of it, are "
            "refused",
            "copy the adapter into that folder and pass its path relative to the folder",
        )
    if not is_tssp_path(path) and not settings.allow_plaintext_lora:
        raise AdapterPathRefusedError(
            "this server loads only encrypted .tssp packages at runtime, not plaintext "
            "LoRA adapters",
            "pack the adapter (vllm-tensafe pack), or allow plaintext adapters from the "
            "folder with --tensafe-allow-plaintext-lora / TENSAFE_ALLOW_PLAINTEXT_LORA=true",
        )
    return path


def _refusal(exc: AdapterPathRefusedError) -> Any:
    create_error_response = patches.resolve("create_error_response")
    logger.warning("Refused runtime adapter request: %s", exc.cause)
    return create_error_response(
        message=str(exc), err_type="PermissionDenied", status_code=HTTPStatus.FORBIDDEN
    )


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
