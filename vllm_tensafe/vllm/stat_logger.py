"""Request metrics from vLLM's own stats (``vllm.stat_logger_plugins`` entry point).

vLLM hands every stat logger the ``IterationStats`` (finished requests with their finish reason
and end-to-end latency, generated tokens) and ``SchedulerStats`` (KV cache usage) of each engine
step, in the API server process. This logger turns them into the ``tensafe_vllm_*`` request
metrics (vllm_tensafe/observability.py). vLLM constructs it in every ``AsyncLLM`` (``vllm
serve`` included) whether or not TenSafe is enabled; without a configured OpenTelemetry SDK
every call below is a no-op.
"""

from __future__ import annotations

from typing import Any

from vllm_tensafe import observability
from vllm_tensafe.vllm import patches


class TenSafeStatLogger(patches.resolve("StatLoggerBase")):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if iteration_stats is not None:
            observability.record_tokens_generated(iteration_stats.num_generation_tokens)
            for finished in iteration_stats.finished_requests:
                observability.record_request_finished(
                    str(finished.finish_reason), finished.e2e_latency
                )
        if scheduler_stats is not None:
            observability.record_kv_cache_usage(float(scheduler_stats.kv_cache_usage))

    def log_engine_initialized(self) -> None:
        pass
