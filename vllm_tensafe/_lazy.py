"""Lazy package exports (PEP 562): a package names what it exports and where it lives.

vLLM imports the plugin's entry point in every process it starts, and ``vllm-tensafe --help``
imports the CLI's packages: neither may pay for TenSEAL, numpy-heavy code or FastAPI that the
names they never use would import. Each package's ``__init__`` therefore maps its exported
names to submodules and imports a submodule on the first use of one of its names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: MutableMapping[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the submodule
    (relative to ``package``) that defines it; a resolved name is cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
