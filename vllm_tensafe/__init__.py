"""vllm-tensafe: serve signed, CKKS-encrypted LoRA adapters (TSSP packages) with stock vLLM.

The original TenSafe guide's API (``TenSafeVLLMConfig``, ``TenSafeAsyncEngine``,
``TenSafeVLLMServer``, ``TSSPService``, ``setup_observability``) is exported from here. Names
are resolved on first use, so ``import vllm_tensafe`` imports neither vLLM nor TenSEAL: vLLM
imports this package's plugin entry point in every process it starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vllm_tensafe.compat import (
        PackageHandle,
        TenSafeAsyncEngine,
        TenSafeVLLMConfig,
        TenSafeVLLMServer,
        TSSPService,
        VerificationResult,
    )
    from vllm_tensafe.errors import ConfigError, TenSafeError
    from vllm_tensafe.observability import setup_observability

_EXPORTS = {
    "PackageHandle": "compat",
    "TSSPService": "compat",
    "TenSafeAsyncEngine": "compat",
    "TenSafeVLLMConfig": "compat",
    "TenSafeVLLMServer": "compat",
    "VerificationResult": "compat",
    "ConfigError": "errors",
    "TenSafeError": "errors",
    "setup_observability": "observability",
}

__all__ = [
    "ConfigError",
    "PackageHandle",
    "TSSPService",
    "TenSafeAsyncEngine",
    "TenSafeError",
    "TenSafeVLLMConfig",
    "TenSafeVLLMServer",
    "VerificationResult",
    "__version__",
    "setup_observability",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
