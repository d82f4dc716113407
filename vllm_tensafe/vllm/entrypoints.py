"""The vLLM side of the guide's API (vllm_tensafe/compat.py): stock objects, built by vLLM.

compat.py validates the guide's configuration and maps it onto these; nothing here adds an
engine or a server of its own. Every vLLM object comes from the patch table (patches.py),
which knows where each lives in the running vLLM (the API-server builders moved from
``vllm.entrypoints.openai`` to ``vllm.entrypoints.launchers`` between 0.26 and 0.32).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

from vllm_tensafe.vllm import patches
from vllm_tensafe.vllm.cli_hooks import PYTHON_API


def async_engine_args(**kwargs: Any) -> Any:
    """vLLM's own ``AsyncEngineArgs``."""
    return patches.resolve("AsyncEngineArgs")(**kwargs)


def lora_request(name: str, lora_int_id: int, path: str) -> Any:
    return patches.resolve("LoRARequest")(name, lora_int_id, path)


def sampling_params(**kwargs: Any) -> Any:
    return patches.resolve("SamplingParams")(**kwargs)


def start_async_llm(engine_args: Any) -> Any:
    """vLLM's ``AsyncLLM.from_engine_args`` (the guarded ``create_engine_config`` runs in it)."""
    patches.check_names(["AsyncLLM.from_engine_args"])
    return patches.resolve("AsyncLLM").from_engine_args(engine_args)


def serve_cli_args(argv: Sequence[str], engine_args: Any) -> Any:
    """``vllm serve`` arguments parsed by vLLM's own parser, with ``engine_args`` applied."""
    parser_cls = patches.resolve("FlexibleArgumentParser")
    make_arg_parser = patches.resolve("make_arg_parser")
    validate = patches.resolve("validate_parsed_serve_args")
    parser = make_arg_parser(parser_cls(prog="vllm serve"))
    args = parser.parse_args(list(argv))
    for item in dataclasses.fields(engine_args):
        setattr(args, item.name, getattr(engine_args, item.name))
    validate(args)
    # TenSafe's refusals reach the caller as a ConfigError, not as vllm serve's exit.
    setattr(args, PYTHON_API, True)
    return args


async def build_app(args: Any, stack: contextlib.AsyncExitStack, model: str) -> Any:
    """vLLM's OpenAI-compatible app for ``args``, its engine client entered on ``stack``.

    vLLM's engine client belongs to the event loop that created it, so this runs in the loop
    that will serve the app. The one change to vLLM's app: ``GET /health`` answers the
    guide's JSON (``override_health``).
    """
    build_client = patches.resolve("build_async_engine_client")
    build = patches.resolve("build_app")
    init_state = patches.resolve("init_app_state")
    engine_client = await stack.enter_async_context(build_client(args))
    supported_tasks = await engine_client.get_supported_tasks()
    app = build(args, supported_tasks, engine_client.model_config)
    await init_state(engine_client, app.state, args, supported_tasks)
    override_health(app, model)
    return app


async def serve_http(app: Any, host: str, port: int, **uvicorn_kwargs: Any) -> None:
    """Serve through vLLM's own ``serve_http``, as ``vllm serve`` does, until a signal."""
    serve = patches.resolve("serve_http")
    shutdown = await serve(app, sock=None, host=host, port=port, **uvicorn_kwargs)
    await shutdown


def override_health(app: Any, model: str) -> None:
    """``GET /health`` answers ``{"status": "healthy", "model": ...}`` as the guide documents
    (vLLM's answers an empty 200), and still 503 when the engine is dead."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from starlette.requests import Request

    engine_dead = patches.resolve("EngineDeadError")
    app.router.routes[:] = [
        route
        for route in app.router.routes
        if not (isinstance(route, APIRoute) and route.path == "/health")
    ]

    async def health(raw_request: Request) -> JSONResponse:
        client = raw_request.app.state.engine_client
        try:
            await client.check_health()
        except engine_dead:
            return JSONResponse({"status": "unhealthy", "model": model}, status_code=503)
        return JSONResponse({"status": "healthy", "model": model})

    # This module postpones annotations (strings); FastAPI needs the Request class itself to
    # pass the request rather than read a query parameter named raw_request.
    health.__annotations__ = {"raw_request": Request, "return": JSONResponse}
    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.openapi_schema = None
