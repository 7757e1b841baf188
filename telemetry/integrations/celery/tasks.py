"""Celery: task metrics by task name and queue, owner attribution, spans, prefork lifecycle.

All through Celery signals, connected once by :func:`install`:

- ``before_task_publish`` stamps ``telemetry_published_at`` into the message headers; a worker's
  ``task_prerun`` measures queue wait from it (or from the ETA / countdown when that is later,
  so a scheduled task's delay is not counted as waiting).
- ``task_prerun`` / ``task_postrun``: run time, in-progress gauge, outcome; the task name becomes
  the owner of every connection the task checks out.
- ``task_rejected`` / ``task_revoked``: those outcomes.
- ``worker_init`` (the prefork parent): serves the host's ``/metrics`` when
  ``TELEMETRY_METRICS_PORT`` is set. Children are cleaned by the package's fork hook.
- ``worker_process_shutdown`` (in the child, just before ``os._exit``): flush spans and metrics,
  so nothing is lost with ``max_tasks_per_child=1``.
- ``setup_logging``: when ``telemetry.configure_logging`` was used, Celery keeps it instead of
  installing its own handlers.

Spans, with tracing on: ``apply_async/<task>`` (PRODUCER) around the publish, its context
written into the message headers (``traceparent``), and ``run/<task>`` (CONSUMER) in the worker,
a child of it and current while the task runs (statement spans and log lines nest under it).
Names and attributes follow OpenTelemetry's Celery instrumentation, at a third of its cost.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import threading
import time
from datetime import datetime
from typing import Any

from telemetry._core import bounds as _bounds
from telemetry._core.integration import Integration
from telemetry._core.log import INTERNAL, hook_error
from telemetry._core.owner import ACCOUNT, OWNER, RequestAccount
from telemetry._core.stats import REGISTRY, LabeledStats
from telemetry.integrations import tracing as _tracing

from .capacity import BACKLOG, HEADER, SLOTS, BacklogPoller, Slots

STATS = LabeledStats()
REGISTRY.add(STATS)

MAX_EXCEPTION_TYPES = 50

_running: dict[str, tuple[float, Any, _TaskLabels, Any, Any, RequestAccount, Any]] = {}
#: task id -> its publish span, ended when the message is handed to the broker
_publishing: dict[str, Any] = {}
_MAX_PUBLISHING = 10_000  # a publish that fails never reaches after_task_publish
_spans = [False]
#: exception type names already labelled (bounded: past MAX_EXCEPTION_TYPES they read "other")
_exception_kinds: set[str] = set()
_connected: list[tuple[Any, Any]] = []
_installed: CeleryIntegration | None = None
#: the Celery app publishing in this thread right now (``Celery.send_task`` wrapped): the
#: publish signals do not say which app sent, and the current app can be another one
_sender = threading.local()
_patched: list[tuple[type, str, Any]] = []


def _wrap_send_task(orig: Any) -> Any:
    def send_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        previous = getattr(_sender, "app", None)
        _sender.app = self
        try:
            return orig(self, *args, **kwargs)
        finally:
            _sender.app = previous

    send_task.__wrapped__ = orig  # type: ignore[attr-defined]
    return send_task


def _queue(request: Any) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("exchange") or "default")


def _labels(name: str, task_name: str, queue: str, *extra: str) -> Any:
    return LabeledStats.labels(name, INTERNAL.service, _bounds.TASKS(task_name), _bounds.QUEUES(queue), *extra)


def _on_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    try:
        if headers is None:
            return
        if HEADER not in headers:
            headers[HEADER] = time.time()
        if _spans[0]:
            name = str(sender or headers.get("task") or "unknown")
            task_id = headers.get("id")
            span, context = _tracing.start_producer_span(name, task_id)
            _tracing.inject(headers, context)
            if len(_publishing) < _MAX_PUBLISHING and task_id:
                _publishing[str(task_id)] = span
            else:
                span.end()
    except Exception as exc:
        hook_error("celery.publish", exc)


def _on_published(headers: Any = None, **_: Any) -> None:
    try:
        span = _publishing.pop(str((headers or {}).get("id")), None)
        if span is not None:
            span.end()
    except Exception as exc:
        hook_error("celery.published", exc)


def _eta_timestamp(eta: Any) -> float | None:
    if not eta:
        return None
    if isinstance(eta, datetime):
        return eta.timestamp()
    try:
        return datetime.fromisoformat(str(eta)).timestamp()
    except ValueError:
        return None


class _TaskLabels:
    """Per (service, task, queue): direct handles on the task's series, built once."""

    __slots__ = ("name", "queue", "generation", "queue_wait", "runtime", "in_progress", "unstamped",
                 "outcomes")  # fmt: skip

    def __init__(self, name: str, queue: str) -> None:
        self.name, self.queue = name, queue
        self.generation = STATS.generation
        self.queue_wait = STATS.histogram("celery_task_queue_wait_seconds", _labels("celery_task_queue_wait_seconds", name, queue))
        self.runtime = STATS.histogram("celery_task_runtime_seconds", _labels("celery_task_runtime_seconds", name, queue))
        self.in_progress = STATS.gauge_cell("celery_tasks_in_progress", _labels("celery_tasks_in_progress", name, queue))
        self.unstamped = STATS.counter_cell("celery_tasks_without_publish_time_total",
                                            _labels("celery_tasks_without_publish_time_total", name, queue))  # fmt: skip
        self.outcomes: dict[str, list[float]] = {}

    def outcome(self, outcome: str) -> list[float]:
        cell = self.outcomes.get(outcome)
        if cell is None:
            cell = self.outcomes[outcome] = STATS.counter_cell(
                "celery_tasks_total", _labels("celery_tasks_total", self.name, self.queue, outcome)
            )
        return cell


