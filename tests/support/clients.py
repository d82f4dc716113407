"""The official ``openai`` client as the tests use it against a stock ``vllm serve``."""

from __future__ import annotations

from typing import Any


def openai_client(base_url: str, *, timeout: float = 600.0) -> Any:
    """An ``OpenAI`` client that never retries and opens one connection per request.

    No retries: a failure must reach the test as it happened. No keep-alive: vLLM's HTTP
    server closes a connection idle for 5 s (``--timeout-keep-alive``), and a request written
    on a pooled connection in the instant the server closes it is dropped ("Server
    disconnected without sending a response"). Without retries that race would fail a test
    by the timing of a busy machine; ``Connection: close`` takes it away.
    """
    from openai import OpenAI

    return OpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        timeout=timeout,
        default_headers={"Connection": "close"},
    )
