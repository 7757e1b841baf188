"""The lifecycle: ``instrument()`` once per process, ``uninstrument()`` to remove everything.

``instrument()`` validates settings, installs the pool hooks, starts one housekeeper thread (long
hold watchdog and, in multiprocess mode, the periodic flush), and arranges for a forked child to
start clean. A second call is a no-op that returns the settings already in force.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

import prometheus_client

from . import _exposition, _log, _multiprocess, _stats, _versions
from ._settings import ConfigError, Settings

_lock = threading.RLock()


class _Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process_file: _multiprocess.ProcessFile | None = None
        self.collector: _exposition.TelemetryCollector | None = None
        self.housekeeper: _Housekeeper | None = None
        self.complete = False  # instrument() ran (instrument_sqlalchemy() alone starts less)
        self.sql_instrumentor: Any = None


_runtime: _Runtime | None = None
_fork_hook_registered = False


class _Housekeeper:
    """One daemon thread per process: long-hold watchdog and multiprocess flush."""

    def __init__(self, runtime: _Runtime) -> None:
        self.runtime = runtime
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="telemetry-housekeeper", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        settings = self.runtime.settings
        interval = settings.watchdog_interval_seconds
        if self.runtime.process_file is not None:
            interval = min(interval, settings.flush_interval_seconds)
        next_flush = 0.0
        import time

        while not self.stop_event.wait(interval):
            self.tick()
            pf = self.runtime.process_file
            if pf is not None and time.monotonic() >= next_flush:
                try:
                    pf.flush()
                except Exception as exc:
                    _log.hook_error("multiprocess.flush", exc)
                next_flush = time.monotonic() + settings.flush_interval_seconds

    def tick(self) -> None:
        try:
            if self.runtime.settings.sqlalchemy:
                from . import _pool

                _pool.scan_long_holds()
            from . import _asyncio

            _asyncio.check_loops()
        except Exception as exc:
            _log.hook_error("watchdog", exc)


def _check_stock_env(directory: str) -> None:
    stock = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not stock:
        return
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        _log.emit(
            "warning", "telemetry_multiproc_env_late",
            setting="PROMETHEUS_MULTIPROC_DIR", directory=stock,
            message="PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: your "
            "own prometheus_client metrics stay per-process (the package's metrics are not "
            "affected). Set it in the environment before the process starts.",
        )  # fmt: skip


def instrument(service: str | None = None, **settings: Any) -> Settings:
    """Instrument this process: every SQLAlchemy pool (sync and async, created before or after
    this call), structured events and metrics. Call once at start-up of the API and each worker.

    Settings come from keyword arguments, else ``TELEMETRY_*``/``OTEL_*`` environment variables;
    an invalid one raises :class:`ConfigError` naming it and the accepted values.
    """
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.complete:
            return _runtime.settings
        loaded = Settings.load(service=service, **settings)
        runtime = _runtime or _start_runtime(loaded)
        runtime.settings = loaded
        _log.INTERNAL.service = loaded.service
        if loaded.sqlalchemy:
            _install_sqlalchemy(loaded, auto=True)
        _install_integrations(loaded, runtime)
        runtime.complete = True
        return loaded


def _start_runtime(loaded: Settings) -> _Runtime:
    """What every public verb needs under it: the exposition (this process's collector, or its
    file in the multiprocess directory), the housekeeper thread and the fork hook."""
    global _runtime
    runtime = _Runtime(loaded)
    _log.INTERNAL.service = loaded.service
    if loaded.multiproc_dir:
        _multiprocess.check_dir(loaded.multiproc_dir)
        runtime.process_file = _multiprocess.ProcessFile(loaded.multiproc_dir)
        try:
            runtime.process_file.flush()
        except OSError as exc:
            raise ConfigError(
                f"invalid TELEMETRY_MULTIPROC_DIR={loaded.multiproc_dir!r}: cannot write "
                f"there ({exc})"
            ) from None
        _check_stock_env(loaded.multiproc_dir)
    else:
        runtime.collector = _exposition.TelemetryCollector()
        prometheus_client.REGISTRY.register(runtime.collector)
    runtime.housekeeper = _Housekeeper(runtime)
    runtime.housekeeper.start()
    _runtime = runtime
    _register_fork_hook()
    if runtime.process_file is not None:
        _flush_at_child_exit()
    return runtime


def _install_sqlalchemy(settings: Settings, *, auto: bool) -> None:
    if not _available("sqlalchemy"):
        if auto:
            return  # nothing to instrument in this process
        raise ImportError("instrument_sqlalchemy() needs SQLAlchemy, which is not installed")
    _versions.check("sqlalchemy")
    from . import _pool

    _pool.CONFIG.service = settings.service
    _pool.CONFIG.hold_threshold = settings.hold_threshold_seconds
    _pool.CONFIG.critical_ratio = settings.critical_usage_ratio
    _pool.CONFIG.critical_interval = settings.critical_log_interval_seconds
    _pool.CONFIG.max_owners = settings.max_owners
    _pool.CONFIG.connection_limit = settings.connection_limit
    _pool.install(auto=auto)


def _available(module: str) -> bool:
    """Whether ``module`` can be imported; ``find_spec("a.b")`` raises when ``a`` is missing."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _install_integrations(settings: Settings, runtime: _Runtime) -> None:
    from . import _asyncio

    _asyncio.CONFIG.blocked_threshold = settings.loop_blocked_seconds
    _asyncio.relabel_semaphores(settings.service)
    _asyncio.install_loop_hook()
    if settings.tracing and _available("opentelemetry.sdk"):
        from . import _tracing

        _tracing.setup(settings.service)
        if settings.trace_sql:
            import gc

            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
            from sqlalchemy.engine import Engine

            instrumentor = SQLAlchemyInstrumentor()
            if not instrumentor.is_instrumented_by_opentelemetry:
                # engines that exist now, and those created later through sqlalchemy's module
                # functions (a create_async_engine imported before this call is not seen).
                # skip_dep_check: it declares sqlalchemy < 2.1 and would instrument nothing on
                # 2.1; tests/test_tracing.py proves its statement spans on the 2.1 we run.
                existing = [o for o in gc.get_objects() if isinstance(o, Engine)]
                instrumentor.instrument(engines=existing, enable_commenter=False, skip_dep_check=True)
                runtime.sql_instrumentor = instrumentor
    if settings.celery and _available("celery"):
        _versions.check("celery")
        from . import _celery

        _celery.install(spans=settings.tracing)
    if settings.fastapi and _available("starlette"):
        _versions.check("starlette")
        _versions.check("fastapi")
        from . import _asgi

        _asgi.TRACING["enabled"] = settings.tracing
        _asgi.install()


