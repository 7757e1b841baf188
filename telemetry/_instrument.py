"""The public verbs: ``instrument()`` once per process, ``uninstrument()`` to remove everything.

``instrument()`` validates settings, starts the runtime (``_runtime``) and installs every
integration whose library is present: SQLAlchemy pools, asyncio, tracing, Celery, ASGI. Each is
an :class:`~telemetry._integration.Integration` that records what it attached, so
``uninstrument()`` removes exactly that. A second ``instrument()`` is a no-op that returns the
settings already in force. The per-integration verbs install one integration on the same
runtime.
"""

from __future__ import annotations

from typing import Any

import prometheus_client

from . import _bounds, _exposition, _log, _runtime, _stats, _versions
from ._runtime import Runtime
from ._settings import ConfigError, Settings


def _available(module: str) -> bool:
    """Whether ``module`` can be imported; ``find_spec("a.b")`` raises when ``a`` is missing."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _runtime_for(settings: Settings | None = None) -> Runtime:
    return _runtime.current() or Runtime.start(settings or Settings.load())


def instrument(service: str | None = None, **settings: Any) -> Settings:
    """Instrument this process: every SQLAlchemy pool (sync and async, created before or after
    this call), asyncio loops and semaphores, redis-py pools, Celery, FastAPI/Starlette and
    tracing, when their libraries are installed. Call once at start-up of the API and each worker.

    Settings come from keyword arguments, else ``TELEMETRY_*``/``OTEL_*`` environment variables;
    an invalid one raises :class:`ConfigError` naming it and the accepted values.
    """
    with _runtime.LOCK:
        current = _runtime.current()
        if current is not None and current.complete:
            _check_same(current.settings, service=service, **settings)
            return current.settings
        loaded = Settings.load(service=service, **settings)
        runtime = current or Runtime.start(loaded)
        runtime.settings = loaded
        _log.INTERNAL.service = loaded.service
        if loaded.sqlalchemy and _available("sqlalchemy"):
            _add_sqlalchemy(runtime, auto=True)
        from ._asyncio import AsyncioIntegration

        runtime.add(AsyncioIntegration())
        if loaded.tracing and _available("opentelemetry.sdk"):
            from ._tracing import TracingIntegration

            runtime.add(TracingIntegration())
        if loaded.otlp_metrics:
            if not _available("opentelemetry.sdk"):
                raise ConfigError("OTEL_METRICS_EXPORTER=otlp (otlp_metrics) needs the OpenTelemetry SDK and its OTLP "
                                  "exporter: pip install 'poolsight[tracing]'")  # fmt: skip
            from ._otlp import OtlpMetricsIntegration

            runtime.add(OtlpMetricsIntegration())
        if loaded.redis and _available("redis"):
            _versions.check("redis")
            from ._redis import RedisIntegration

            runtime.add(RedisIntegration())
        if loaded.celery and _available("celery"):
            _versions.check("celery")
            from ._celery import CeleryIntegration

            runtime.add(CeleryIntegration())
        if loaded.fastapi and _available("starlette"):
            _versions.check("starlette")
            _versions.check("fastapi")
            from ._asgi import ASGIIntegration

            runtime.add(ASGIIntegration())
        if loaded.server_view_url or loaded.pgbouncer_url or loaded.pooler_metrics_url:
            from ._shared import SharedViewIntegration

            runtime.add(SharedViewIntegration())
        runtime.complete = True
        return loaded


def _check_same(current: Settings, **given: Any) -> None:
    """A second ``instrument()`` is a no-op, unless it asks for something else than what is in
    force (another service name, another setting): that is refused, naming both, instead of
    being silently ignored."""
    asked = Settings.load(**{k: v for k, v in given.items() if v is not None})
    differ = [k for k, v in given.items() if v is not None and getattr(asked, k) != getattr(current, k)]
    if differ:
        pairs = ", ".join(f"{k}={getattr(asked, k)!r} (in force: {getattr(current, k)!r})" for k in differ)
        raise ConfigError(
            f"instrument() was already called in this process; this call asks for {pairs}. "
            "Call instrument() once per process, or uninstrument() before changing settings"
        )


def _add_sqlalchemy(runtime: Runtime, *, auto: bool) -> Any:
    _versions.check("sqlalchemy")
    from ._sqlalchemy import SQLAlchemyIntegration

    integration = runtime.add(SQLAlchemyIntegration(auto=auto))
    if auto:
        integration.enable_auto()  # type: ignore[attr-defined]
    return integration


def instrument_sqlalchemy(engine: Any, name: str | None = None) -> None:
    """Instrument one engine (sync ``Engine`` or ``AsyncEngine``) under ``name``; without a
    name, the pool is named by its ``pool_logging_name`` or its URL without credentials."""
    if not _available("sqlalchemy"):
        raise ImportError("instrument_sqlalchemy() needs SQLAlchemy, which is not installed")
    with _runtime.LOCK:
        runtime = _runtime_for()  # so what it measures is exported
        integration = _add_sqlalchemy(runtime, auto=False)
        integration.register_engine(engine, name)


def instrument_celery() -> None:
    """Celery task metrics, owner attribution, spans and prefork lifecycle (part of
    :func:`instrument`; call it alone to get only this)."""
    from ._celery import CeleryIntegration

    with _runtime.LOCK:
        _runtime_for().add(CeleryIntegration())


def instrument_fastapi(app: Any = None) -> None:
    """Request metrics by route template, pool-wait split and spans for every Starlette/FastAPI
    app (part of :func:`instrument`); with ``app``, also rebuild that app's middleware now."""
    from ._asgi import ASGIIntegration, instrument_app

    with _runtime.LOCK:
        _runtime_for().add(ASGIIntegration())
    if app is not None:
        instrument_app(app)


