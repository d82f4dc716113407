"""The ``--enable-tensafe`` / ``--tensafe-*`` flags of ``vllm serve``, and what they do.

Each flag is a field of ``TenSafeSettings`` (settings.py): ``add_tensafe_args`` adds them to
vLLM's parser (through the ``EngineArgs.add_cli_args`` wrapper in cli_hooks.py) and to
``vllm-tensafe flags``; ``apply_cli_args`` writes the given ones into ``TENSAFE_*``, so the
engine and worker processes vLLM spawns build the same settings, then checks what can be
checked before vLLM spends a minute starting. This module imports no vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os

from vllm_tensafe.errors import TenSafeError
from vllm_tensafe.settings import (
    ENV_ONLY,
    TenSafeSettings,
    any_tensafe_environment,
    env_name,
    flag_name,
    load_settings,
)

logger = logging.getLogger("vllm_tensafe.plugin")

_GROUP_TITLE = "TenSafe (encrypted LoRA adapters)"
_GROUP_DESCRIPTION = (
    "Serve LoRA adapters packed as signed, CKKS-encrypted TSSP packages "
    "(vllm-tensafe pack ...). Pass them like any adapter: --lora-modules NAME=NAME.tssp. "
    "Every flag can also be set with the TENSAFE_* variable named in its help; a flag wins "
    "over the variable. See docs/configuration.md."
)


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
        if field.annotation is bool:
            # A switch that also takes a value: --tensafe-x alone means true.
            group.add_argument(
                flag_name(name),
                dest=_dest(name),
                nargs="?",
                const="true",
                default=argparse.SUPPRESS,
                metavar="{true,false}",
                help=help_text,
            )
            continue
        metavar = {
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
    if not any_tensafe_environment():
        return None
    settings = load_settings()  # validates every TENSAFE_* value, enabled or not
    if not settings.enabled:
        return None
    if hasattr(args, "enable_lora") and not args.enable_lora:
        logger.info("--enable-tensafe turns on --enable-lora (encrypted adapters are LoRAs)")
        args.enable_lora = True
    from vllm_tensafe.plugin import activate

    activate()
    check_static_packages(args)
    if settings.key_holder == "remote":
        # Health, protocol, TLS (CA, subjectAltName), token and the packages' keys, before
        # vLLM spends a minute loading the model.
        from vllm_tensafe.keyholder.remote import check_key_holder

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
    from vllm_tensafe.tssp.base_model import local_model_config
    from vllm_tensafe.vllm.runtime import get_runtime

    config = local_model_config(getattr(args, "model_tag", None) or getattr(args, "model", None))
    for module in modules:
        try:
            get_runtime().open_package(module.path, config)
        except TenSafeError as exc:
            raise type(exc)(
                f"--lora-modules {module.name}={module.path}: {exc.cause}", exc.fix
            ) from None
        logger.info("Verified encrypted adapter %s=%s", module.name, module.path)
