"""Everything that touches vLLM internals lives in this folder (one place per vLLM upgrade)."""

from __future__ import annotations

from vllm_tensafe.settings import TenSafeSettings


def install(settings: TenSafeSettings) -> None:
    """Install the TenSafe hooks into this process's vLLM classes. Idempotent."""
    from vllm_tensafe.vllm.failures import (
        ensure_run_dir,
        install_api_error_hook,
        install_engine_core_hook,
    )
    from vllm_tensafe.vllm.layers import install_layer_hooks
    from vllm_tensafe.vllm.loader import install_loader
    from vllm_tensafe.vllm.punica import install_no_lora_fix
    from vllm_tensafe.vllm.serving import install_serving_hooks
    from vllm_tensafe.vllm.status_route import install_worker_status

    ensure_run_dir()
    install_no_lora_fix()
    install_loader()
    install_layer_hooks()
    install_serving_hooks(settings)
    install_engine_core_hook()
    install_api_error_hook()
    install_worker_status()
