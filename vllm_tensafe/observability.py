"""OpenTelemetry metrics of vllm-tensafe, recorded in the process where each event happens.

API server process (from vLLM's own per-step stats):

* ``tensafe_vllm_requests_total``: counter of finished requests, attribute ``status`` (finish
  reason: stop, length, abort, error, ...)
* ``tensafe_vllm_tokens_generated``: counter of generated tokens
* ``tensafe_vllm_latency_seconds``: histogram of request latency, arrival to last token
* ``tensafe_vllm_kv_cache_utilization``: gauge of the KV cache usage fraction (0 to 1)

Worker processes (around each ``DeltaEngine.compute``):

* ``tensafe_vllm_he_operations_total``: counter of ciphertexts sent for decryption, ``adapter``
* ``tensafe_vllm_he_delta_seconds``: histogram of one HE delta (products, key holder, unmask)
* ``tensafe_vllm_key_holder_seconds``: histogram of one key-holder round trip, ``key_holder``

Wherever a package is opened (API server checks, workers, ``TSSPService``):

* ``tensafe_vllm_tssp_verifications_total``: counter, ``outcome`` = ``ok`` or one of the fixed
  refusal outcomes in ``OUTCOMES`` (``bad_signature``, ``digest_mismatch``, ``rollback``, ...)

The request metrics come from vLLM's own stats (``vllm_tensafe.vllm.stat_logger``) and count
every request of the server, base model included. Only the OpenTelemetry *API* is needed at run
time: until an SDK ``MeterProvider`` exists (``setup_observability``, or the application's own)
every record call is a no-op. With ``TENSAFE_OTLP_ENDPOINT`` set, every vLLM process exports
its own metrics over OTLP (``service.instance.id``, ``process.pid`` and ``process.role`` tell
them apart), every ``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds (default 10 000). The tests
read them the same way, from an OTLP collector of their own (tests/support/otlp.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm_tensafe.errors import ConfigError

if TYPE_CHECKING:
    from vllm_tensafe.settings import TenSafeSettings

logger = logging.getLogger("vllm_tensafe.observability")

METER_NAME = "vllm_tensafe"
# The OpenTelemetry SDK's own variable for the periodic exporter (milliseconds).
EXPORT_INTERVAL_ENV = "OTEL_METRIC_EXPORT_INTERVAL"
DEFAULT_EXPORT_INTERVAL = 10.0

REQUESTS_TOTAL = "tensafe_vllm_requests_total"
TOKENS_GENERATED = "tensafe_vllm_tokens_generated"
LATENCY_SECONDS = "tensafe_vllm_latency_seconds"
HE_OPERATIONS_TOTAL = "tensafe_vllm_he_operations_total"
KV_CACHE_UTILIZATION = "tensafe_vllm_kv_cache_utilization"
HE_DELTA_SECONDS = "tensafe_vllm_he_delta_seconds"
KEY_HOLDER_SECONDS = "tensafe_vllm_key_holder_seconds"
TSSP_VERIFICATIONS_TOTAL = "tensafe_vllm_tssp_verifications_total"

# HE deltas take milliseconds (local key holder) to seconds (remote, large layers); requests
# take seconds to minutes. OpenTelemetry's default buckets (0, 5, 10, 25, ...) suit neither.
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


@dataclass
class _Instruments:
    requests_total: Any
    tokens_generated: Any
    latency_seconds: Any
    he_operations_total: Any
    kv_cache_utilization: Any
    he_delta_seconds: Any
    key_holder_seconds: Any
    tssp_verifications_total: Any


@dataclass
class _Setup:
    """What ``setup_observability`` built, kept so a forked child can rebuild its own."""

    service_name: str
    otlp_endpoint: str | None
    provider: Any
    base_resource: Any
    export_interval_seconds: float
    pid: int = field(default_factory=os.getpid)


_lock = threading.Lock()
_instruments: _Instruments | None = None
_setup: _Setup | None = None


def _meter() -> Any:
    if _setup is not None:
        return _setup.provider.get_meter(METER_NAME)
    from opentelemetry import metrics

    # The global provider: a no-op proxy until an application or setup_observability sets one.
    return metrics.get_meter(METER_NAME)


def _create_instruments() -> _Instruments:
    meter = _meter()
    return _Instruments(
        requests_total=meter.create_counter(
            REQUESTS_TOTAL, unit="1", description="Finished requests, by finish reason (status)"
        ),
        tokens_generated=meter.create_counter(
            TOKENS_GENERATED, unit="1", description="Generated tokens"
        ),
        latency_seconds=meter.create_histogram(
            LATENCY_SECONDS,
            unit="s",
            description="Request latency, arrival to last token",
            explicit_bucket_boundaries_advisory=_REQUEST_BUCKETS,
        ),
        he_operations_total=meter.create_counter(
            HE_OPERATIONS_TOTAL,
            unit="1",
            description="CKKS ciphertexts sent to the key holder for decryption",
        ),
        kv_cache_utilization=meter.create_gauge(
            KV_CACHE_UTILIZATION, unit="1", description="KV cache usage fraction (0 to 1)"
        ),
        he_delta_seconds=meter.create_histogram(
            HE_DELTA_SECONDS,
            unit="s",
            description="One encrypted LoRA delta: products, key holder, unmasking",
            explicit_bucket_boundaries_advisory=_FAST_BUCKETS,
        ),
        key_holder_seconds=meter.create_histogram(
            KEY_HOLDER_SECONDS,
            unit="s",
            description="One key-holder decryption round trip",
            explicit_bucket_boundaries_advisory=_FAST_BUCKETS,
        ),
        tssp_verifications_total=meter.create_counter(
            TSSP_VERIFICATIONS_TOTAL,
            unit="1",
            description="TSSP packages opened or verified, by outcome (ok or the refusal)",
        ),
    )


def _get() -> _Instruments:
    global _instruments
    setup = _setup
    if setup is not None and setup.pid != os.getpid():
        _rebuild_after_fork(setup)
    instruments = _instruments
    if instruments is None:
        with _lock:
            if _instruments is None:
                _instruments = _create_instruments()
            instruments = _instruments
    return instruments


# --- recording (called from the plugin's hooks) -------------------------------------------------


def record_request_finished(status: str, latency_seconds: float) -> None:
    instruments = _get()
    instruments.requests_total.add(1, {"status": status})
    instruments.latency_seconds.record(max(0.0, latency_seconds))


def record_tokens_generated(count: int) -> None:
    if count > 0:
        _get().tokens_generated.add(count)


def record_kv_cache_usage(fraction: float) -> None:
    _get().kv_cache_utilization.set(fraction)


def record_he_delta(
    adapter: str,
    key_holder: str,
    *,
    seconds: float,
    ciphertexts: int,
    key_holder_calls: int,
    key_holder_seconds: float,
) -> None:
    """One ``DeltaEngine.compute`` call (worker process)."""
    instruments = _get()
    instruments.he_delta_seconds.record(seconds, {"adapter": adapter})
    if ciphertexts:
        instruments.he_operations_total.add(ciphertexts, {"adapter": adapter})
    if key_holder_calls:
        # compute() makes one decrypt call; more would mean an engine change: average them.
        per_call = key_holder_seconds / key_holder_calls
        for _ in range(key_holder_calls):
            instruments.key_holder_seconds.record(per_call, {"key_holder": key_holder})


def record_he_operations(adapter: str, ciphertexts: int) -> None:
    """HE work counted on the device (the op inside CUDA graphs runs no Python per call, so
    there is no per-call time to record; worker process)."""
    if ciphertexts:
        _get().he_operations_total.add(ciphertexts, {"adapter": adapter})


def record_tssp_verification(outcome: str) -> None:
    _get().tssp_verifications_total.add(1, {"outcome": outcome})


# The outcome label of a package check: a fixed set, so a dashboard can list them and an
# internal rename never changes a series. Subclasses before their base class.
_OUTCOME_OF: tuple[tuple[str, str], ...] = (
    ("SignatureError", "bad_signature"),
    ("UntrustedSignerError", "untrusted_signer"),
    ("DigestMismatchError", "digest_mismatch"),
    ("UnsupportedVersionError", "unsupported_version"),
    ("MalformedPackageError", "malformed"),
    ("BaseModelMismatchError", "base_model_mismatch"),
    ("RollbackError", "rollback"),
    ("PackageExpiredError", "expired"),
    ("UnsupportedAdapterError", "unsupported_adapter"),
    ("TsspError", "refused"),
    ("ConfigError", "config_error"),
)
OUTCOMES = ("ok", *(outcome for _, outcome in _OUTCOME_OF), "error")


def verification_outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label for a package check that raised ``exc`` (None: it passed)."""
    if exc is None:
        return "ok"
    from vllm_tensafe import errors

    for name, outcome in _OUTCOME_OF:
        if isinstance(exc, getattr(errors, name)):
            return outcome
    return "error"