def uninstrument() -> None:
    """Remove every hook, listener, signal, thread, instrumentor and collector the verbs
    attached, and forget what was measured (tests rely on starting from nothing)."""
    with _runtime.LOCK:
        runtime = _runtime.current()
        if runtime is not None:
            runtime.stop()
        _stats.REGISTRY.reset_all()
        _bounds.reset()


def is_instrumented() -> bool:
    """Whether this process has a telemetry runtime (``instrument()`` or a verb ran)."""
    return _runtime.current() is not None


def settings() -> Settings | None:
    runtime = _runtime.current()
    return runtime.settings if runtime else None


def flush() -> None:
    """Write this process's measurements to the multiprocess directory now (no-op otherwise)."""
    runtime = _runtime.current()
    if runtime is not None and runtime.process_file is not None:
        runtime.process_file.flush()


def scan_now() -> None:
    """Run the watchdogs once, now (tests and shutdown hooks)."""
    runtime = _runtime.current()
    if runtime is not None:
        runtime.tick()


def metrics_app() -> Any:
    """An ASGI app serving ``/metrics``: this process, or the host aggregate in multiprocess
    mode (plus prometheus-client's default registry in single-process mode). Route it with
    ``app.add_route("/metrics", telemetry.metrics_app())`` or mount it."""
    runtime = _runtime.current()
    if runtime is not None and runtime.settings.multiproc_dir:
        return _exposition.asgi_app(runtime.registry())
    return _exposition.asgi_app(prometheus_client.REGISTRY)


def start_metrics_server(
    port: int,
    addr: str = "127.0.0.1",
    directory: str | None = None,
    *,
    basic_auth: tuple[str, str] | None = None,
    bearer_token: str | None = None,
) -> Any:
    """Serve ``/metrics`` on a thread: the host aggregate of ``directory`` (default: the
    configured multiprocess directory) or this process. Binds to loopback unless told otherwise;
    ``basic_auth=(user, password)`` or ``bearer_token`` protect it (401 otherwise)."""
    from . import _multiprocess

    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"invalid port={port!r}: expected a whole number in [0, 65535]")
    if basic_auth is not None and bearer_token is not None:
        raise ConfigError("start_metrics_server: give basic_auth or bearer_token, not both")
    runtime = _runtime.current()
    if runtime is not None:  # stopped by uninstrument(), like everything instrument() started
        return runtime.serve_metrics(port, addr, directory, basic_auth=basic_auth, bearer_token=bearer_token)
    if directory:
        _multiprocess.check_dir(directory)
        registry = _exposition.host_registry(directory, None)
    else:
        registry = prometheus_client.REGISTRY
    return _exposition.serve(registry, port, addr, basic_auth=basic_auth, bearer_token=bearer_token)
