"""Celery signals against a real worker (solo pool, in-process, memory transport): outcomes
succeeded / failed by exception type / retried / revoked, queue wait measured from publish and
from the ETA when later (a countdown is not waiting), in-progress back to zero, task name as
owner of its connections."""

from __future__ import annotations

import time

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool

import telemetry

from ..conftest import sample

pytestmark = pytest.mark.matrix("celery")


def test_task_outcomes_queue_wait_and_owner(tmp_path):
    telemetry.instrument(service="worker")
    engine = create_engine(f"sqlite:///{tmp_path}/c.db", poolclass=QueuePool)
    app = Celery("t", broker="memory://", backend="cache+memory://")
    app.conf.task_default_queue = "content"
    attempts = {"n": 0}

    @app.task(name="ok")
    def ok() -> int:
        with engine.connect():
            pass
        return 1

    @app.task(name="boom")
    def boom() -> None:
        raise KeyError("missing concept")

    @app.task(bind=True, name="flaky", max_retries=2, default_retry_delay=0)
    def flaky(self) -> str:  # type: ignore[no-untyped-def]
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise self.retry(countdown=0)
        return "done"

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        results = [ok.delay() for _ in range(3)] + [boom.delay(), flaky.delay()]
        later = ok.apply_async(countdown=1.0)
        revoked = ok.apply_async(countdown=30)
        revoked.revoke()
        for r in results + [later]:
            r.get(timeout=20, propagate=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if sample("celery_tasks_total", task="ok", outcome="revoked") == 1:
                    break
            except KeyError:
                pass
            time.sleep(0.1)
    labels = {"queue": "content"}
    assert sample("celery_tasks_total", task="ok", outcome="succeeded", **labels) == 4
    assert sample("celery_tasks_total", task="boom", outcome="failed", **labels) == 1
    assert sample("celery_task_failures_total", task="boom", exception="KeyError") == 1
    assert sample("celery_tasks_total", task="flaky", outcome="retried") == 1
    assert sample("celery_tasks_total", task="flaky", outcome="succeeded") == 2 - 1
    assert sample("celery_tasks_total", task="ok", outcome="revoked") == 1
    assert sample("celery_tasks_in_progress", task="ok") == 0
    assert sample("celery_task_runtime_seconds_count", task="ok") == 4
    # every run that started had a publish time. The memory transport polls once a second, so
    # the three immediate tasks really waited about 1 s; the countdown task's wait starts at its
    # ETA, so its 1 s countdown is not counted as waiting
    assert sample("celery_task_queue_wait_seconds_count", task="ok") == 4
    assert sample("celery_task_queue_wait_seconds_bucket", task="ok", le="0.25") == 1
    assert sample("celery_task_queue_wait_seconds_sum", task="ok") < 3 * 1.2 + 0.25
    assert sample("db_connection_hold_seconds_count", owner="ok") == 4


def test_task_without_publish_time_is_counted():
    """A task that reaches a worker without the package's publish stamp (here run through
    Celery's own apply(), as a producer without the package would send it): counted, and its
    queue wait is not invented."""
    from celery import Celery

    from ..conftest import sample

    telemetry.instrument(service="worker")
    app = Celery("unstamped", broker="memory://", backend="cache+memory://")

    @app.task(name="unstamped.add")
    def add(a: int, b: int) -> int:
        return a + b

    assert add.apply(args=(1, 2)).get() == 3
    assert sample("celery_tasks_without_publish_time_total", task="unstamped.add") == 1
    assert sample("celery_task_queue_wait_seconds_count", task="unstamped.add") == 0


def test_a_second_worker_on_the_same_metrics_port_says_who_serves(tmp_path):
    """Two workers configured with one TELEMETRY_METRICS_PORT: the second does not fail or hide
    it in a hook error; it says, in words, that another process serves the host's /metrics."""
    import socket

    from structlog.testing import capture_logs

    from telemetry.integrations.celery import tasks as _celery

    from .. import services

    port = services.free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        settings = telemetry.instrument(service="worker", metrics_port=port, multiproc_dir=str(tmp_path))
        with capture_logs() as logs:
            assert _celery._serve_host_metrics(settings, telemetry.start_metrics_server) is None
    finally:
        taken.close()
    events = [e for e in logs if e["event"] == "telemetry_metrics_server"]
    assert [e["status"] for e in events] == ["port_in_use"]
    assert "already served by another process" in events[0]["message"]
    assert "includes it" in events[0]["message"]
    assert not [e for e in logs if e["event"] == "telemetry_hook_error"]
