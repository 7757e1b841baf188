"""OpenTelemetry's names for the pool, Redis-pool and request figures, over OTLP (opt-in).

Turned on the way OpenTelemetry users do it, ``OTEL_METRICS_EXPORTER=otlp`` (or
``TELEMETRY_OTLP_METRICS=true``), with the exporter's own ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (and headers, timeout); every
``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds (default 60 s) each process exports what it measured.

The figures are the ones ``/metrics`` serves, read from the same per-process accumulators (the
hot path records nothing more): the names, units and attributes are the semantic conventions'
(``db.client.connection.*``, ``http.server.request.duration``), the mapping is the metric
catalogue's ``otel`` column. The data goes out through the OpenTelemetry SDK's OTLP/HTTP metric
exporter as cumulative sums and explicit-bucket histograms; each process is its own resource
(``service.instance.id``: a uvicorn worker or a Celery prefork child exports its own series,
which a backend sums), and a child flushes before it exits, as spans do. The SDK has no
histogram that takes pre-aggregated buckets, hence the exporter is fed directly rather than
through a ``MeterProvider``; histogram ``min`` and ``max`` are left out (they are optional in
OTLP and the package does not track them).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from telemetry._core.catalogue import CATALOGUE, COUNTER, HISTOGRAM
from telemetry._core.integration import Integration
from telemetry._core.log import INTERNAL, emit, hook_error
from telemetry._core.settings import ConfigError
from telemetry._core.stats import REGISTRY, Histogram, LabeledStats, iter_samples

STATS = LabeledStats()
REGISTRY.add(STATS)

#: the semantic conventions' units (UCUM), by OpenTelemetry name
UNITS = {
    "db.client.connection.count": "{connection}", "db.client.connection.max": "{connection}",
    "db.client.connection.idle.max": "{connection}", "db.client.connection.pending_requests": "{request}",
    "db.client.connection.timeouts": "{timeout}", "db.client.connection.create_time": "s",
    "db.client.connection.wait_time": "s", "db.client.connection.use_time": "s",
    "http.server.request.duration": "s", "http.server.active_requests": "{request}",
}  # fmt: skip
#: our label -> the conventions' attribute (labels not listed are not exported: service is the
#: resource's service.name, pid its service.instance.id, owner has no convention)
ATTRIBUTES = {"pool": "db.client.connection.pool.name", "method": "http.request.method", "route": "http.route",
              "status": "http.response.status_code"}  # fmt: skip
#: counters the catalogue cannot map one to one: Redis checkouts that found no connection
EXTRA = {("redis_pool_checkouts_total", "result"): ("db.client.connection.timeouts", ("timeout", "too_many"))}
_OTEL = re.compile(r"^([a-z0-9_.]+)(?:\{(\w+)=(\w+)\})?$")


def _mapping() -> dict[str, tuple[str, dict[str, str]]]:
    out = {}
    for name, spec in CATALOGUE.items():
        if not spec.otel:
            continue
        m = _OTEL.match(spec.otel)
        if m is None:  # pragma: no cover - a catalogue typo; the catalogue test reads every entry
            raise ValueError(f"{name}: unreadable otel mapping {spec.otel!r}")
        fixed = {f"db.client.connection.{m.group(2)}": m.group(3)} if m.group(2) else {}
        out[name] = (m.group(1), fixed)
    return out


MAPPING = _mapping()


def interval_seconds(environ: dict[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not raw:
        return 60.0
    try:
        millis = float(raw)
    except ValueError:
        millis = -1.0
    if not 100 <= millis <= 86_400_000:
        raise ConfigError(f"invalid environment variable OTEL_METRIC_EXPORT_INTERVAL={raw!r}: expected milliseconds "
                          "in [100, 86400000]")  # fmt: skip
    return millis / 1000


def _attrs(labels: Iterable[tuple[str, str]], fixed: dict[str, str]) -> tuple[tuple[str, Any], ...]:
    out: dict[str, Any] = dict(fixed)
    for k, v in labels:
        if k in ATTRIBUTES:
            out[ATTRIBUTES[k]] = int(v) if k == "status" and v.isdigit() else v
    return tuple(sorted(out.items()))


def points(samples: Iterable[tuple[str, Any, Any]]) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
    """This process's samples as OpenTelemetry series: name -> attributes -> a number (sums
    merged) or ``[count, sum, bucket counts, bounds]`` (histograms merged, e.g. over owners)."""
    out: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
    for name, labels, value in samples:
        labels = tuple(labels)
        target: tuple[str, dict[str, str]] | None = MAPPING.get(name)
        if target is None:
            for (extra, label), (target_name, accepted) in EXTRA.items():
                if name == extra and dict(labels).get(label) in accepted:
                    target = (target_name, {})
            if target is None:
                continue
        otel, fixed = target
        series = out.setdefault(otel, {})
        key = _attrs(labels, fixed)
        if isinstance(value, Histogram):
            have = series.get(key)
            if have is None:
                series[key] = [value.count, value.total, list(value.counts), value.bounds]
            else:
                have[0] += value.count
                have[1] += value.total
                have[2] = [a + b for a, b in zip(have[2], value.counts, strict=True)]
        else:
            series[key] = series.get(key, 0) + value
    return out


def _kind(otel: str) -> str:
    for name, (target, _fixed) in MAPPING.items():
        if target == otel:
            return CATALOGUE[name].kind
    return COUNTER  # EXTRA


def metrics_data(service: str, instance: str, start_ns: int, now_ns: int,
                 samples: Iterable[tuple[str, Any, Any]] | None = None) -> Any:  # fmt: skip
    """The OTLP payload (the SDK's ``MetricsData``) of this process's figures now."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.metrics.export import Histogram as OtelHistogram
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for otel, series in sorted(points(iter_samples() if samples is None else samples).items()):
        kind = _kind(otel)
        if kind == HISTOGRAM:
            data: Any = OtelHistogram(
                data_points=[HistogramDataPoint(attributes=dict(k), start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                                                count=v[0], sum=v[1], bucket_counts=v[2], explicit_bounds=list(v[3]),
                                                min=None, max=None)  # type: ignore[arg-type]
                             for k, v in series.items()],
                aggregation_temporality=cumulative,
            )  # fmt: skip
        else:
            data = Sum(
                data_points=[NumberDataPoint(attributes=dict(k), start_time_unix_nano=start_ns, time_unix_nano=now_ns, value=v)
                             for k, v in series.items()],
                aggregation_temporality=cumulative, is_monotonic=kind == COUNTER,
            )  # fmt: skip
        metrics.append(Metric(name=otel, description="", unit=UNITS.get(otel, ""), data=data))
    resource = Resource.create({"service.name": service, "service.instance.id": instance})
    scope = InstrumentationScope("poolsight", _version())
    return MetricsData(resource_metrics=[ResourceMetrics(
        resource=resource, scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics, schema_url="")], schema_url="")])  # fmt: skip


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("poolsight")
    except PackageNotFoundError:  # a checkout without an install
        return "0"


