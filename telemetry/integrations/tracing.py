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
import types
import uuid
from collections.abc import Sequence
from typing import Any

from telemetry._core import calls as _calls
from telemetry._core.integration import Integration
from telemetry._core.log import INTERNAL, hook_error
from telemetry._core.otel_private import set_resource_attribute
from telemetry._core.settings import ConfigError
from telemetry._core.stats import REGISTRY, LabeledStats

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
                # SDK >= 1.33 keeps the queue in a shared _batch_processor; older ones on self
                inner: Any = getattr(self, "_batch_processor", self)
                queue = getattr(inner, "_queue", None)
                if queue is None:
                    queue = inner.queue
                limit = getattr(inner, "_max_queue_size", None) or inner.max_queue_size
                if len(queue) >= limit:
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
    # shutdown_on_exit=False: the SDK's own atexit shutdown exports without a bound (3.5 s on a
    # refusing endpoint, 5.5 s on a black hole); the runtime's exit flush is bounded instead
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if exporter is not None:
        exporter_cls, processor_cls = _counting_classes()
        provider.add_span_processor(processor_cls(exporter_cls(exporter)))
    trace.set_tracer_provider(provider)
    _provider, _ours = provider, True
    return provider


# --------------------------------------------------------------------------- spans we make
#
# One SERVER span per HTTP request and one PRODUCER / CONSUMER span per Celery publish / run,
# started with the SDK's tracer and exported by its processors like any other span. What
# OpenTelemetry's ASGI and Celery instrumentations add on top (a span per ASGI message, their
# attribute machinery) costs four times as much per request and is left out; set
# ``http_spans="opentelemetry"`` to get OpenTelemetry's ASGI middleware back.

_PROPAGATION_HEADERS = {b"traceparent": "traceparent", b"tracestate": "tracestate", b"baggage": "baggage"}
_api: Any = None


def available() -> bool:
    """Whether the OpenTelemetry API is importable (spans are optional)."""
    return _load_api() is not None


def _load_api() -> Any:
    global _api
    if _api is None:
        try:
            from opentelemetry import baggage, context, propagate, trace
            from opentelemetry.trace import (
                NonRecordingSpan,
                SpanContext,
                SpanKind,
                Status,
                StatusCode,
                TraceFlags,
                TraceState,
            )
        except ImportError:
            return None

        _api = types.SimpleNamespace(
            context=context, propagate=propagate, trace=trace, SpanKind=SpanKind, Status=Status,
            StatusCode=StatusCode, tracer=trace.get_tracer("telemetry"),
            fast=_default_propagators(propagate), NonRecordingSpan=NonRecordingSpan,
            SpanContext=SpanContext, TraceState=TraceState, baggage=baggage,
            TraceFlags=TraceFlags, flags={0: TraceFlags(0), 1: TraceFlags(1)},  # the two seen in practice
        )  # fmt: skip
    return _api


def _default_propagators(propagate: Any) -> bool:
    """True when the global propagator is OpenTelemetry's default (W3C tracecontext + baggage):
    then ``traceparent`` is written and parsed here directly, several times faster than the
    composite propagator; with baggage present, or any other propagator configured
    (``OTEL_PROPAGATORS=b3``...), the configured one is used."""
    try:
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        textmap = propagate.get_global_textmap()
        if not isinstance(textmap, CompositePropagator):
            return False
        kinds = [type(p) for p in textmap._propagators]
        return kinds == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    except Exception:  # pragma: no cover - API internals changed: use the propagator
        return False