def instrument_celery() -> None:
    """Celery task metrics, owner attribution, spans and prefork lifecycle (part of
    :func:`instrument`; call it alone to get only this)."""
    from . import _celery

    _celery.install()


def instrument_fastapi(app: Any = None) -> None:
    """Request metrics by route template, pool-wait split and spans for every Starlette/FastAPI
    app (part of :func:`instrument`); with ``app``, also rebuild that app's middleware now."""
    from . import _asgi

    if app is None:
        _asgi.install()
    else:
        _asgi.instrument_app(app)


def instrument_sqlalchemy(engine: Any, name: str | None = None) -> None:
    """Instrument one engine (sync ``Engine`` or ``AsyncEngine``) under ``name``; without a
    name, the pool is named by its ``pool_logging_name`` or its URL without credentials."""
    from . import _pool

    with _lock:
        runtime = _runtime or _start_runtime(Settings.load())  # so what it measures is exported
        if not _pool.installed():
            _install_sqlalchemy(runtime.settings, auto=False)
        _pool.register_engine(engine, name)


def uninstrument() -> None:
    """Remove every hook, listener, thread and collector :func:`instrument` attached, and forget
    what was measured (tests rely on starting from nothing)."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
        if runtime is not None:
            if runtime.housekeeper is not None:
                runtime.housekeeper.stop()
            if runtime.process_file is not None:
                try:
                    runtime.process_file.flush()
                except OSError:
                    pass
            if runtime.collector is not None:
                prometheus_client.REGISTRY.unregister(runtime.collector)
            if runtime.sql_instrumentor is not None:
                runtime.sql_instrumentor.uninstrument()
        import sys

        for name in ("_pool", "_celery", "_asgi", "_asyncio"):
            module = sys.modules.get(f"{__package__}.{name}")
            if module is not None:
                teardown = getattr(module, "uninstall", None) or module.reset
                teardown()
        _stats.REGISTRY.reset_all()
        if "telemetry._pool" in sys.modules:
            from ._pool import PoolState

            _stats.REGISTRY.discard(lambda s: isinstance(s, PoolState))


def is_instrumented() -> bool:
    return _runtime is not None


def settings() -> Settings | None:
    return _runtime.settings if _runtime else None


def flush() -> None:
    """Write this process's measurements to the multiprocess directory now (no-op otherwise)."""
    runtime = _runtime
    if runtime is not None and runtime.process_file is not None:
        runtime.process_file.flush()


