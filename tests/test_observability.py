"""Metrics and the adapter status route, without starting vLLM (the end-to-end run is
tests/e2e/test_metrics_status.py)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.otlp import OtlpCollector, metrics_as_dict
from vllm_tensafe import observability as obs
from vllm_tensafe.errors import ConfigError


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    obs.shutdown_observability()
    memory = InMemoryMetricReader()
    obs.setup_observability("test-service", readers=[memory])
    yield memory
    obs.shutdown_observability()


def _metrics(reader: Any) -> dict[str, list[dict[str, Any]]]:
    return metrics_as_dict(reader.get_metrics_data())


def test_every_guide_metric_is_recorded_with_its_name(reader: Any) -> None:
    obs.record_request_finished("stop", 0.5)
    obs.record_request_finished("length", 1.5)
    obs.record_tokens_generated(7)
    obs.record_kv_cache_usage(0.25)
    obs.record_he_delta(
        "e8",
        "local",
        seconds=0.01,
        ciphertexts=4,
        key_holder_calls=1,
        key_holder_seconds=0.004,
    )
    obs.record_tssp_verification("ok")
    obs.record_tssp_verification(obs.verification_outcome(ValueError("x")))
    got = _metrics(reader)

    requests = {p["attributes"]["status"]: p["value"] for p in got[obs.REQUESTS_TOTAL]}
    assert requests == {"stop": 1, "length": 1}
    assert got[obs.TOKENS_GENERATED][0]["value"] == 7
    latency = got[obs.LATENCY_SECONDS][0]
    assert latency["count"] == 2 and latency["sum"] == pytest.approx(2.0)
    assert got[obs.KV_CACHE_UTILIZATION][0]["value"] == 0.25
    he_ops = got[obs.HE_OPERATIONS_TOTAL][0]
    assert he_ops == {"attributes": {"adapter": "e8"}, "value": 4}
    assert got[obs.HE_DELTA_SECONDS][0]["count"] == 1
    assert got[obs.KEY_HOLDER_SECONDS][0]["attributes"] == {"key_holder": "local"}
    outcomes = {p["attributes"]["outcome"]: p["value"] for p in got[obs.TSSP_VERIFICATIONS_TOTAL]}
    assert outcomes == {"ok": 1, "error": 1}


def test_without_an_sdk_recording_is_a_no_op() -> None:
    obs.shutdown_observability()
    obs.record_request_finished("stop", 0.1)  # must not raise, must not need an SDK
    obs.record_tssp_verification("ok")


def test_missing_otlp_exporter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    obs.shutdown_observability()
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", None)
    with pytest.raises(ConfigError) as info:
        obs.setup_observability(otlp_endpoint="http://127.0.0.1:4317")
    assert "pip install 'vllm-tensafe[otlp]'" in str(info.value)
    obs.shutdown_observability()


def test_unknown_otlp_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    obs.shutdown_observability()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ConfigError, match="unsupported OTLP protocol"):
        obs.setup_observability(otlp_endpoint="http://127.0.0.1:4317")
    obs.shutdown_observability()


def test_outcomes_are_a_fixed_set_not_class_names() -> None:
    from vllm_tensafe import errors

    cases = {
        None: "ok",
        errors.SignatureError("x"): "bad_signature",
        errors.UntrustedSignerError("x"): "untrusted_signer",
        errors.DigestMismatchError("x"): "digest_mismatch",
        errors.MalformedPackageError("x"): "malformed",
        errors.UnsupportedVersionError("x"): "unsupported_version",
        errors.BaseModelMismatchError("x"): "base_model_mismatch",
        errors.RollbackError("x"): "rollback",
        errors.PackageExpiredError("x"): "expired",
        errors.UnsupportedAdapterError("x"): "unsupported_adapter",
        errors.TsspError("x"): "refused",
        errors.KeyFileError("x"): "config_error",
        RuntimeError("x"): "error",
    }
    for exc, outcome in cases.items():
        assert obs.verification_outcome(exc) == outcome
    assert set(cases.values()) == set(obs.OUTCOMES)


def test_otlp_export_reaches_a_collector_with_this_process_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path a deployment (and tests/e2e/test_metrics_status.py) reads metrics through."""
    obs.shutdown_observability()
    with OtlpCollector() as collector:
        for name, value in collector.environment(interval_ms=200).items():
            monkeypatch.setenv(name, value)
        settings = SimpleNamespace(otlp_endpoint=collector.endpoint, service_name="s")
        assert obs.setup_from_settings(settings)  # type: ignore[arg-type]
        try:
            obs.record_tssp_verification("ok")
            deadline = time.monotonic() + 120
            got: dict[str, Any] = {}
            while time.monotonic() < deadline:
                got = collector.by_process().get(os.getpid(), {}).get("metrics", {})
                if obs.TSSP_VERIFICATIONS_TOTAL in got:
                    break
                time.sleep(0.1)
            assert got[obs.TSSP_VERIFICATIONS_TOTAL][0]["value"] == 1
            assert collector.by_process()[os.getpid()]["role"] == obs.process_role()
        finally:
            obs.shutdown_observability()


def test_export_interval_comes_from_the_standard_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    obs.shutdown_observability()
    monkeypatch.setenv(obs.EXPORT_INTERVAL_ENV, "250")
    try:
        obs.setup_observability("s")
        assert obs._setup is not None and obs._setup.export_interval_seconds == 0.25
    finally:
        obs.shutdown_observability()
    monkeypatch.setenv(obs.EXPORT_INTERVAL_ENV, "soon")
    with pytest.raises(ConfigError, match="OTEL_METRIC_EXPORT_INTERVAL"):
        obs.setup_observability("s")
    obs.shutdown_observability()


