"""The three ``EngineArgs`` wrappers: how stock vLLM learns TenSafe's flags and guards.

* ``add_cli_args``: vLLM's parser (``vllm serve``) gets the ``--enable-tensafe`` /
  ``--tensafe-*`` flags. vLLM loads general plugins before it builds its parser, so the flags
  exist in stock ``vllm serve``.
* ``from_cli_args``: the flags are written into ``TENSAFE_*`` (so the engine and worker
  processes vLLM spawns read the same settings), checked, and the arguments TenSafe cannot
  work with are refused in the first second, before vLLM loads anything.
* ``create_engine_config``: every route that builds an engine passes here (``vllm serve``,
  ``vllm.LLM``, ``AsyncLLM.from_engine_args``, the guide's API in vllm_tensafe/api/). When
  TenSafe is enabled it activates the hooks, turns on LoRA, and hands the finished config to
  the graph
  guard (graph_safety.py) before any engine process exists.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from vllm_tensafe.errors import ConfigError, TenSafeError
from vllm_tensafe.vllm import patches

logger = logging.getLogger("vllm_tensafe.cli_hooks")

HOOKS = (
    "engine_args.add_cli_args",
    "engine_args.from_cli_args",
    "engine_args.create_engine_config",
)
# Set on EngineArgs built from the command line: their refusals end the process with one line.
_FROM_CLI = "_tensafe_from_cli"
# Set on a Namespace built by the guide's API (entrypoints.serve_cli_args): raise, don't exit.
PYTHON_API = "_tensafe_python_api"


def install_cli_hooks() -> bool:
    """Install the three wrappers (at ``register()``, TenSafe enabled or not). Idempotent.

    Returns False when vLLM is not installed (the package then works as a library) or an
    entry does not match this vLLM; the latter is logged, and enabling TenSafe then fails
    with the table's message (``require_cli_hooks``).
    """
    try:
        importlib.import_module("vllm.engine.arg_utils")
    except ImportError:
        return False
    installed = True
    for name, factory in zip(
        HOOKS, (_wrap_add_cli_args, _wrap_from_cli_args, _wrap_create_engine_config), strict=True
    ):
        try:
            patches.replace(name, factory)
        except ConfigError as exc:
            installed = False
            logger.warning(
                "TenSafe cannot be enabled on this vLLM (its flags are not added): %s", exc
            )
    return installed


def require_cli_hooks() -> None:
    """Refuse to enable TenSafe without the wrappers: the Python API is guarded only there."""
    if all(patches.is_installed(name) for name in HOOKS):
        return
    install_cli_hooks()
    patches.check_names(HOOKS)
    missing = [name for name in HOOKS if not patches.is_installed(name)]
    if missing:
        raise ConfigError(
            f"the EngineArgs hooks {', '.join(missing)} are not installed, so engine configs "
            "would be built without TenSafe's graph guard",
            "make sure the vllm-tensafe plugin is loaded (VLLM_PLUGINS unset, or naming tensafe)",
        )


def _wrap_add_cli_args(original: Any) -> Any:
    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm_tensafe.vllm.cli_args import add_tensafe_args

        parser = original(parser, *args, **kwargs)
        add_tensafe_args(parser)
        return parser

    return add_cli_args


def _wrap_from_cli_args(original: Any) -> Any:
    def from_cli_args(cls: type, args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
        from vllm_tensafe import plugin
        from vllm_tensafe.vllm.cli_args import apply_cli_args
        from vllm_tensafe.vllm.graph_safety import precheck_engine_args

        plugin._announce()
        try:
            settings = apply_cli_args(args)
            engine_args = original(cls, args, *rest, **kwargs)
            if settings is not None:
                precheck_engine_args(engine_args)
        except TenSafeError as exc:
            if getattr(args, PYTHON_API, False):
                raise
            _exit_with(exc)
        if not getattr(args, PYTHON_API, False):
            setattr(engine_args, _FROM_CLI, True)
        return engine_args

    return from_cli_args


def _wrap_create_engine_config(original: Any) -> Any:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm_tensafe import plugin
        from vllm_tensafe.vllm import graph_safety

        plugin._announce()
        try:
            enabled = _activate_from_environment(self)
            if enabled:
                graph_safety.precheck_engine_args(self)
                requested = graph_safety.requested_mode(self)
            config = original(self, *args, **kwargs)
            if enabled:
                graph_safety.secure_vllm_config(config, requested)
        except TenSafeError as exc:
            if getattr(self, _FROM_CLI, False):
                _exit_with(exc)
            logger.error("%s", exc)
            raise
        return config

    return create_engine_config


def _activate_from_environment(engine_args: Any) -> bool:
    """The Python API parses no flags: TenSafe is on when ``TENSAFE_ENABLED`` says so."""
    from vllm_tensafe import plugin
    from vllm_tensafe.settings import any_tensafe_environment, load_settings

    if not any_tensafe_environment() or not (settings := load_settings()).enabled:
        return False
    plugin.activate()
    from vllm_tensafe.attestation.client import startup_gate

    startup_gate(settings)  # require_attestation: no TPM or a refused quote stops start-up
    if not engine_args.enable_lora:
        logger.info("TENSAFE_ENABLED turns on enable_lora (encrypted adapters are LoRAs)")
        engine_args.enable_lora = True
    return True


def _exit_with(exc: TenSafeError) -> None:
    # One clear line and a non-zero exit, before vLLM spends a minute starting up.
    logger.error("%s", exc)
    sys.stderr.write(f"vllm-tensafe: error: {exc}\n")
    raise SystemExit(2) from None
