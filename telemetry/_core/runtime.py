"""What every integration runs on: settings, the exposition, the housekeeper and the fork hook.

One :class:`Runtime` per process, created by the first public verb (``instrument()``, or
``instrument_sqlalchemy()`` alone) and torn down by ``uninstrument()``:

* exposition: in single-process mode a collector on prometheus-client's default registry; with a
  multiprocess directory, this process's file there (flushed by the housekeeper and at exit);
* the housekeeper: one daemon thread that ticks every integration (long-hold watchdog, loop
  watchdog) and flushes the process file;
* the integrations, installed in order and uninstalled in reverse;
* after ``fork()``: the core modules reset their own locks and tables, every integration its
  per-process state, the process file takes the child's identity, a new housekeeper starts.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from typing import Any

import prometheus_client

from . import exposition as _exposition
from . import log as _log
from . import loops as _loops
from . import multiprocess as _multiprocess
from . import stats as _stats
from .integration import Integration
from .settings import ConfigError, Settings

LOCK = threading.RLock()
_current: Runtime | None = None
_fork_hook_registered = False


def current() -> Runtime | None:
    return _current


class _Housekeeper:
    """One daemon thread per process: integration ticks and the multiprocess flush."""

    def __init__(self, runtime: Runtime) -> None:
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
        while not self.stop_event.wait(interval):
            self.runtime.tick()
            pf = self.runtime.process_file
            if pf is not None and time.monotonic() >= next_flush:
                try:
                    pf.flush()
                except Exception as exc:
                    _log.hook_error("multiprocess.flush", exc)
                next_flush = time.monotonic() + settings.flush_interval_seconds


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process_file: _multiprocess.ProcessFile | None = None
        self.collector: _exposition.TelemetryCollector | None = None
        self.housekeeper: _Housekeeper | None = None
        self.integrations: dict[str, Integration] = {}
        self.complete = False  # instrument() ran (instrument_sqlalchemy() alone starts less)
        self.metrics_servers: list[Any] = []

    # ------------------------------------------------------------------ start and stop

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        """Create this process's runtime (under :data:`LOCK`)."""
        global _current
        runtime = cls(settings)
        _log.INTERNAL.service = settings.service
        if settings.multiproc_dir:
            _multiprocess.check_dir(settings.multiproc_dir)
            runtime.process_file = _multiprocess.ProcessFile(settings.multiproc_dir)
            try:
                runtime.process_file.flush()
            except OSError as exc:
                raise ConfigError(
                    f"invalid TELEMETRY_MULTIPROC_DIR={settings.multiproc_dir!r}: cannot write "
                    f"there ({exc})"
                ) from None
            _check_stock_env()
        else:
            runtime.collector = _exposition.TelemetryCollector()
            prometheus_client.REGISTRY.register(runtime.collector)
        runtime.housekeeper = _Housekeeper(runtime)
        runtime.housekeeper.start()
        _current = runtime
        _register_fork_hook()
        if runtime.process_file is not None:
            _flush_at_child_exit()
        return runtime

    def add(self, integration: Integration) -> Integration:
        """Install ``integration`` unless one of its kind is installed; returns the one in force."""
        existing = self.integrations.get(integration.name)
        if existing is not None:
            return existing
        integration.install(self)
        self.integrations[integration.name] = integration
        return integration

    def stop(self) -> None:
        """Everything ``start`` and the integrations attached, removed in reverse order."""
        global _current
        if _current is self:
            _current = None
        if self.housekeeper is not None:
            self.housekeeper.stop()
        if self.process_file is not None:
            try:
                self.process_file.flush()
            except OSError:
                pass
        if self.collector is not None:
            prometheus_client.REGISTRY.unregister(self.collector)
        for server, _thread in self.metrics_servers:
            server.shutdown()
            server.server_close()
        self.metrics_servers.clear()
        self._each("uninstall", reverse=True)
        self.integrations.clear()

    # ------------------------------------------------------------------ running

    def _each(self, step: str, *args: Any, reverse: bool = False) -> None:
        """``integration.<step>(*args)`` for each integration; an error is counted, never raised."""
        integrations = list(self.integrations.values())
        for integration in reversed(integrations) if reverse else integrations:
            try:
                getattr(integration, step)(*args)
            except Exception as exc:
                _log.hook_error(f"{integration.name}.{step}", exc)

    def tick(self) -> None:
        self._each("tick", time.perf_counter())

    def flush(self) -> None:
        """Spans and this process's measurements, now (a child about to exit)."""
        if self.process_file is not None:  # first: the counts are safe whatever an exporter does
            self.process_file.flush()
        self._each("flush")
        if self.process_file is not None:  # again: with the spans' own counts
            self.process_file.flush()

    def registry(self, directory: str | None = None) -> Any:
        """The registry a ``/metrics`` of this process serves: the host aggregate of
        ``directory`` (default: the configured one) or this process."""
        directory = directory or self.settings.multiproc_dir
        if directory:
            _multiprocess.check_dir(directory)
            # a file unwritten for three flushes (and 10 s) is a frozen writer's
            stale = max(_exposition.STALE_FILE_SECONDS, 3 * self.settings.flush_interval_seconds)
            return _exposition.host_registry(directory, self.process_file, stale)
        return prometheus_client.REGISTRY

    def serve_metrics(self, port: int, addr: str, directory: str | None = None, **auth: Any) -> Any:
        server = _exposition.serve(self.registry(directory), port, addr, **auth)
        self.metrics_servers.append(server)
        return server

    # ------------------------------------------------------------------ fork

    def after_fork_in_child(self) -> None:
        self._each("after_fork")
        # a forked child does not inherit the parent's threads: its servers are the parent's
        self.metrics_servers = []
        if self.process_file is not None:
            self.process_file.renew()
            _flush_at_child_exit()
        self.housekeeper = _Housekeeper(self)
        self.housekeeper.start()


