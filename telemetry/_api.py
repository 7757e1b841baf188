"""The public verbs: ``instrument()`` once per process, ``uninstrument()`` to remove everything.

``instrument()`` validates settings, starts the runtime (``_runtime``) and installs every
integration whose library is present: SQLAlchemy pools, asyncio, tracing, Celery, ASGI. Each is
an :class:`~telemetry._core.integration.Integration` that records what it attached, so
``uninstrument()`` removes exactly that. A second ``instrument()`` is a no-op that returns the
settings already in force. The per-integration verbs install one integration on the same
runtime.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import prometheus_client

from ._core import bounds as _bounds
from ._core import exposition as _exposition
from ._core import log as _log
from ._core import runtime as _runtime
from ._core import stats as _stats
from ._core import versions as _versions
from ._core.integration import Integration
from ._core.runtime import Runtime
from ._core.settings import ConfigError, Settings


def _available(module: str) -> bool:
    """Whether ``module`` can be imported; ``find_spec("a.b")`` raises when ``a`` is missing."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _runtime_for(settings: Settings | None = None) -> Runtime:
    return _runtime.current() or Runtime.start(settings or Settings.load())


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One integration as ``instrument()`` and its verb install it: the setting that wants it,
    the modules it needs (absent: skipped, or an error when ``required``), the libraries whose
    tested version range is checked, and where its :class:`Integration` lives."""

    name: str
    wanted: Callable[[Settings], bool]
    module: str
    cls: str
    needs: tuple[str, ...] = ()
    versions: tuple[str, ...] = ()
    required: str = ""  # the error when a needed module is missing, for an integration asked for explicitly

    def available(self) -> bool:
        return all(_available(m) for m in self.needs)

    def install(self, runtime: Runtime, **kwargs: Any) -> Integration | None:
        if not self.available():
            if self.required:
                raise ConfigError(self.required)
            return None
        for library in self.versions:
            _versions.check(library)
        integration_cls = getattr(importlib.import_module(self.module, __package__), self.cls)
        integration = runtime.add(integration_cls(**kwargs))
        after = getattr(integration, "enable_auto", None)
        if after is not None and kwargs.get("auto", True):  # instrument() after instrument_sqlalchemy()
            after()
        return integration


#: every integration, in the order instrument() installs them (uninstall runs in reverse)
INTEGRATIONS: tuple[_Entry, ...] = (
    _Entry("sqlalchemy", lambda s: s.sqlalchemy, ".integrations.sqlalchemy.engines", "SQLAlchemyIntegration", ("sqlalchemy",), ("sqlalchemy",)),
    _Entry("asyncio", lambda s: True, ".integrations.asyncio", "AsyncioIntegration"),
    _Entry("tracing", lambda s: s.tracing, ".integrations.tracing", "TracingIntegration", ("opentelemetry.sdk",)),
    _Entry("otlp_metrics", lambda s: s.otlp_metrics, ".integrations.otlp", "OtlpMetricsIntegration", ("opentelemetry.sdk",),
           required="OTEL_METRICS_EXPORTER=otlp (otlp_metrics) needs the OpenTelemetry SDK and its OTLP exporter: "
                    "pip install 'poolsight[tracing]'"),
    _Entry("redis", lambda s: s.redis, ".integrations.redis", "RedisIntegration", ("redis",), ("redis",)),
    _Entry("psycopg_pool", lambda s: s.psycopg_pool, ".integrations.psycopg_pool", "PsycopgPoolIntegration", ("psycopg_pool",), ("psycopg_pool",)),
    _Entry("asyncpg_pool", lambda s: s.asyncpg_pool, ".integrations.asyncpg_pool", "AsyncpgPoolIntegration", ("asyncpg",), ("asyncpg",)),
    _Entry("celery", lambda s: s.celery, ".integrations.celery.tasks", "CeleryIntegration", ("celery",), ("celery",)),
    _Entry("asgi", lambda s: s.fastapi, ".integrations.asgi", "ASGIIntegration", ("starlette",), ("starlette", "fastapi")),
    _Entry("shared_view", lambda s: bool(s.server_view_url or s.pgbouncer_url or s.pooler_metrics_url),
           ".server_view.poller", "SharedViewIntegration"),
)  # fmt: skip
_BY_NAME = {e.name: e for e in INTEGRATIONS}


def _verb(name: str) -> Integration:
    """Install one integration on this process's runtime (its verb); an absent library is an error."""
    entry = _BY_NAME[name]
    if not entry.available():
        raise ImportError(f"instrument_{name}() needs {', '.join(entry.needs)}, which is not installed")
    with _runtime.LOCK:
        integration = entry.install(_runtime_for(), **({"auto": False} if name == "sqlalchemy" else {}))
    assert integration is not None
    return integration


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
        for entry in INTEGRATIONS:  # in order: the pools first, the shared view last
            if entry.wanted(loaded):
                entry.install(runtime)
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


def instrument_sqlalchemy(engine: Any, name: str | None = None) -> None:
    """Instrument one engine (sync ``Engine`` or ``AsyncEngine``) under ``name``; without a
    name, the pool is named by its ``pool_logging_name`` or its URL without credentials."""
    if not _available("sqlalchemy"):
        raise ImportError("instrument_sqlalchemy() needs SQLAlchemy, which is not installed")
    _verb("sqlalchemy").register_engine(engine, name)  # type: ignore[attr-defined]


def instrument_celery() -> None:
    """Celery task metrics, owner attribution, spans and prefork lifecycle (part of
    :func:`instrument`; call it alone to get only this)."""
    _verb("celery")


def instrument_redis() -> None:
    """redis-py pools (sync and asyncio): in use, waiters, wait, timeouts, holds by owner, long
    holds (part of :func:`instrument`; call it alone to get only this)."""
    _verb("redis")


def instrument_psycopg_pool() -> None:
    """psycopg_pool's pools (sync and async): in use, idle, size, min and max, waiting requests,
    wait, timeouts, holds by owner, long holds, leaks (part of :func:`instrument`; call it alone
    to get only this)."""
    _verb("psycopg_pool")


def instrument_asyncpg_pool() -> None:
    """asyncpg's pools (``asyncpg.create_pool()``): the same figures, named ``host:port/db``
    (part of :func:`instrument`; call it alone to get only this)."""
    _verb("asyncpg_pool")


def instrument_fastapi(app: Any = None) -> None:
    """Request metrics by route template, pool-wait split and spans for every Starlette/FastAPI
    app (part of :func:`instrument`); with ``app``, also rebuild that app's middleware now."""
    from .integrations.asgi import instrument_app

    _verb("asgi")
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
    from ._core import multiprocess as _multiprocess

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
