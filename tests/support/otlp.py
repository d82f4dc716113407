"""Reading vllm-tensafe's metrics in tests the way a deployment does: over OTLP.

``OtlpCollector`` is a small OTLP/HTTP metrics receiver (``POST /v1/metrics``, protobuf): a
server started with ``TENSAFE_OTLP_ENDPOINT=collector.endpoint`` (and
``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=http/protobuf``) exports every process's metrics to it,
and the test reads the latest export of each process, keyed by its ``process.pid`` resource
attribute. The exporters send cumulative values, so the latest export holds the totals.

``metrics_as_dict`` turns SDK ``MetricsData`` (an ``InMemoryMetricReader`` in one process) into
the same shape: ``{name: [{"attributes": {...}, "value" | "count"/"sum"/"min"/"max": ...}]}``.
"""

from __future__ import annotations

import http.server
import threading
from types import TracebackType
from typing import Any

Points = dict[str, list[dict[str, Any]]]


def metrics_as_dict(metrics_data: Any) -> Points:
    """SDK ``MetricsData`` as ``{name: [{"attributes": {...}, "value"|"count"/"sum": ...}]}``."""
    out: Points = {}
    if metrics_data is None:
        return out
    for resource_metrics in metrics_data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = out.setdefault(metric.name, [])
                for point in metric.data.data_points:
                    entry: dict[str, Any] = {"attributes": dict(point.attributes or {})}
                    if hasattr(point, "bucket_counts"):
                        entry.update(count=point.count, sum=point.sum, min=point.min, max=point.max)
                    else:
                        entry["value"] = point.value
                    points.append(entry)
    return out


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def _points(metric: Any) -> list[dict[str, Any]]:
    kind = metric.WhichOneof("data")
    out = []
    if kind in ("sum", "gauge"):
        for point in getattr(metric, kind).data_points:
            number = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
            out.append({"attributes": _attributes(point.attributes), "value": number})
    elif kind == "histogram":
        for point in metric.histogram.data_points:
            out.append(
                {
                    "attributes": _attributes(point.attributes),
                    "count": point.count,
                    "sum": point.sum,
                    "min": point.min,
                    "max": point.max,
                }
            )
    return out


class OtlpCollector:
    """``with OtlpCollector() as collector:`` ... ``collector.by_process()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # pid -> {"pid", "role", "metrics"}: the latest export of each process.
        self._latest: dict[int, dict[str, Any]] = {}
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                code = 200 if self.path == "/v1/metrics" and collector._receive(body) else 400
                from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

                reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def environment(self, interval_ms: int = 500) -> dict[str, str]:
        """The variables that make a vLLM server export here, every ``interval_ms``."""
        return {
            "TENSAFE_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
            "OTEL_METRIC_EXPORT_INTERVAL": str(interval_ms),
        }

    def _receive(self, body: bytes) -> bool:
        from google.protobuf.message import DecodeError
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

        request = metrics_service_pb2.ExportMetricsServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError:
            return False
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            pid = int(resource.get("process.pid", 0))
            metrics: Points = {}
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    metrics.setdefault(metric.name, []).extend(_points(metric))
            with self._lock:
                self._latest[pid] = {
                    "pid": pid,
                    "role": resource.get("process.role"),
                    "metrics": metrics,
                }
        return True

    def by_process(self) -> dict[int, dict[str, Any]]:
        """The latest export of every process that exported: {pid: {"pid", "role", "metrics"}}."""
        with self._lock:
            return {pid: dict(record) for pid, record in self._latest.items()}

    def __enter__(self) -> OtlpCollector:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
