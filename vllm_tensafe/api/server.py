"""The guide's ``TenSafeVLLMServer``: vLLM's own OpenAI-compatible app, built by vLLM."""

from __future__ import annotations

import contextlib
from typing import Any

from vllm_tensafe.api.config import TenSafeVLLMConfig
from vllm_tensafe.errors import ConfigError


class TenSafeVLLMServer:
    """The guide's server: vLLM's own OpenAI-compatible app, the adapter as a static LoRA.

    The app is built by vLLM's own builders (``build_async_engine_client``, ``build_app``,
    ``init_app_state``) inside a running event loop, because vLLM's engine client belongs to
    the loop that created it. So, unlike the guide's ``uvicorn.run(server.app)``::

        asyncio.run(TenSafeVLLMServer(config).serve(host="0.0.0.0", port=8000))

        # or, to mount or test the app yourself:
        async with TenSafeVLLMServer(config) as server:
            app = server.app

    The one change to vLLM's app: ``GET /health`` answers ``{"status": "healthy", "model":
    ...}`` as the guide documents (vLLM's own answers an empty 200); it still returns 503 when
    the engine is dead.
    """

    def __init__(self, config: TenSafeVLLMConfig, *, extra_cli_args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.extra_cli_args = tuple(extra_cli_args)
        self.args: Any = None
        self._app: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def app(self) -> Any:
        if self._app is None:
            raise ConfigError(
                "TenSafeVLLMServer.app does not exist before the engine is started",
                "use `await server.serve(host, port)`, or `async with server:` and then "
                "server.app (vLLM builds its app inside a running event loop)",
            )
        return self._app

    def cli_args(self) -> Any:
        """The ``vllm serve`` arguments for this config, parsed by vLLM's own parser."""
        from vllm_tensafe.plugin import register
        from vllm_tensafe.vllm import entrypoints

        register()  # the parser learns the TenSafe flags; our settings go by environment
        argv = [self.config.model, *self.extra_cli_args]
        request = self.config.lora_request()
        if request is not None:
            argv += ["--lora-modules", f"{request.lora_name}={request.lora_path}"]
        return entrypoints.serve_cli_args(argv, self.config.to_engine_args())

    async def build(self) -> Any:
        """Start vLLM's engine and build its app in the running loop. Idempotent."""
        if self._app is not None:
            return self._app
        from vllm_tensafe.vllm import entrypoints

        self.config.check_package()
        self.config.apply_environment()
        self.args = self.cli_args()
        stack = contextlib.AsyncExitStack()
        try:
            app = await entrypoints.build_app(self.args, stack, self.config.model)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._app = app
        return app

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._app = None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> TenSafeVLLMServer:
        await self.build()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve(self, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs: Any) -> None:
        """Build, then serve the app under uvicorn until SIGINT/SIGTERM; then stop the engine.

        Runs through vLLM's own ``serve_http``, as ``vllm serve`` does: on a signal it stops the
        engine first (draining or aborting requests per vLLM's shutdown settings), then uvicorn.
        """
        from vllm_tensafe.vllm import entrypoints

        app = await self.build()
        try:
            await entrypoints.serve_http(app, host, port, **uvicorn_kwargs)
        finally:
            await self.close()
