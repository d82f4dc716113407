"""vLLM entry point (``vllm.general_plugins``): ``register()``.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers),
sometimes more than once, so it is idempotent. It always does two cheap things: route the
plugin's log records through vLLM's log handler, and wrap vLLM's ``EngineArgs``
(vllm_tensafe/vllm/cli_hooks.py) so the stock argument parser learns the ``--enable-tensafe`` /
``--tensafe-*`` flags (vllm_tensafe/vllm/cli_args.py; without that, the flag that turns TenSafe
on could not exist) and every engine build is guarded. Everything else (TenSEAL, the LoRA
loader and layer hooks) is installed only when TenSafe is enabled, by flag or
``TENSAFE_ENABLED``. This module itself imports no vLLM: everything vLLM-specific is in
vllm_tensafe/vllm/.
"""

from __future__ import annotations

import logging
import os

from vllm_tensafe.observability import process_role
from vllm_tensafe.settings import enabled_in_environment, load_settings

logger = logging.getLogger("vllm_tensafe.plugin")

_registered = False
_activated = False


def register() -> None:
    """Entry point for ``vllm.general_plugins``. Idempotent and cheap when not enabled."""
    global _registered
    if not _registered:
        _registered = True
        from vllm_tensafe.vllm.cli_hooks import install_cli_hooks

        install_cli_hooks()
        _announce()
    if enabled_in_environment():
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
        process_role(),
        settings.key_holder,
        settings.key_holder_timeout,
        "on" if settings.verify_signature else "OFF",
    )
    if not settings.verify_signature:
        logger.warning(
            "TENSAFE_VERIFY_SIGNATURE=false: packages are loaded WITHOUT signature checks; "
            "anyone who can write a .tssp file can change what this server answers"
        )


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
    logger.info("vllm-tensafe plugin registered in process %d (%s)", os.getpid(), process_role())


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
