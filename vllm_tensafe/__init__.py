"""vllm-tensafe: serve signed, CKKS-encrypted LoRA adapters (TSSP packages) with stock vLLM.

The original TenSafe guide's API (``TenSafeVLLMConfig``, ``TenSafeAsyncEngine``,
``TenSafeVLLMServer``, ``TSSPService``, ``setup_observability``; vllm_tensafe/api/) is exported
from here. Names are resolved on first use, so ``import vllm_tensafe`` imports neither vLLM nor
TenSEAL: vLLM imports this package's plugin entry point in every process it starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_tensafe._lazy import lazy_exports

# The one version source: pyproject.toml reads it from here ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

if TYPE_CHECKING:
    from vllm_tensafe.api import (
        PackageHandle,
        TenSafeAsyncEngine,
        TenSafeVLLMConfig,
        TenSafeVLLMServer,
        TSSPService,
    )
    from vllm_tensafe.errors import ConfigError, TenSafeError
    from vllm_tensafe.observability import setup_observability

__all__ = [
    "ConfigError",
    "PackageHandle",
    "TSSPService",
    "TenSafeAsyncEngine",
    "TenSafeError",
    "TenSafeVLLMConfig",
    "TenSafeVLLMServer",
    "__version__",
    "setup_observability",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PackageHandle": "api.packages",
        "TSSPService": "api.packages",
        "TenSafeAsyncEngine": "api.engine",
        "TenSafeVLLMConfig": "api.config",
        "TenSafeVLLMServer": "api.server",
        "ConfigError": "errors",
        "TenSafeError": "errors",
        "setup_observability": "observability",
    },
    globals(),
)