# --- setup ------------------------------------------------------------------------------------


def setup_observability(
    service_name: str = "vllm-tensafe",
    otlp_endpoint: str | None = None,
    *,
    readers: Sequence[Any] = (),
    export_interval_seconds: float | None = None,
) -> Any:
    """Configure an OpenTelemetry SDK ``MeterProvider`` for this process and return it.

    ``otlp_endpoint`` (e.g. ``http://otel-collector:4317``) adds a periodic OTLP exporter; the
    protocol follows ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``
    (``grpc``, the default, or ``http/protobuf``). ``readers`` are extra SDK metric readers
    (``InMemoryMetricReader`` in tests). ``export_interval_seconds``: how often the OTLP
    exporter sends (default: ``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds, else 10 s). The
    provider also becomes the global one unless the application already set its own. Calling
    it again returns the first provider.
    """
    global _setup, _instruments
    with _lock:
        if _setup is not None and _setup.pid == os.getpid():
            return _setup.provider
        try:
            from opentelemetry.sdk.resources import Resource
        except ImportError:
            raise _sdk_missing() from None
        # Resource.create runs the resource detectors (OTEL_RESOURCE_ATTRIBUTES, ...) on a
        # thread pool: fine here, not in a forked child (see _rebuild_after_fork).
        base = Resource.create({"service.name": service_name})
        interval = (
            export_interval_seconds
            if export_interval_seconds is not None
            else _env_export_interval()
        )
        setup = _build(service_name, otlp_endpoint, base, interval, list(readers))
        _setup = setup
        _instruments = None  # rebuilt on the new provider at the next record call
    _set_global(setup.provider)
    logger.info(
        "OpenTelemetry metrics on in process %d: service %r%s",
        os.getpid(),
        service_name,
        f", OTLP to {otlp_endpoint} every {setup.export_interval_seconds:g}s"
        if otlp_endpoint
        else "",
    )
    return setup.provider


