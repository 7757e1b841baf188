"""Tracing set-up: a TracerProvider per process, exporting over OTLP as the ``OTEL_*`` variables
say, with nothing lost silently.

- Resource: ``service.name`` and a ``service.instance.id`` unique to the process, renewed in a
  forked child (uvicorn workers, Celery prefork children).
- Exporter: OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT`` is set,
  ``console`` or ``none`` by ``OTEL_TRACES_EXPORTER``; with neither, spans are recorded (trace ids
  in logs work) and nothing goes on the network.
- Every finished span is counted in ``telemetry_spans_total{result}``: exported, failed (the
  endpoint refused or was down) or dropped (the queue was full; read at enqueue, so an export
  taking a batch at that instant can make it over-count by at most that batch). A dead collector costs the app a
  full queue, never latency: export runs on the batch processor's thread.
- A child that exits (``max_tasks_per_child``, including 1) flushes before it goes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

from ._integration import Integration
from ._log import INTERNAL, hook_error
from ._settings import ConfigError
from ._stats import REGISTRY, LabeledStats

STATS = LabeledStats()
REGISTRY.add(STATS)

_provider: Any = None
_ours = False


def _count(result: str, n: int) -> None:
    STATS.inc("telemetry_spans_total", (("service", INTERNAL.service), ("result", result)), n)


def _exporter_from_env() -> Any:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind not in ("", "otlp"):
        raise ConfigError(f"invalid environment variable OTEL_TRACES_EXPORTER={kind!r}: expected one of otlp, console, none")
    if not endpoint:
        return None
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ConfigError(
            f"invalid environment variable OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected "
            "http/protobuf (install opentelemetry-exporter-otlp-proto-grpc and configure the "
            "provider yourself for grpc)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _counting_classes() -> tuple[type, type]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def export(self, spans: Sequence[Any]) -> Any:
            try:
                result = self.inner.export(spans)
            except Exception as exc:
                hook_error("tracing.export", exc)
                result = SpanExportResult.FAILURE
            _count("exported" if result == SpanExportResult.SUCCESS else "failed", len(spans))
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(self.inner.force_flush(timeout_millis))

    class CountingBatchSpanProcessor(BatchSpanProcessor):
        def on_end(self, span: Any) -> None:
            try:
                inner = self._batch_processor
                if len(inner._queue) >= inner._max_queue_size:
                    _count("dropped", 1)  # the deque drops its oldest span to take this one
            except Exception as exc:  # pragma: no cover - SDK internals changed
                hook_error("tracing.queue", exc)
            super().on_end(span)

    return CountingExporter, CountingBatchSpanProcessor


def setup(service: str) -> Any:
    """Install the global TracerProvider (once per process). If the application already set an
    SDK provider, it is kept and used as it is."""
    global _provider, _ours
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ImportError("tracing needs the 'tracing' extra: pip install 'poolsight[tracing]'") from exc
    exporter = _exporter_from_env()  # validate before changing anything
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        _provider = current
        return current
    resource = Resource.create({"service.name": service, "service.instance.id": str(uuid.uuid4())})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        exporter_cls, processor_cls = _counting_classes()
        provider.add_span_processor(processor_cls(exporter_cls(exporter)))
    trace.set_tracer_provider(provider)
    _provider, _ours = provider, True
    return provider


def after_fork_in_child() -> None:
    """A new process: a new ``service.instance.id`` (the batch processor restarts itself)."""
    if _provider is None or not _ours:
        return
    try:
        from opentelemetry.attributes import BoundedAttributes

        resource = _provider.resource
        attrs = dict(resource.attributes)
        attrs["service.instance.id"] = str(uuid.uuid4())
        resource._attributes = BoundedAttributes(attributes=attrs)
    except Exception as exc:  # pragma: no cover - SDK internals changed
        hook_error("tracing.fork", exc)


def flush(timeout_seconds: float = 5.0) -> None:
    if _provider is not None:
        try:
            _provider.force_flush(int(timeout_seconds * 1000))
        except Exception as exc:
            hook_error("tracing.flush", exc)


def instance_id() -> str | None:
    if _provider is None:
        return None
    value = _provider.resource.attributes.get("service.instance.id")
    return str(value) if value is not None else None


class TracingIntegration(Integration):
    """The TracerProvider (kept for the process: OpenTelemetry's global provider cannot be
    unset) and, with ``trace_sql``, OpenTelemetry's SQLAlchemy instrumentation (removed on
    uninstall)."""

    name = "tracing"

    def __init__(self) -> None:
        self.sql_instrumentor: Any = None

    def install(self, runtime: Any) -> None:
        setup(runtime.settings.service)
        if runtime.settings.trace_sql:
            self.sql_instrumentor = _instrument_sql()

    def uninstall(self) -> None:
        if self.sql_instrumentor is not None:
            self.sql_instrumentor.uninstrument()
            self.sql_instrumentor = None

    def after_fork(self) -> None:
        after_fork_in_child()

    def flush(self) -> None:
        flush()


def _instrument_sql() -> Any:
    """Statement spans from opentelemetry-instrumentation-sqlalchemy, on the engines that exist
    now and those created later through sqlalchemy's module functions (a create_async_engine
    imported before this call is not seen). ``skip_dep_check``: it declares sqlalchemy < 2.1 and
    would instrument nothing on 2.1; tests/test_tracing.py proves its spans on the 2.1 we run."""
    import gc

    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from sqlalchemy.engine import Engine

    instrumentor = SQLAlchemyInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return None  # the application did it: not ours to remove
    existing = [o for o in gc.get_objects() if isinstance(o, Engine)]
    instrumentor.instrument(engines=existing, enable_commenter=False, skip_dep_check=True)
    return instrumentor