def test_no_endpoint_means_no_setup() -> None:
    assert not obs.setup_from_settings(SimpleNamespace(otlp_endpoint=None, service_name="s"))  # type: ignore[arg-type]


def test_otlp_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_tensafe.settings import load_settings

    monkeypatch.setenv("TENSAFE_OTLP_ENDPOINT", "otel-collector:4317")
    with pytest.raises(ConfigError, match="--tensafe-otlp-endpoint"):
        load_settings()
    monkeypatch.setenv("TENSAFE_OTLP_ENDPOINT", "http://otel-collector:4317/")
    monkeypatch.setenv("TENSAFE_SERVICE_NAME", "my-host")
    settings = load_settings()
    assert settings.otlp_endpoint == "http://otel-collector:4317"
    assert settings.service_name == "my-host"


def test_stat_logger_reads_vllm_stats(reader: Any) -> None:
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

    from vllm_tensafe.vllm.stat_logger import TenSafeStatLogger

    stat_logger = TenSafeStatLogger(vllm_config=None, engine_index=0)
    iteration = IterationStats()
    iteration.num_generation_tokens = 5
    iteration.finished_requests.append(
        FinishedRequestStats(finish_reason=FinishReason.LENGTH, e2e_latency=0.75)
    )
    stat_logger.record(SchedulerStats(kv_cache_usage=0.5), iteration)
    got = _metrics(reader)
    assert got[obs.REQUESTS_TOTAL] == [{"attributes": {"status": "length"}, "value": 1}]
    assert got[obs.TOKENS_GENERATED][0]["value"] == 5
    assert got[obs.LATENCY_SECONDS][0]["sum"] == pytest.approx(0.75)
    assert got[obs.KV_CACHE_UTILIZATION][0]["value"] == 0.5


# --- the adapter status route --------------------------------------------------------------------


def _adapter(lora_id: int, name: str) -> Any:
    from vllm_tensafe.vllm.runtime import EncryptedAdapter

    return EncryptedAdapter(
        lora_int_id=lora_id,
        name=name,
        path=f"/adapters/{name}.tssp",
        signer_key_id="ab" * 32,
        manifest_digest="cd" * 32,
        rank=8,
        matrices={},
        engine=None,  # type: ignore[arg-type]
        summary={"name": name, "signer_key_id": "ab" * 32, "key_holder": "remote"},
        decrypt_calls=3,
        ciphertexts_sent=12,
    )


def test_runtime_status_keeps_evicted_adapters_and_their_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm_tensafe.errors import AdapterRevokedError
    from vllm_tensafe.vllm.runtime import TenSafeRuntime

    runtime = TenSafeRuntime(SimpleNamespace(key_holder="remote"))  # type: ignore[arg-type]
    runtime.register(_adapter(1, "a"))
    runtime.register(_adapter(2, "b"))
    assert [a["name"] for a in runtime.adapter_status()] == ["a", "b"]
    listed = runtime.adapter_status({2})  # vLLM evicted "a": still listed, not resident
    assert [(a["name"], a["resident"]) for a in listed] == [("a", False), ("b", True)]
    # vLLM loads "a" again (a new object): the counters continue, they do not restart.
    runtime.adapters[1].record_failure(AdapterRevokedError("revoked", "ask"))
    runtime.register(_adapter(1, "a"))
    (a,) = [s for s in runtime.adapter_status({1, 2}) if s["name"] == "a"]
    assert a["usage"]["ciphertexts_sent"] == 24 and a["usage"]["failures"] == 1  # type: ignore[index]
    assert a["revoked"] is True and "AdapterRevokedError" in str(a["last_error"])


async def test_route_answers_rank_zero_with_served_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_tensafe.vllm import status_route

    monkeypatch.setenv("TENSAFE_ENABLED", "true")
    rank0 = {"pid": 1, "key_holder": "remote", "adapters": [_adapter(4, "pkg-name").status()]}
    rank1 = {"pid": 2, "key_holder": "remote", "adapters": []}

    class Engine:
        async def collective_rpc(self, method: str) -> list[dict[str, Any]]:
            assert method == status_route.WORKER_METHOD
            return [rank0, rank1]

    models = SimpleNamespace(lora_requests={"served": SimpleNamespace(lora_int_id=4)})
    state = SimpleNamespace(engine_client=Engine(), openai_serving_models=models)
    status, body = await status_route.adapter_status_response(state)
    assert status == 200 and body["workers"] == 2 and body["key_holder"] == "remote"
    (adapter,) = body["adapters"]
    assert adapter["served_names"] == ["served"] and adapter["name"] == "pkg-name"
    assert adapter["usage"]["decrypt_calls"] == 3

    monkeypatch.setenv("TENSAFE_ENABLED", "false")
    assert await status_route.adapter_status_response(state) == (
        200,
        {"tensafe_enabled": False, "adapters": []},
    )


async def test_route_reports_an_engine_without_the_method(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_tensafe.vllm import status_route

    monkeypatch.setenv("TENSAFE_ENABLED", "true")

    class Engine:
        async def collective_rpc(self, method: str) -> list[Any]:
            raise NotImplementedError(f"Method {method!r} is not implemented.")

    status, body = await status_route.adapter_status_response(
        SimpleNamespace(engine_client=Engine())
    )
    assert status == 503 and "VLLM_PLUGINS" in body["error"]["message"]
