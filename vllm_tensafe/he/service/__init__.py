"""The remote key holder: ``vllm-tensafe key-holder serve`` and its tools.

Modules, one job each:

* ``policy``      its adapters: name -> bound CKKS key ids and accepted signed manifests
* ``tokens``      scoped bearer tokens (decrypt per host and adapter, admin)
* ``revocation``  the watched revocation file
* ``audit``       the hash-chained, fsynced audit log (and the state replayed from it)
* ``core``        the decisions: policy checks, budgets, revocation, audit, decryption
* ``app``         the HTTP API (FastAPI) and its OpenAPI document
* ``server``      ``KeyHolderService``: uvicorn in a thread, bounded connections and deadlines
* ``tls``         server TLS, client certificates (mTLS), ``key-holder cert``
* ``commands``    the ``vllm-tensafe key-holder ...`` subcommands

Nothing here imports TenSEAL, FastAPI or uvicorn at import time: ``vllm-tensafe --help`` stays
quick; the service imports them when it is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_tensafe.he.service.app import Limits
    from vllm_tensafe.he.service.policy import AdapterBinding, AdapterPolicy
    from vllm_tensafe.he.service.server import DEFAULT_PORT, KeyHolderService
    from vllm_tensafe.he.service.tls import TLSConfig
    from vllm_tensafe.he.service.tokens import TokenStore

_EXPORTS = {
    "AdapterBinding": "policy",
    "AdapterPolicy": "policy",
    "DEFAULT_PORT": "server",
    "KeyHolderService": "server",
    "Limits": "app",
    "TLSConfig": "tls",
    "TokenStore": "tokens",
}

__all__ = [
    "DEFAULT_PORT",
    "AdapterBinding",
    "AdapterPolicy",
    "KeyHolderService",
    "Limits",
    "TLSConfig",
    "TokenStore",
    "add_commands",
]


def add_commands(subparsers: Any) -> None:
    from vllm_tensafe.he.service.commands import add_commands as add

    add(subparsers)


def __getattr__(name: str) -> Any:
    import importlib

    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