def _exporter() -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol != "http/protobuf":
        raise ConfigError(f"invalid environment variable OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected http/protobuf "
                          "for the package's metrics export")  # fmt: skip
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        raise ConfigError("OTEL_METRICS_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: pip install "
                          "'poolsight[tracing]'") from None  # fmt: skip
    return OTLPMetricExporter()


def _instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class OtlpMetricsIntegration(Integration):
    """A daemon thread per process exporting its figures every interval; a final export on
    flush (a child about to exit) and uninstall."""

    name = "otlp_metrics"

    def __init__(self) -> None:
        self.exporter: Any = None
        self.interval = 60.0
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.start_ns = time.time_ns()
        self.instance = _instance()
        self.warned = False

    def install(self, runtime: Any) -> None:
        self.interval = interval_seconds()
        self.exporter = _exporter()
        self._start()

    def _start(self) -> None:
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="telemetry-otlp-metrics", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.export()

    def export(self) -> bool:
        """One export of this process's figures now; a failure is counted, never raised."""
        if self.exporter is None:
            return False
        with self.lock:
            try:
                data = metrics_data(INTERNAL.service, self.instance, self.start_ns, time.time_ns())
                result = self.exporter.export(data, timeout_millis=10_000)
                ok = getattr(result, "name", "") == "SUCCESS"
            except Exception as exc:
                hook_error("otlp_metrics.export", exc)
                ok = False
        STATS.inc("telemetry_otlp_metric_exports_total", (("service", INTERNAL.service), ("result", "ok" if ok else "failed")))
        if not ok and not self.warned:
            self.warned = True
            emit("warning", "telemetry_otlp_metrics_export_failed",
                 message="an OTLP metrics export failed (each one is counted in telemetry_otlp_metric_exports_total)")  # fmt: skip
        return ok

    def after_fork(self) -> None:
        """A child: its own resource, counts from 0 (the registry was reset), its own thread."""
        self.lock = threading.Lock()
        self.start_ns = time.time_ns()
        self.instance = _instance()
        if self.exporter is not None:
            self._start()

    def flush(self) -> None:
        self.export()

    def uninstall(self) -> None:
        self.stop_event.set()
        if self.thread is not None and self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        if self.exporter is not None:
            self.export()
            try:
                self.exporter.shutdown()
            except Exception as exc:
                hook_error("otlp_metrics.shutdown", exc)
        self.exporter = None
