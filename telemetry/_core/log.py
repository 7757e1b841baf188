"""Structured events, hook-error containment and the structlog configuration helper.

Nothing here configures logging at import. :func:`configure_logging` is the helper users call
whole, or they compose its processors (:func:`add_trace_context`, :class:`AddService`,
:func:`add_pid`) into their own structlog chain.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

from .stats import REGISTRY, Sample

#: structlog is imported when used (``configure_logging``, or an application that configured it
#: itself): importing it pulls rich and pygments in when they are installed, megabytes that an
#: app using neither should not pay for (docs/benchmarks.md, "Footprint")

try:  # tracing is an optional extra
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - exercised only without the tracing extra
    _otel_trace = None  # type: ignore[assignment]


def trace_ids(context: Any = None) -> dict[str, str]:
    """``trace_id``/``span_id`` (32/16 lowercase hex) of the span active in ``context`` (default:
    the current one), or ``{}`` when there is none, so that neither key appears outside a span."""
    if _otel_trace is None:
        return {}
    span_context = _otel_trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }


def add_trace_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add the active span's ids unless the event already names a trace."""
    if "trace_id" not in event_dict:
        event_dict.update(trace_ids())
    return event_dict


def add_pid(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add the process id (a uvicorn worker or Celery child is told apart)."""
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def drop_color_message(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: uvicorn attaches ``color_message`` (the message with terminal colour
    codes) to its records; JSON wants the plain ``event`` only."""
    event_dict.pop("color_message", None)
    return event_dict


def _is_console_handler(handler: logging.Handler) -> bool:
    """A plain stream handler on stdout/stderr, as ``logging.basicConfig()`` installs."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__,
    )  # fmt: skip


class AddService:
    """structlog processor: add ``service`` (events of the package already carry it)."""

    def __init__(self, service: str) -> None:
        self.service = service

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", self.service)
        return event_dict


_configured = False


def logging_configured() -> bool:
    return _configured


def configure_logging(
    service: str | None = None, *, level: str | int = "INFO", stream: TextIO | None = None
) -> None:
    """Send structlog events and standard-library records (Celery, uvicorn, SQLAlchemy) through
    one JSON renderer with service, pid, level, timestamp and trace context. Without
    ``service``, the process is named as :func:`telemetry.instrument` names it
    (``TELEMETRY_SERVICE_NAME``, ``OTEL_SERVICE_NAME``, else the program's name)."""
    if service is None:
        from .settings import service_name

        service = service_name()
    import structlog

    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(
                f"invalid log level {level!r}: expected one of DEBUG, INFO, WARNING, ERROR"
            )
        level = numeric
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        AddService(service),
        add_pid,
        add_trace_context,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), drop_color_message, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    handler.set_name("telemetry-json")
    root = logging.getLogger()
    # ours from an earlier call, and the console handler of logging.basicConfig(): left in place,
    # every record would print twice (once plain, once JSON). File and other handlers stay.
    for old in [h for h in root.handlers if h.get_name() == "telemetry-json" or _is_console_handler(h)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn and Celery install their own handlers; send their records through ours instead
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    global _configured
    _configured = True


class _InternalStats:
    """Counts what the package itself swallowed: hook errors and rate-limited events."""

    def __init__(self) -> None:
        self.service = "unknown"
        self.hook_errors: dict[str, int] = {}
        self.suppressed: dict[str, int] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def samples(self) -> Iterable[Sample]:
        svc = ("service", self.service)
        for hook, n in list(self.hook_errors.items()):
            yield "telemetry_hook_errors_total", (svc, ("hook", hook)), n
        for event, n in list(self.suppressed.items()):
            yield "telemetry_log_events_suppressed_total", (svc, ("event", event)), n

    def reset(self) -> None:
        self.hook_errors = {}
        self.suppressed = {}
        self._logged = set()


INTERNAL = _InternalStats()
REGISTRY.add(INTERNAL)


def after_fork_in_child() -> None:
    """A lock a parent thread held at fork time would never be released in the child."""
    INTERNAL._lock = threading.Lock()


def hook_error(hook: str, exc: BaseException) -> None:
    """Count an exception raised inside a hook and log it the first time only. Never raises."""
    try:
        with INTERNAL._lock:
            INTERNAL.hook_errors[hook] = INTERNAL.hook_errors.get(hook, 0) + 1
            first = hook not in INTERNAL._logged
            INTERNAL._logged.add(hook)
        if first:
            emit("error", "telemetry_hook_error", hook=hook, error=f"{type(exc).__name__}: {exc}",
                 note="counted in telemetry_hook_errors_total; logged once per hook")  # fmt: skip
    except Exception:  # pragma: no cover - logging itself broken; stay silent
        pass


def suppressed(event: str) -> None:
    INTERNAL.suppressed[event] = INTERNAL.suppressed.get(event, 0) + 1


_stdlib = logging.getLogger("telemetry")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}  # fmt: skip


def emit(level: str, event: str, **fields: Any) -> None:
    """Emit one structured event of the package (rare path: never called per checkout).

    Through structlog when the application configured it (``configure_logging`` or its own
    chain). Left at structlog's defaults, structlog would print its own console line to stdout,
    which a Celery worker then logs again under its own prefix: the event goes instead, as one
    record, to the standard library's ``telemetry`` logger, in whatever format the host set up
    (Celery's, uvicorn's, ``logging.basicConfig``'s), the fields as ``key=value``."""
    fields.setdefault("service", INTERNAL.service)
    structlog = sys.modules.get("structlog")  # never imported: the app cannot have configured it
    if structlog is not None and structlog.is_configured():
        getattr(structlog.get_logger("telemetry"), level)(event, **fields)
        return
    numeric = _LEVELS.get(level, logging.INFO)
    if _stdlib.isEnabledFor(numeric):
        pairs = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
        _stdlib.log(numeric, "%s %s", event, pairs, extra={"event": event, "event_fields": fields})