def scan_now() -> None:
    """Run the long-hold watchdog once, now (tests and shutdown hooks)."""
    runtime = _runtime
    if runtime is not None and runtime.housekeeper is not None:
        runtime.housekeeper.tick()


def metrics_app() -> Any:
    """An ASGI app serving ``/metrics``: this process, or the host aggregate in multiprocess
    mode (plus prometheus-client's default registry in single-process mode)."""
    runtime = _runtime
    if runtime is not None and runtime.settings.multiproc_dir:
        return _exposition.asgi_app(
            _exposition.host_registry(runtime.settings.multiproc_dir, runtime.process_file)
        )
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
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"invalid port={port!r}: expected a whole number in [0, 65535]")
    if basic_auth is not None and bearer_token is not None:
        raise ConfigError("start_metrics_server: give basic_auth or bearer_token, not both")
    runtime = _runtime
    directory = directory or (runtime.settings.multiproc_dir if runtime else None)
    if directory:
        _multiprocess.check_dir(directory)
        own = runtime.process_file if runtime else None
        registry = _exposition.host_registry(directory, own)
    else:
        registry = prometheus_client.REGISTRY
    return _exposition.serve(registry, port, addr, basic_auth=basic_auth, bearer_token=bearer_token)


def _after_fork_in_child() -> None:
    """Locks a parent thread may have held, per-process tables and counts: all start anew."""
    global _lock
    import sys

    _lock = threading.RLock()
    _stats.REGISTRY._lock = threading.Lock()
    _log.INTERNAL._lock = threading.Lock()
    _multiprocess.after_fork_in_child()
    modules = {name: sys.modules.get(f"{__package__}.{name}") for name in ("_pool", "_asyncio", "_celery", "_tracing")}
    if modules["_pool"] is not None:
        modules["_pool"]._lock = threading.RLock()  # type: ignore[attr-defined]
        modules["_pool"].after_fork_in_child()
    if modules["_asyncio"] is not None:
        modules["_asyncio"].after_fork_in_child()
    if modules["_celery"] is not None:
        modules["_celery"]._running.clear()
    if modules["_tracing"] is not None:
        modules["_tracing"].after_fork_in_child()
    _stats.REGISTRY.reset_all()  # every counter, histogram and gauge of every source
    runtime = _runtime
    if runtime is None:
        return
    if runtime.process_file is not None:
        runtime.process_file.renew()
        _flush_at_child_exit()
    runtime.housekeeper = _Housekeeper(runtime)
    runtime.housekeeper.start()


def _flush_at_child_exit() -> None:
    """multiprocessing and billiard (Celery prefork) children leave through ``os._exit``, which
    skips ``atexit``. Their finalizers do run, but ``_bootstrap`` clears the registry right after
    fork, so the finalizer is registered from their own after-fork hook, which runs later."""
    import sys

    for name in ("multiprocessing.util", "billiard.util"):
        util = sys.modules.get(name)
        if util is None:
            continue
        try:
            runtime = _runtime
            if runtime is not None and not getattr(runtime, f"_hooked_{name}", False):
                util.register_after_fork(runtime, _make_finalizer(util))
                setattr(runtime, f"_hooked_{name}", True)
            util.Finalize(None, _at_exit, exitpriority=100)
        except Exception as exc:  # pragma: no cover - defensive
            _log.hook_error("multiprocess.finalizer", exc)


def _make_finalizer(util: Any) -> Any:
    def register(_runtime_obj: Any) -> None:
        util.Finalize(None, _at_exit, exitpriority=100)

    return register


def _at_exit() -> None:
    import sys

    tracing = sys.modules.get(f"{__package__}._tracing")
    if tracing is not None:
        tracing.flush()
    runtime = _runtime
    if runtime is not None and runtime.process_file is not None:
        try:
            runtime.process_file.flush()
        except Exception:
            pass


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(_at_exit)
        _fork_hook_registered = True