_TASK_LABELS: dict[tuple[str, str, str], _TaskLabels] = {}  # bounded: task names x queues
_MAX_TASK_KEYS = 10_000


def _task_labels(name: str, queue: str) -> _TaskLabels:
    key = (INTERNAL.service, name, queue)
    labels = _TASK_LABELS.get(key)
    if labels is None or labels.generation != STATS.generation:  # counts reset (fork, uninstall)
        # names come from messages: capped (a value past the cap reads "other")
        folded = (INTERNAL.service, _bounds.TASKS(name), _bounds.QUEUES(queue))
        labels = _TASK_LABELS.get(folded)
        if labels is None or labels.generation != STATS.generation:
            labels = _TASK_LABELS[folded] = _TaskLabels(folded[1], folded[2])
        if len(_TASK_LABELS) < _MAX_TASK_KEYS:
            _TASK_LABELS[key] = labels
    return labels


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    try:
        if task is None or task_id is None:
            return
        request = task.request
        labels = _task_labels(task.name, _queue(request))
        published = getattr(request, HEADER, None)
        if isinstance(published, (int, float)):
            start = published
            eta = request.eta
            if eta:
                eta = _eta_timestamp(eta)
                if eta is not None and eta > start:
                    start = eta
            labels.queue_wait.observe(max(0.0, time.time() - start))
        else:
            labels.unstamped[0] += 1
        labels.in_progress[0] += 1
        token = OWNER.set(labels.name)
        account = RequestAccount()  # its end tells a connection that outlived the task
        account_token = ACCOUNT.set(account)
        span = span_token = None
        if _spans[0]:
            parent = _tracing.extract_from_request(request)
            span, span_token = _tracing.start_run_span(labels.name, task_id, parent)
        _running[task_id] = (time.perf_counter(), token, labels, span, span_token, account, account_token)
    except Exception as exc:
        hook_error("celery.prerun", exc)


_OUTCOMES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried", "REJECTED": "rejected",
             "REVOKED": "revoked", "IGNORED": "succeeded"}  # fmt: skip


def _on_postrun(task_id: str | None = None, task: Any = None, retval: Any = None,
                state: str | None = None, **_: Any) -> None:  # fmt: skip
    try:
        entry = _running.pop(task_id, None) if task_id else None
        if task is None or entry is None:
            return
        started, token, labels, span, span_token, account, account_token = entry
        end = time.perf_counter()
        account.ended = end
        labels.runtime.observe(end - started)
        labels.in_progress[0] -= 1
        outcome = _OUTCOMES.get(state or "", "failed")
        labels.outcome(outcome)[0] += 1
        if outcome == "failed":
            _failure(labels.name, labels.queue, retval)
        if span is not None:
            _tracing.end_task_span(span, span_token, state, retval if outcome == "failed" else None)
        try:
            OWNER.reset(token)
            ACCOUNT.reset(account_token)
        except ValueError:  # reset from another context: leave it, the next prerun sets it
            pass
    except Exception as exc:
        hook_error("celery.postrun", exc)


