"""Everything that touches vLLM internals lives in this folder (one place per vLLM upgrade).

``patches.py`` is the table of every vLLM attribute the plugin replaces, adds or reads;
``versions.py`` the gate (the vLLM versions this plugin is tested with); ``graph_safety.py``
keeps CUDA graphs from replaying the HE op without running it.
"""

from __future__ import annotations

from vllm_tensafe.settings import TenSafeSettings


def install(settings: TenSafeSettings) -> None:
    """Install the TenSafe hooks into this process's vLLM classes. Idempotent.

    Refuses (ConfigError) an untested vLLM, a table entry that is missing or changed, and
    vLLM settings under which the encrypted delta would be skipped. Optional hooks that
    cannot be installed log a warning naming what is off.
    """
    from vllm_tensafe.vllm import patches
    from vllm_tensafe.vllm.cli_hooks import require_cli_hooks
    from vllm_tensafe.vllm.failures import (
        ensure_run_dir,
        install_api_error_hook,
        install_engine_core_hook,
    )
    from vllm_tensafe.vllm.graph_safety import refuse_dual_stream
    from vllm_tensafe.vllm.layers import install_layer_hooks
    from vllm_tensafe.vllm.loader import install_loader
    from vllm_tensafe.vllm.punica import install_no_lora_fix
    from vllm_tensafe.vllm.serving import install_serving_hooks
    from vllm_tensafe.vllm.status_route import install_worker_status
    from vllm_tensafe.vllm.versions import check_vllm_version

    check_vllm_version()
    refuse_dual_stream()
    # The Python API (vllm.LLM, AsyncLLM) is guarded only through these.
    require_cli_hooks()
    patches.check_names(["VllmConfig", "CompilationConfig", "CUDAGraphMode", "CompilationMode"])
    ensure_run_dir()
    install_no_lora_fix()
    install_loader()
    install_layer_hooks()
    install_serving_hooks(settings)
    install_engine_core_hook()
    install_api_error_hook()
    install_worker_status()