def _check_stock_env() -> None:
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


def _after_fork_in_child() -> None:
    """Locks a parent thread may have held, per-process tables and counts: all start anew."""
    global LOCK
    LOCK = threading.RLock()
    _stats.after_fork_in_child()
    _log.after_fork_in_child()
    _loops.after_fork_in_child()
    _multiprocess.after_fork_in_child()
    _stats.REGISTRY.reset_all()  # every counter, histogram and gauge of every source
    runtime = _current
    if runtime is not None:
        runtime.after_fork_in_child()


def _flush_at_child_exit() -> None:
    """multiprocessing and billiard (Celery prefork) children leave through ``os._exit``, which
    skips ``atexit``. Their finalizers do run, but ``_bootstrap`` clears the registry right after
    fork, so the finalizer is registered from their own after-fork hook, which runs later."""
    for name in ("multiprocessing.util", "billiard.util"):
        util = sys.modules.get(name)
        if util is None:
            continue
        try:
            runtime = _current
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


#: the longest a process's exit waits for its last export (spans, OTLP metrics): uvicorn's and
#: Celery's restarts wait on every exit, so an unreachable endpoint costs at most this
EXIT_FLUSH_SECONDS = 0.3
EXIT_STATS = _stats.LabeledStats()
_stats.REGISTRY.add(EXIT_STATS)


def _at_exit() -> None:
    """The last flush, bounded. This process's own figures are written first, in this thread
    (a local file: the counts are safe whatever an exporter does). The exports run in a thread
    joined for at most ``EXIT_FLUSH_SECONDS``: an exporter retrying a refusing endpoint or
    waiting on a black hole is left behind, counted (``telemetry_exit_flush_timeouts_total``,
    written to the process file) and logged, and the process exits."""
    runtime = _current
    if runtime is None:
        return
    started = time.monotonic()
    with contextlib.suppress(Exception):
        if runtime.process_file is not None:
            runtime.process_file.flush()

    def export() -> None:
        with contextlib.suppress(Exception):
            runtime._each("flush")

    done = threading.Thread(target=export, name="telemetry-exit-flush", daemon=True)
    try:
        done.start()
        done.join(max(0.0, EXIT_FLUSH_SECONDS - (time.monotonic() - started)))
        finished = not done.is_alive()
    except RuntimeError:  # interpreter already finalizing: no thread to bound it, so no export
        finished = False
    with contextlib.suppress(Exception):
        if not finished:
            EXIT_STATS.inc("telemetry_exit_flush_timeouts_total", (("service", _log.INTERNAL.service),))
            _log.emit("warning", "telemetry_exit_flush_timeout", seconds=EXIT_FLUSH_SECONDS,
                      message="the last export did not finish; the process exits without it (counted in "
                      "telemetry_exit_flush_timeouts_total)")  # fmt: skip
        if runtime.process_file is not None:  # with the spans' own counts, or the timeout's
            runtime.process_file.flush()


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(_at_exit)
        _fork_hook_registered = True