def _parse_traceparent(value: str, tracestate: str | None) -> Any:
    """A context whose current span is the remote parent ``value`` names, or None if invalid."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    api = _api
    state = api.TraceState.from_header([tracestate]) if tracestate else None
    trace_flags = api.flags.get(flags)  # (TraceFlags(0) is falsy: compare with None)
    if trace_flags is None:
        trace_flags = api.TraceFlags(flags)
    parent = api.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace_flags, trace_state=state)
    return api.trace.set_span_in_context(api.NonRecordingSpan(parent))


def start_server_span(scope: dict[str, Any], method: str, route: str) -> tuple[Any, Any]:
    """Start the request's SERVER span as a child of an incoming ``traceparent`` and make it
    current; returns ``(span, token)`` for :func:`end_server_span`."""
    api = _api or _load_api()
    carrier = None
    for name, value in scope.get("headers") or ():
        key = _PROPAGATION_HEADERS.get(name)
        if key is not None:
            if carrier is None:
                carrier = {}
            carrier[key] = value.decode("latin-1")
    parent = None
    if carrier:
        if api.fast and "baggage" not in carrier and "traceparent" in carrier:
            parent = _parse_traceparent(carrier["traceparent"], carrier.get("tracestate"))
        else:
            parent = api.propagate.extract(carrier)
    server = scope.get("server") or (None, None)
    attributes = {
        "http.request.method": method if method != "WEBSOCKET" else "GET",
        "http.route": route,
        "url.scheme": scope.get("scheme", "http"),
        "url.path": scope.get("path", ""),
    }
    name = f"{method} {route}"
    if method == "_OTHER":  # a method outside the known set: HTTP semantic conventions
        attributes["http.request.method_original"] = str(scope.get("method", ""))[:64]
        name = f"HTTP {route}"
    if server[0] is not None:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    span = api.tracer.start_span(name, context=parent, kind=api.SpanKind.SERVER,
                                 attributes=attributes)  # fmt: skip
    token = api.context.attach(api.trace.set_span_in_context(span, parent))
    return span, token


def end_server_span(span: Any, token: Any, status: int, error: BaseException | None) -> None:
    api = _api
    span.set_attribute("http.response.status_code", status)
    if error is not None and not isinstance(error, Exception):
        pass  # cancelled (client went away): not an error of the server
    elif error is not None or status >= 500:
        if error is not None:
            span.record_exception(error)
            span.set_attribute("error.type", type(error).__qualname__)
        else:
            span.set_attribute("error.type", str(status))
        span.set_status(api.Status(api.StatusCode.ERROR))
    span.end()
    api.context.detach(token)


def _task_attributes(task_name: str, task_id: str | None) -> dict[str, str]:
    attributes = {"celery.task_name": task_name}  # each attribute costs ~2 us of SDK validation
    if task_id:
        attributes["messaging.message.id"] = task_id
    return attributes


def start_run_span(task_name: str, task_id: str | None, parent: Any = None) -> tuple[Any, Any]:
    """The task's CONSUMER span ``run/<task>``, current until :func:`end_task_span`; named and
    attributed as OpenTelemetry's Celery instrumentation names it, so existing queries keep
    working."""
    api = _api or _load_api()
    span = api.tracer.start_span(f"run/{task_name}", context=parent, kind=api.SpanKind.CONSUMER,
                                 attributes=_task_attributes(task_name, task_id))  # fmt: skip
    token = api.context.attach(api.trace.set_span_in_context(span, parent))
    return span, token


def end_task_span(span: Any, token: Any, state: str | None = None, error: Any = None) -> None:
    api = _api
    if state:
        span.set_attribute("celery.state", state)
    if isinstance(error, BaseException):
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(api.Status(api.StatusCode.ERROR))
    span.end()
    try:
        api.context.detach(token)
    except Exception:  # detached in another context (a task that switched threads)
        pass


def start_producer_span(task_name: str, task_id: str | None) -> tuple[Any, Any]:
    """The publish span (not made current: it ends in another signal); returns it and the
    context to inject into the message."""
    api = _api or _load_api()
    span = api.tracer.start_span(f"apply_async/{task_name}", kind=api.SpanKind.PRODUCER,
                                 attributes=_task_attributes(task_name, task_id))  # fmt: skip
    return span, api.trace.set_span_in_context(span)


def inject(carrier: dict[str, Any], context: Any = None) -> None:
    """Write the trace context (default: the current one) into a message's headers."""
    api = _api or _load_api()
    if api.fast and not _has_baggage(api, context):
        ctx = api.trace.get_current_span(context).get_span_context()
        if ctx.is_valid:
            carrier["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
            if ctx.trace_state:
                carrier["tracestate"] = ctx.trace_state.to_header()
        return
    api.propagate.inject(carrier, context=context)


def _has_baggage(api: Any, context: Any) -> bool:
    return bool(api.baggage.get_all(context))


class _RequestGetter:
    """Reads propagation headers from a Celery ``task.request`` (message headers become its
    attributes)."""

    @staticmethod
    def get(carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)

    @staticmethod
    def keys(carrier: Any) -> list[str]:
        return []


def extract_from_request(request: Any) -> Any:
    """The parent context a task's message carried, or None."""
    traceparent = getattr(request, "traceparent", None)
    if traceparent is None:
        return None
    api = _api or _load_api()
    if api.fast and getattr(request, "baggage", None) is None and isinstance(traceparent, str):
        return _parse_traceparent(traceparent, getattr(request, "tracestate", None))
    return api.propagate.extract(request, getter=_RequestGetter)


def after_fork_in_child() -> None:
    """A new process: a new ``service.instance.id`` (the batch processor restarts itself)."""
    if _provider is None or not _ours:
        return
    try:
        set_resource_attribute(_provider, "service.instance.id", str(uuid.uuid4()))
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
        provider = setup(runtime.settings.service)
        if runtime.settings.trace_sql:
            self.sql_instrumentor = _instrument_sql()
        _calls.RECENT.enabled = True  # the calls a transaction waited for (its trace's CLIENT spans)
        if provider is not None and not getattr(provider, "_telemetry_calls", False):
            from opentelemetry.sdk.trace import SpanProcessor

            class CallsProcessor(SpanProcessor):
                """Notes the ended CLIENT spans (inert once uninstrumented: a processor cannot be
                removed from a provider)."""

                def on_end(self, span: Any) -> None:
                    _calls.noted(span)

            provider.add_span_processor(CallsProcessor())
            provider._telemetry_calls = True

    def uninstall(self) -> None:
        _calls.RECENT.enabled = False
        _calls.RECENT.clear()
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
    would instrument nothing on 2.1; tests/integrations/test_tracing.py proves its spans on the 2.1 we run."""
    import gc

    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from sqlalchemy.engine import Engine

    instrumentor = SQLAlchemyInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return None  # the application did it: not ours to remove
    existing = [o for o in gc.get_objects() if isinstance(o, Engine)]
    instrumentor.instrument(engines=existing, enable_commenter=False, skip_dep_check=True)
    return instrumentor
