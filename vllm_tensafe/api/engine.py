"""The guide's ``TenSafeAsyncEngine``: vLLM's own ``AsyncLLM`` serving the configured adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from vllm_tensafe.api.config import TenSafeVLLMConfig
from vllm_tensafe.errors import ConfigError


class TenSafeAsyncEngine:
    """The guide's engine: vLLM's ``AsyncLLM`` serving the configured encrypted adapter.

    ``await engine.initialize()`` verifies the package (a bad one is refused before vLLM spends
    a minute starting), writes the settings into ``TENSAFE_*`` and builds the stock engine.
    ``engine.engine`` is that ``AsyncLLM``, for anything the guide's API does not cover.
    """

    def __init__(self, config: TenSafeVLLMConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.lora_request: Any = None

    async def initialize(self) -> None:
        if self.engine is not None:
            return
        self.config.check_package()
        self.config.apply_environment()
        from vllm_tensafe.plugin import register

        register()
        from vllm_tensafe.vllm import entrypoints

        self.engine = entrypoints.start_async_llm(self.config.to_engine_args())
        self.lora_request = self.config.lora_request()

    async def generate(
        self, prompt: Any, request_id: str, sampling_params: Any = None
    ) -> AsyncIterator[Any]:
        """Yield vLLM ``RequestOutput``s for ``prompt`` from the encrypted adapter.

        Without ``he_lora_adapter_path`` the base model answers (nothing else was asked for).
        A request whose adapter fails (key holder refused or unreachable) ends with vLLM's
        error for it; it is never answered from the base model instead.
        """
        if self.engine is None:
            raise ConfigError(
                "TenSafeAsyncEngine.generate was called before the engine was started",
                "await engine.initialize() first",
            )
        if sampling_params is None:
            from vllm_tensafe.vllm import entrypoints

            sampling_params = entrypoints.sampling_params()
        async for output in self.engine.generate(
            prompt, sampling_params, request_id, lora_request=self.lora_request
        ):
            yield output

    def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()

    async def __aenter__(self) -> TenSafeAsyncEngine:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()