def _failure(name: str, queue: str, exc: Any) -> None:
    kind = type(exc).__name__ if isinstance(exc, BaseException) else "unknown"
    if kind not in _exception_kinds:
        if len(_exception_kinds) >= MAX_EXCEPTION_TYPES:
            kind = "other"
        else:
            _exception_kinds.add(kind)
    STATS.inc("celery_task_failures_total", _labels("celery_task_failures_total", name, queue, kind))


def _on_rejected(message: Any = None, **_: Any) -> None:
    try:
        headers = getattr(message, "headers", None) or {}
        name = str(headers.get("task") or "unknown")
        info = getattr(message, "delivery_info", None) or {}
        queue = str(info.get("routing_key") or "default")
        STATS.inc("celery_tasks_total", _labels("celery_tasks_total", name, queue, "rejected"))
    except Exception as exc:
        hook_error("celery.rejected", exc)


def _on_revoked(request: Any = None, sender: Any = None, **_: Any) -> None:
    try:
        name = str(getattr(sender, "name", None) or getattr(request, "task_name", None) or "unknown")
        info = getattr(request, "delivery_info", None) or {}
        queue = str(info.get("routing_key") or "default")
        STATS.inc("celery_tasks_total", _labels("celery_tasks_total", name, queue, "revoked"))
    except Exception as exc:
        hook_error("celery.revoked", exc)


def _on_worker_init(**_: Any) -> None:
    """The prefork parent: serve the host aggregate if a port is configured."""
    try:
        integration = _installed
        if integration is None or integration.runtime is None:
            return
        runtime = integration.runtime
        if runtime.settings.metrics_port is not None and not runtime.metrics_servers:
            _serve_host_metrics(runtime.settings, runtime.serve_metrics)
    except Exception as exc:
        hook_error("celery.worker_init", exc)


def _serve_host_metrics(current: Any, start: Any) -> Any:
    """Serve the host's /metrics from this prefork parent, and say in words who serves it."""
    import errno
    import os

    from telemetry._core.log import emit

    address = f"{current.metrics_addr}:{current.metrics_port}"
    try:
        server = start(current.metrics_port, current.metrics_addr)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        shared = current.multiproc_dir is not None
        emit(
            "warning", "telemetry_metrics_server", status="port_in_use", address=address,
            pid=os.getpid(),
            message=(
                f"{address} is already served by another process on this host (another worker "
                "with the same TELEMETRY_METRICS_PORT?). "
                + ("This worker writes to the same TELEMETRY_MULTIPROC_DIR, so that /metrics "
                   "includes it." if shared else
                   "This worker has no TELEMETRY_MULTIPROC_DIR: its metrics are NOT on that "
                   "/metrics. Give each worker its own port or share one directory.")
            ),
        )  # fmt: skip
        return None
    emit("info", "telemetry_metrics_server", status="serving", address=address, pid=os.getpid(),
         message=f"this process serves the host's /metrics on {address}")  # fmt: skip
    return server


def _on_published_queue(routing_key: Any = None, **_: Any) -> None:
    """The queue a task went to: its backlog is polled from now on (a dict lookup when known)."""
    try:
        integration = _installed
        if integration is not None and routing_key:
            app = getattr(_sender, "app", None)
            if app is None:  # published without Celery.send_task (a custom producer)
                from celery._state import get_current_app

                app = get_current_app()
            integration.backlog.watch(app, str(routing_key))
    except Exception as exc:
        hook_error("celery.backlog_watch", exc)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The worker's parent, consuming: its slots are read from now on, its queues polled."""
    try:
        integration = _installed
        if integration is None or sender is None:
            return
        app = sender.app
        queues = [str(name) for name in list(app.amqp.queues.consume_from or app.amqp.queues)]
        integration.slots.attach(sender, queues)
        for name in queues:
            integration.backlog.watch(app, name)
    except Exception as exc:
        hook_error("celery.worker_ready", exc)


def _on_test_worker_started(consumer: Any = None, **_: Any) -> None:
    _on_worker_ready(sender=consumer)


def _on_child_shutdown(**_: Any) -> None:
    """In the child, just before ``os._exit``: spans and measurements out now."""
    try:
        integration = _installed
        if integration is not None and integration.runtime is not None:
            integration.runtime.flush()
    except Exception as exc:
        hook_error("celery.child_shutdown", exc)


