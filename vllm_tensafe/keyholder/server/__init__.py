"""The key-holder service: ``vllm-tensafe key-holder serve`` (commands in vllm_tensafe/cli/).

Modules, one job each:

* ``policy``      its adapters: name -> bound CKKS key ids and accepted signed manifests
* ``tokens``      bearer-token files: the service's scoped tokens, a host's one token
* ``revocation``  the watched revocation file
* ``audit``       the hash-chained, fsynced audit log (and the state replayed from it)
* ``core``        the decisions: policy checks, budgets, revocation, audit, decryption
* ``app``         the HTTP API (FastAPI) and its OpenAPI document
* ``server``      ``KeyHolderService``: uvicorn in a thread, bounded connections and deadlines
* ``tls``         server TLS, client certificates (mTLS), the certificates ``key-holder cert``
                  makes

Nothing here imports TenSEAL, FastAPI or uvicorn at import time: ``vllm-tensafe --help`` stays
quick; the service imports them when it is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_tensafe._lazy import lazy_exports

if TYPE_CHECKING:
    from vllm_tensafe.keyholder.server.app import Limits
    from vllm_tensafe.keyholder.server.policy import AdapterBinding, AdapterPolicy
    from vllm_tensafe.keyholder.server.server import DEFAULT_PORT, KeyHolderService
    from vllm_tensafe.keyholder.server.tls import TLSConfig
    from vllm_tensafe.keyholder.server.tokens import TokenStore

__all__ = [
    "DEFAULT_PORT",
    "AdapterBinding",
    "AdapterPolicy",
    "KeyHolderService",
    "Limits",
    "TLSConfig",
    "TokenStore",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AdapterBinding": "policy",
        "AdapterPolicy": "policy",
        "DEFAULT_PORT": "server",
        "KeyHolderService": "server",
        "Limits": "app",
        "TLSConfig": "tls",
        "TokenStore": "tokens",
    },
    globals(),
)