def setup_from_settings(settings: TenSafeSettings) -> bool:
    """Called by the plugin in every process: set up when an OTLP endpoint is configured."""
    if not settings.otlp_endpoint:
        return False
    setup_observability(settings.service_name, settings.otlp_endpoint)
    return True


def _env_export_interval() -> float:
    value = os.environ.get(EXPORT_INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_EXPORT_INTERVAL
    try:
        millis = float(value)
    except ValueError:
        millis = -1.0
    if not millis > 0:
        raise ConfigError(
            f"{EXPORT_INTERVAL_ENV}={value!r} is not a positive number of milliseconds",
            f"set e.g. {EXPORT_INTERVAL_ENV}=10000, or unset it",
        )
    return millis / 1000


def _sdk_missing() -> ConfigError:
    return ConfigError(
        "OpenTelemetry metrics need the OpenTelemetry SDK, which is not installed",
        "pip install 'vllm-tensafe[otlp]'",
    )


def _build(
    service_name: str,
    otlp_endpoint: str | None,
    base_resource: Any,
    export_interval_seconds: float,
    readers: list[Any],
) -> _Setup:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
    except ImportError:
        raise _sdk_missing() from None
    pid = os.getpid()
    all_readers = list(readers)
    if otlp_endpoint:
        all_readers.append(
            PeriodicExportingMetricReader(
                _pid_guarded(_otlp_exporter(otlp_endpoint), pid),
                export_interval_millis=export_interval_seconds * 1000,
            )
        )
    # vLLM runs several processes; without these attributes their series would collide.
    resource = base_resource.merge(
        Resource(
            {
                "service.instance.id": f"{os.uname().nodename}-{pid}",
                "process.pid": pid,
                "process.role": process_role(),
            }
        )
    )
    return _Setup(
        service_name=service_name,
        otlp_endpoint=otlp_endpoint,
        provider=MeterProvider(resource=resource, metric_readers=all_readers),
        base_resource=base_resource,
        export_interval_seconds=export_interval_seconds,
        pid=pid,
    )


def _rebuild_after_fork(stale: _Setup) -> None:
    """Give a forked process (vLLM's engine core and workers) its own provider.

    The child inherits the parent's provider: the parent's counts so far, the parent's pid in
    its resource, no exporter thread. Its exporters are muted by their pid guard; a fresh provider
    with the same configuration takes over (readers passed to setup_observability stay with
    the parent: an SDK reader belongs to one provider). Done on the child's first record call
    rather than in an at-fork hook, where a thread pool or lock of the parent could hang it.
    """
    global _setup, _instruments
    with _lock:
        if _setup is not stale:
            return
        try:
            _setup = _build(
                stale.service_name,
                stale.otlp_endpoint,
                stale.base_resource,
                stale.export_interval_seconds,
                [],
            )
        except Exception:  # never break a vLLM process over metrics
            logger.exception("Could not rebuild OpenTelemetry metrics after fork")
            _setup = None
        _instruments = None


def _otlp_exporter(endpoint: str) -> Any:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            return OTLPMetricExporter(endpoint=endpoint)
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpExporter,
            )

            return HttpExporter(endpoint=f"{endpoint.rstrip('/')}/v1/metrics")
    except ImportError:
        raise ConfigError(
            f"an OTLP endpoint is set ({endpoint}) but the OpenTelemetry OTLP exporter for "
            f"protocol {protocol!r} is not installed",
            "pip install 'vllm-tensafe[otlp]'",
        ) from None
    raise ConfigError(
        f"unsupported OTLP protocol {protocol!r} (OTEL_EXPORTER_OTLP_PROTOCOL)",
        "use grpc or http/protobuf",
    )