def _on_setup_logging(**_: Any) -> None:
    """Connected only when configure_logging() was used: keep it, do not let Celery replace it."""


def install(*, spans: bool = True) -> None:
    try:
        from celery import signals
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Celery instrumentation needs Celery, which is not installed") from exc
    if _connected:
        return
    _spans[0] = spans and _tracing.available()
    pairs = [
        (signals.before_task_publish, _on_publish),
        *([(signals.after_task_publish, _on_published)] if _spans[0] else []),
        (signals.task_prerun, _on_prerun),
        (signals.task_postrun, _on_postrun),
        (signals.task_rejected, _on_rejected),
        (signals.task_revoked, _on_revoked),
        (signals.worker_init, _on_worker_init),
        (signals.worker_process_shutdown, _on_child_shutdown),
        (signals.after_task_publish, _on_published_queue),
        (signals.worker_ready, _on_worker_ready),
    ]
    from telemetry._core.log import logging_configured

    if logging_configured():
        pairs.append((signals.setup_logging, _on_setup_logging))
    for signal, fn in pairs:
        signal.connect(fn, weak=False)
        _connected.append((signal, fn))
    # Celery's own test worker (start_worker, pytest's celery_worker) sends no worker_ready. Its
    # module loads the whole worker machinery (+7.5 MB): never imported by us, hooked when the
    # test harness imports it (now, or later through a finder that watches for that one module)
    _HARNESS.watch()
    from celery.app.base import Celery

    orig = Celery.__dict__.get("send_task")
    if orig is not None and not _patched:
        _patched.append((Celery, "send_task", orig))
        Celery.send_task = _wrap_send_task(orig)


class _Harness(importlib.abc.MetaPathFinder):
    """Connects to ``celery.contrib.testing.worker.test_worker_started`` once that module is
    loaded, without ever loading it: a meta-path finder that only watches for its name."""

    NAME = "celery.contrib.testing.worker"

    def watch(self) -> None:
        if self.NAME in sys.modules:
            self.connect(sys.modules[self.NAME])
        elif self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def unwatch(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)

    def connect(self, module: Any) -> None:
        started = getattr(module, "test_worker_started", None)
        if started is not None and (started, _on_test_worker_started) not in _connected:
            started.connect(_on_test_worker_started, weak=False)
            _connected.append((started, _on_test_worker_started))

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.NAME:
            return None
        self.unwatch()  # find the real spec with every other finder, then wrap its loader
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        harness, exec_module, create_module = self, loader.exec_module, loader.create_module

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return create_module(spec)

            def exec_module(self, module: Any) -> None:
                exec_module(module)
                try:
                    if _connected:  # still instrumented
                        harness.connect(module)
                except Exception as exc:
                    hook_error("celery.test_worker_hook", exc)

        spec.loader = _Loader()
        return spec


_HARNESS = _Harness()


def uninstall() -> None:
    _HARNESS.unwatch()
    for signal, fn in _connected:
        signal.disconnect(fn)
    _connected.clear()
    for cls, method, orig in reversed(_patched):
        setattr(cls, method, orig)
    _patched.clear()
    _running.clear()
    _publishing.clear()
    _exception_kinds.clear()
    _TASK_LABELS.clear()
    _spans[0] = False
    STATS.reset()


class CeleryIntegration(Integration):
    """Signals for task metrics and owners, spans, and the prefork parent's /metrics."""

    name = "celery"

    def __init__(self) -> None:
        self.runtime: Any = None
        self.backlog: Any = None
        self.slots: Any = None

    def install(self, runtime: Any) -> None:
        global _installed
        self.runtime = runtime
        self.backlog = BacklogPoller(runtime.settings)
        self.slots = Slots(runtime.settings.service)
        _installed = self
        install(spans=runtime.settings.tracing)

    def uninstall(self) -> None:
        global _installed
        _installed = None
        uninstall()
        if self.backlog is not None:
            self.backlog.stop()
        BACKLOG.reset()
        SLOTS.reset()

    def tick(self, now: float) -> None:
        if self.slots is not None:
            self.slots.tick()

    def after_fork(self) -> None:
        _running.clear()
        _publishing.clear()
        if self.backlog is not None:
            self.backlog.after_fork()
        self.slots = Slots(self.runtime.settings.service) if self.runtime is not None else None
