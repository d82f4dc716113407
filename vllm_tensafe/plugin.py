"""vLLM entry point (``vllm.general_plugins``): ``register()``.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers),
sometimes more than once, so it is idempotent. It always does two cheap things: route the
plugin's log records through vLLM's log handler, and wrap vLLM's ``EngineArgs``
(vllm_tensafe/vllm/cli_hooks.py) so the stock argument parser learns the ``--enable-tensafe`` /
``--tensafe-*`` flags (without that, the flag that turns TenSafe on could not exist) and every
engine build is guarded. Everything else (TenSEAL, the LoRA loader and layer hooks) is installed
only when TenSafe is enabled, by flag or ``TENSAFE_ENABLED``. This module itself imports no
vLLM: everything vLLM-specific is in vllm_tensafe/vllm/.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from vllm_tensafe.errors import TenSafeError
from vllm_tensafe.settings import (
    ENV_ONLY,
    ENV_PREFIX,
    TenSafeSettings,
    env_name,
    flag_name,
    load_settings,
)

logger = logging.getLogger("vllm_tensafe.plugin")

_registered = False
_activated = False

_GROUP_TITLE = "TenSafe (encrypted LoRA adapters)"
_GROUP_DESCRIPTION = (
    "Serve LoRA adapters packed as signed, CKKS-encrypted TSSP packages "
    "(vllm-tensafe pack ...). Pass them like any adapter: --lora-modules NAME=NAME.tssp. "
    "Every flag can also be set with the TENSAFE_* variable named in its help; a flag wins "
    "over the variable. See docs/configuration.md."
)


def register() -> None:
    """Entry point for ``vllm.general_plugins``. Idempotent and cheap when not enabled."""
    global _registered
    if not _registered:
        _registered = True
        from vllm_tensafe.vllm.cli_hooks import install_cli_hooks

        install_cli_hooks()
        _announce()
    if _env_enabled():
        activate()


def activate() -> None:
    """Install the runtime hooks in this process. Called once TenSafe is known to be on."""
    global _activated
    if _activated:
        return
    settings = load_settings()
    if not settings.enabled:
        return
    _activated = True
    from vllm_tensafe.vllm import install

    install(settings)
    from vllm_tensafe.observability import setup_from_settings

    setup_from_settings(settings)
    logger.info(
        "TenSafe enabled in process %d (%s): key holder %s (timeout %.1fs), signature checks %s",
        os.getpid(),
        _process_role(),
        settings.key_holder,
        settings.key_holder_timeout,
        "on" if settings.verify_signature else "OFF",
    )
    if not settings.verify_signature:
        logger.warning(
            "TENSAFE_VERIFY_SIGNATURE=false: packages are loaded WITHOUT signature checks; "
            "anyone who can write a .tssp file can change what this server answers"
        )


def _env_enabled() -> bool:
    # Cheap pre-check so that a disabled plugin never builds settings or imports TenSEAL.
    return os.environ.get(env_name("enabled"), "").strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
        "t",
        "y",
    }


def _any_tensafe_env() -> bool:
    return any(key.startswith(ENV_PREFIX) for key in os.environ)


def _process_role() -> str:
    import multiprocessing

    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    return "API server" if "serve" in sys.argv[1:2] else "main process"


_announced = False


def _announce() -> None:
    """Log the registration once vLLM's logging is set up in this process.

    vLLM configures logging at import in its engine and worker processes, but only after
    parsing the command line in the API server, which is after register() ran there.
    """
    global _announced
    if _announced or not _route_logs_through_vllm():
        return
    _announced = True
    logger.info("vllm-tensafe plugin registered in process %d (%s)", os.getpid(), _process_role())


def _route_logs_through_vllm() -> bool:
    """Give the ``vllm_tensafe`` logger vLLM's handler, so our records look like vLLM's."""
    vllm_logger = logging.getLogger("vllm")
    ours = logging.getLogger("vllm_tensafe")
    if not vllm_logger.handlers:
        return False
    for handler in vllm_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(vllm_logger.level or logging.INFO)
    ours.propagate = False
    return True


# --- CLI ------------------------------------------------------------------------------------


def add_tensafe_args(parser: argparse.ArgumentParser) -> None:
    """Add the TenSafe flags. An unset flag sets nothing (argparse.SUPPRESS), so TENSAFE_*
    stays in charge; the help names the setting's real default instead of "None"."""
    if any(action.dest == "enable_tensafe" for action in parser._actions):
        return
    group = parser.add_argument_group(_GROUP_TITLE, _GROUP_DESCRIPTION)
    for name, field in TenSafeSettings.model_fields.items():
        if name in ENV_ONLY:
            continue
        help_text = (
            f"{field.description} [env: {env_name(name)}; default: {_shown_default(name)}]"
        ).replace("%", "%%")
        if name == "enabled":
            group.add_argument(
                flag_name(name),
                dest="enable_tensafe",
                action="store_const",
                const="true",
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        metavar = {
            "verify_signature": "{true,false}",
            "allow_untested_vllm": "{true,false}",
            "key_holder": "{local,remote}",
            "profile": "{default,fast,precise}",
            "trusted_keys": "PUB[,PUB...]",
            "otlp_endpoint": "URL",
            "service_name": "NAME",
        }.get(name, name.upper().split("_")[-1])
        group.add_argument(
            flag_name(name),
            dest=_dest(name),
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=help_text,
        )


def _shown_default(name: str) -> str:
    default = TenSafeSettings.model_fields[name].get_default(call_default_factory=True)
    if default in (None, []):
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def _dest(field: str) -> str:
    return "enable_tensafe" if field == "enabled" else f"tensafe_{field}"


def apply_cli_args(args: argparse.Namespace) -> TenSafeSettings | None:
    """Write the TenSafe flags into TENSAFE_* (so spawned processes agree), then validate.

    Returns the settings when TenSafe is enabled, else None. Raises ConfigError.
    """
    for name in TenSafeSettings.model_fields:
        value = None if name in ENV_ONLY else getattr(args, _dest(name), None)
        if value is not None:
            os.environ[env_name(name)] = str(value)
    if not _any_tensafe_env():
        return None
    settings = load_settings()  # validates every TENSAFE_* value, enabled or not
    if not settings.enabled:
        return None
    if hasattr(args, "enable_lora") and not args.enable_lora:
        logger.info("--enable-tensafe turns on --enable-lora (encrypted adapters are LoRAs)")
        args.enable_lora = True
    activate()
    check_static_packages(args)
    if settings.key_holder == "remote":
        # Health, protocol, TLS (CA, subjectAltName), token and the packages' keys, before
        # vLLM spends a minute loading the model.
        from vllm_tensafe.he.remote import check_key_holder

        check_key_holder(settings, [m.path for m in getattr(args, "lora_modules", None) or []])
    return settings


def check_static_packages(args: argparse.Namespace) -> None:
    """Open every ``--lora-modules NAME=PATH.tssp`` before vLLM spends a minute starting.

    The worker checks each package again when it loads it; this only moves the refusal of a
    bad package to the first second, as the last line the user reads.
    """
    from vllm_tensafe.vllm.loader import is_tssp_path

    modules = [m for m in getattr(args, "lora_modules", None) or [] if is_tssp_path(m.path)]
    if not modules:
        return
    from vllm_tensafe.vllm.runtime import get_runtime

    config = _local_model_config(getattr(args, "model_tag", None) or getattr(args, "model", None))
    for module in modules:
        try:
            get_runtime().open_package(module.path, config)
        except TenSafeError as exc:
            raise type(exc)(
                f"--lora-modules {module.name}={module.path}: {exc.cause}", exc.fix
            ) from None
        logger.info("Verified encrypted adapter %s=%s", module.name, module.path)


def _local_model_config(model: str | None) -> dict[str, Any] | None:
    """config.json of a local model folder (None for hub ids: the worker checks those)."""
    import json
    from pathlib import Path

    if not model or not (Path(model) / "config.json").is_file():
        return None
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config", config) if isinstance(config, dict) else None
