"""``GET /v1/tensafe/adapters``: the encrypted adapters a server holds, and their use.

Two halves, as vLLM's endpoint-plugin contract asks (vllm/plugins/endpoint_plugins/interface.py):

* engine side: ``install_worker_status()`` (run by the general plugin in every process) gives
  vLLM's workers a ``tensafe_adapter_status`` method, reachable with ``collective_rpc``;
* HTTP side: ``TenSafeStatusPlugin`` (``vllm.endpoint_plugins`` entry point) adds the route to
  the stock OpenAI server and answers it from rank 0's reply.

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them; the general plugin and this
one are both named ``tensafe``, so ``VLLM_PLUGINS=tensafe`` enables both.

Every encrypted adapter a worker ever loaded stays listed (``resident`` says whether vLLM holds
it now), with its use counted since the server started (a reload after an eviction continues
the counters), its package version and manifest digest, and what the key holder last said:
``revoked`` and ``last_error``.

The answer holds names, key ids, checks and counters. It never holds key material, ciphertext
bytes or key-holder credentials: the worker reports ``EncryptedAdapter.status()`` only, which
is built from the package's manifest summary and counters (tests/e2e/test_metrics_status.py
looks for the secrets in it).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route's parameter types at
# run time, and Request is imported inside attach_router (workers import this module too).
import logging
import os
from argparse import Namespace
from typing import Any

logger = logging.getLogger("vllm_tensafe.status_route")

ROUTE = "/v1/tensafe/adapters"
WORKER_METHOD = "tensafe_adapter_status"


def worker_adapter_status(worker: Any) -> dict[str, Any]:
    """The worker-side RPC: this rank's view of its encrypted adapters."""
    from vllm_tensafe.vllm.runtime import get_runtime

    resident: set[int] | None
    try:
        resident = set(worker.list_loras())
    except Exception:  # LoRA not enabled, or a worker without a LoRA manager
        resident = None
    runtime = get_runtime()
    return {
        "pid": os.getpid(),
        "key_holder": runtime.key_holder_kind,
        "adapters": runtime.adapter_status(resident),
    }


def install_worker_status() -> None:
    """Give vLLM's workers the ``tensafe_adapter_status`` RPC method. Idempotent. Optional:
    without it the route answers 503 (vllm_tensafe/vllm/patches.py logs which part is off)."""
    from vllm_tensafe.vllm import patches

    patches.optional(
        "worker.tensafe_adapter_status",
        lambda: patches.add("worker.tensafe_adapter_status", worker_adapter_status),
        f"GET {ROUTE} (it answers 503: the workers have no {WORKER_METHOD} method)",
    )


class TenSafeStatusPlugin:
    """``vllm.endpoint_plugins`` entry point: adds ``GET /v1/tensafe/adapters``."""

    name = "tensafe"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get(ROUTE)
        async def tensafe_adapters(raw_request: Request) -> JSONResponse:
            status, body = await adapter_status_response(raw_request.app.state)
            return JSONResponse(body, status_code=status)

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        # The route reads state.engine_client and state.openai_serving_models, which vLLM's
        # init_app_state has set up already: nothing of our own to keep.
        return None


async def adapter_status_response(state: Any) -> tuple[int, dict[str, Any]]:
    from vllm_tensafe.settings import enabled_in_environment

    if not enabled_in_environment():
        return 200, {"tensafe_enabled": False, "adapters": []}
    engine = getattr(state, "engine_client", None)
    if engine is None:
        return 503, _error("this server has no engine", "query a server started by vllm serve")
    try:
        replies = await engine.collective_rpc(WORKER_METHOD)
    except Exception as exc:
        logger.warning("Adapter status RPC failed: %s", exc)
        return 503, _error(
            f"the engine did not answer the adapter status call ({type(exc).__name__})",
            "check that every vLLM process loads the plugin (VLLM_PLUGINS=tensafe or unset)",
        )
    if not replies:
        return 503, _error("the engine has no workers", "retry once the server is ready")
    rank0 = replies[0]
    served = _served_names(state)
    adapters = []
    for adapter in rank0["adapters"]:
        lora_id = adapter["lora_int_id"]
        adapters.append({"served_names": served.get(lora_id, []), **adapter})
    return 200, {
        "tensafe_enabled": True,
        "key_holder": rank0["key_holder"],
        "workers": len(replies),
        "adapters": adapters,
    }


def _served_names(state: Any) -> dict[int, list[str]]:
    models = getattr(state, "openai_serving_models", None)
    names: dict[int, list[str]] = {}
    for name, request in (getattr(models, "lora_requests", None) or {}).items():
        names.setdefault(int(request.lora_int_id), []).append(name)
    return names


def _error(cause: str, fix: str) -> dict[str, Any]:
    return {"error": {"message": f"{cause}. Fix: {fix}", "type": "ServiceUnavailable"}}