def _pid_guarded(inner: Any, pid: int) -> Any:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class PidGuardExporter(MetricExporter):
        """Exports only from the process that made it: a forked copy stays silent."""

        def __init__(self, inner: Any, pid: int) -> None:
            super().__init__(
                preferred_temporality=getattr(inner, "_preferred_temporality", None),
                preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
            )
            self.inner = inner
            self.pid = pid

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            if os.getpid() != self.pid:
                return MetricExportResult.SUCCESS
            return self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return os.getpid() != self.pid or bool(self.inner.force_flush(timeout_millis))

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            if os.getpid() == self.pid:
                self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    return PidGuardExporter(inner, pid)


def _set_global(provider: Any) -> None:
    from opentelemetry import metrics
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    current = metrics.get_meter_provider()
    if isinstance(current, _ProxyMeterProvider | NoOpMeterProvider):
        metrics.set_meter_provider(provider)
    else:
        # The application configured its own provider first: ours exports our metrics only.
        logger.info("A global MeterProvider already exists; vllm-tensafe keeps its own")


def process_role() -> str:
    """What this process is to vLLM, for logs and the metrics' ``process.role``: its
    multiprocessing name (EngineCore_0, a worker's), or "API server" / "main process"."""
    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    return "API server" if "serve" in sys.argv[1:2] else "main process"


def shutdown_observability() -> None:
    """Flush and stop what ``setup_observability`` started (tests; the process exit does it)."""
    global _setup, _instruments
    with _lock:
        setup, _setup = _setup, None
        _instruments = None
    if setup is None or setup.pid != os.getpid():
        return
    setup.provider.shutdown()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork; the child gets a free one.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
