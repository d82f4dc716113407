"""The original TenSafe guide's Python API, mapped onto stock vLLM objects.

* ``config``    ``TenSafeVLLMConfig``: the guide's fields (plus what the plugin needs and the
                guide lacked), validated; ``to_engine_args()`` gives vLLM's own
                ``AsyncEngineArgs``
* ``engine``    ``TenSafeAsyncEngine``: vLLM's own ``AsyncLLM`` serving the encrypted adapter
* ``server``    ``TenSafeVLLMServer``: vLLM's own OpenAI-compatible app, built by vLLM
* ``packages``  ``TSSPService``: load and verify packages (``vllm_tensafe.tssp`` underneath)

There is no second engine and no second server: the encrypted adapter is an ordinary vLLM
LoRA whose path ends in ``.tssp``, handled by the plugin's hooks. Everything vLLM-specific is
reached through vllm_tensafe/vllm/entrypoints.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_tensafe._lazy import lazy_exports

if TYPE_CHECKING:
    from vllm_tensafe.api.config import TenSafeVLLMConfig
    from vllm_tensafe.api.engine import TenSafeAsyncEngine
    from vllm_tensafe.api.packages import PackageHandle, TSSPService
    from vllm_tensafe.api.server import TenSafeVLLMServer

__all__ = [
    "PackageHandle",
    "TSSPService",
    "TenSafeAsyncEngine",
    "TenSafeVLLMConfig",
    "TenSafeVLLMServer",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PackageHandle": "packages",
        "TSSPService": "packages",
        "TenSafeAsyncEngine": "engine",
        "TenSafeVLLMConfig": "config",
        "TenSafeVLLMServer": "server",
    },
    globals(),
)
