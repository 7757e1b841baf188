"""Celery capacity on a real Redis and a real prefork worker: the backlog counted exactly per
queue (priority lists included) while no worker runs, drained to 0 once one does; the worker's
slots (2 of 2 busy, reserved tasks, children replaced); kombu's broker pool and the result
backend's pool seen in the worker's processes; Redis restarted under the poller and the app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import telemetry
from telemetry._core import exposition as _exposition
from telemetry.testing import capture_events
from telemetry.tools.demo import report
from telemetry.tools.live import diagnose
from tests import ROOT

from .. import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("celery")]


_host, _value = hostview.host, hostview.value


def _wait_for(predicate: Any, timeout: float = 20.0, step: float = 0.1) -> Any:
    return hostview.wait_for(predicate, timeout, step)


@pytest.fixture
def env(redis_server: services.Redis, tmp_path: Any) -> Iterator[dict[str, str]]:
    directory = tmp_path / "mp"
    directory.mkdir()
    base = redis_server.url.rsplit("/", 1)[0]
    values = {"BROKER_URL": f"{base}/0", "BACKEND_URL": f"{base}/1", "TELEMETRY_MULTIPROC_DIR": str(directory),
              "TELEMETRY_FLUSH_INTERVAL_SECONDS": "0.1", "TELEMETRY_CELERY_BACKLOG_INTERVAL_SECONDS": "0.2"}  # fmt: skip
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    import redis

    redis.Redis.from_url(values["BROKER_URL"]).flushall()
    try:
        yield values
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.modules.pop("tests.apps.capacity_app", None)


def _worker(env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.apps.capacity_app", "worker", "--pool", "prefork",
         "--concurrency", "2", "-Q", "content,logs", "-l", "warning", *extra],
        cwd=ROOT, env=dict(os.environ, **env, TELEMETRY_SERVICE_NAME="capacity-worker"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_backlog_exact_per_queue_then_drained_and_the_slots_of_a_prefork_worker(env: dict[str, str]) -> None:
    telemetry.instrument(service="api")
    from ..apps.capacity_app import app, quick, sleepy

    directory = env["TELEMETRY_MULTIPROC_DIR"]
    broker = "redis://127.0.0.1:" + env["BROKER_URL"].rsplit(":", 1)[1]
    # no worker yet: 7 to content (priorities spread over kombu's priority lists), 5 to logs
    for i in range(7):
        quick.apply_async(queue="content", priority=(i * 3) % 10)
    for _ in range(5):
        quick.apply_async(queue="logs")
    counted = _wait_for(lambda: (_value(_host(directory), "celery_queue_length", queue="content"),
                                 _value(_host(directory), "celery_queue_length", queue="logs")) == (7, 5), 30)  # fmt: skip
    host = _host(directory)
    assert counted, (_value(host, "celery_queue_length", queue="content"), _value(host, "celery_queue_length", queue="logs"))
    assert _value(host, "celery_queue_length", broker=broker, queue="content") == 7
    age = _value(host, "celery_queue_oldest_message_seconds", queue="content")
    assert age is not None and 0 <= age < 60
    assert _value(host, "celery_backlog_view_up") == 1
    worker = _worker(env, "--max-tasks-per-child", "1")
    try:
        drained = _wait_for(lambda: (_value(_host(directory), "celery_queue_length", queue="content"),
                                     _value(_host(directory), "celery_queue_length", queue="logs")) == (0, 0), 90)  # fmt: skip
        assert drained, "the backlog never drained to 0"
        # slots: 2 long tasks fill the 2 slots; 3 more wait in the worker (reserved)
        # 8 s each: a loaded machine (the oldest Celery re-forking a child after each task) took
        # most of a 4 s task to fill the second slot, and the window closed unseen
        for _ in range(5):
            sleepy.apply_async((8.0,), queue="content")

        texts: list[str] = []

        def full() -> Any:
            text = generate_latest(_exposition.host_registry(directory)).decode()
            host = {(s.name, frozenset(s.labels.items())): s.value
                    for fam in text_string_to_metric_families(text) for s in fam.samples}  # fmt: skip
            texts.append(text)
            busy = _value(host, "celery_worker_busy", service="capacity-worker", queue="content")
            size = _value(host, "celery_worker_pool_size", service="capacity-worker")
            reserved = _value(host, "celery_worker_reserved", service="capacity-worker", queue="content")
            seen.append((busy, size, reserved))
            # the 5 are prefetched as they arrive: 2 running, the others waiting for a slot
            return host if (busy, size) == (2, 2) and (reserved or 0) >= 2 else None

        seen: list[Any] = []

        host = _wait_for(full, 60)
        last = _host(directory)
        assert host, (sorted(set(seen)), [(n, v) for (n, lb), v in last.items() if n.startswith("celery_worker")])
        # the diagnosis from that /metrics names the saturated worker
        saturated = [f for f in diagnose.findings(report.parse(texts[-1])) if "every slot of" in f]
        assert len(saturated) == 1 and "(capacity-worker) is busy (2 of 2)" in saturated[0], saturated
        worker_label = {dict(lb)["worker"] for (n, lb) in host if n == "celery_worker_pool_size"}
        assert len(worker_label) == 1 and next(iter(worker_label)).startswith("celery@")
        # kombu's broker pool (db 0) and the result backend's (db 1) in the worker's processes
        port = env["BROKER_URL"].rsplit(":", 1)[1].split("/")[0]
        for db in ("0", "1"):
            assert (_value(host, "redis_pool_checkouts_total", service="capacity-worker",
                           pool=f"127.0.0.1:{port}/{db}", result="ok") or 0) > 0, db  # fmt: skip
        # every task ran in its own child (max_tasks_per_child=1): 17 replacements once all done
        replaced = _wait_for(lambda: _value(_host(directory), "celery_worker_children_replaced_total",
                                            service="capacity-worker") == 17, 90)  # fmt: skip
        assert replaced, _value(_host(directory), "celery_worker_children_replaced_total")
        # one poller per queue on the host: the API process and the worker's parent both watch
        # content and logs, and the host's polls are not doubled (a single value per series)
        series = [lb for (n, lb) in _host(directory) if n == "celery_queue_length"]
        assert len(series) == len({tuple(sorted(lb)) for lb in series}) == 2
    finally:
        _stop(worker)
    assert app.conf.broker_url == env["BROKER_URL"]


def test_redis_restarted_under_the_poller_and_the_app(tmp_path: Any) -> None:
    import redis

    port = services.free_port()
    directory = tmp_path / "mp"
    directory.mkdir()
    url = f"redis://127.0.0.1:{port}/0"
    os.environ.update(BROKER_URL=url, BACKEND_URL=f"redis://127.0.0.1:{port}/1")
    try:
        # the capture is open before Redis stops: the poller may notice within its 0.2 s interval
        with capture_events("telemetry_celery_backlog_failed", "telemetry_hook_error") as events:
            with services.start_redis(port):
                telemetry.instrument(service="api", multiproc_dir=str(directory), celery_backlog_interval_seconds=0.2,
                                     flush_interval_seconds=0.1)  # fmt: skip
                from ..apps.capacity_app import quick

                quick.apply_async(queue="content")
                client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
                assert client.ping()
                assert _wait_for(lambda: _value(_host(str(directory)), "celery_queue_length", queue="content") == 1, 20)
            # Redis gone: the app's own commands fail with redis-py's error (ours adds none), the
            # poller counts its failures and keeps the last value, marked stale
            with pytest.raises(redis.exceptions.ConnectionError):
                client.ping()
            assert _wait_for(lambda: (_value(_host(str(directory)), "celery_backlog_errors_total") or 0) >= 2, 20)
            host = _host(str(directory))
            assert _value(host, "celery_backlog_view_up") == 0
            assert _value(host, "celery_queue_length", queue="content") == 1
            # the app's client pool lives beside kombu's on the same address: whichever index it got
            errors = [v for (n, lb), v in host.items() if n == "redis_pool_checkouts_total"
                      and ("result", "error") in lb and dict(lb)["pool"].startswith(f"127.0.0.1:{port}/0")]  # fmt: skip
            assert sum(errors) >= 1
        assert [e["event"] for e in events] == ["telemetry_celery_backlog_failed"]  # once per outage, no hook error
        with services.start_redis(port):  # back on the same address: the poller recovers
            assert _wait_for(lambda: _value(_host(str(directory)), "celery_backlog_view_up") == 1, 20)
            assert client.ping()
            client.close()
            client.connection_pool.disconnect()  # redis-py 5.0.0's close() leaves from_url()'s pool open
    finally:
        for key in ("BROKER_URL", "BACKEND_URL"):
            os.environ.pop(key, None)
        sys.modules.pop("tests.apps.capacity_app", None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kombu's models use noload (SQLAlchemy 2.1)
def test_backlog_on_the_sqlalchemy_transport(tmp_path: Any) -> None:
    """kombu's SQLAlchemy transport (the demo's default broker): visible rows per queue, the
    oldest by its timestamp; the poller's own engine is not one of the app's pools."""
    from celery import Celery

    telemetry.instrument(service="api", celery_backlog_interval_seconds=0.2)
    app = Celery("sqla", broker=f"sqla+sqlite:///{tmp_path}/broker.db", backend="cache+memory://")

    @app.task(name="noop", shared=False)
    def noop() -> None:
        return None

    for _ in range(4):
        noop.apply_async(queue="content")
    for _ in range(2):
        noop.apply_async(queue="logs")
    sample = telemetry.testing.sample

    def lengths() -> Any:
        try:
            return (sample("celery_queue_length", queue="content"), sample("celery_queue_length", queue="logs"))
        except KeyError:
            return None

    assert _wait_for(lambda: lengths() == (4, 2), 20), lengths()
    assert 0 <= sample("celery_queue_oldest_message_seconds", queue="content") < 60
    assert sample("celery_backlog_view_up") == 1
    pools = {dict(lb).get("pool") for (n, lb) in telemetry.testing.metrics() if n == "db_pool_checkouts_total"}
    assert not any("telemetry-internal" in str(p) for p in pools)


def test_the_backlog_is_read_from_the_publishing_apps_broker(redis_server: services.Redis) -> None:
    """Two Celery apps in one process: app ``a`` (Redis db 0) publishes to ``qa`` after app
    ``b`` (db 1) became the current app. The queue is watched on ``a``'s broker, where the 4
    messages are, not on the current app's."""
    import redis
    from celery import Celery

    base = redis_server.url.rsplit("/", 1)[0]
    for db in (0, 1):
        with redis.Redis.from_url(f"{base}/{db}") as cleanup:
            cleanup.delete("qa")
    telemetry.instrument(service="api", celery_backlog_interval_seconds=0.2)
    a = Celery("a", broker=f"{base}/0")
    b = Celery("b", broker=f"{base}/1")  # created last: the current app
    try:
        for _ in range(4):
            a.send_task("tests.x", queue="qa")
        assert _wait_for(lambda: _value(_host(None), "celery_queue_length", broker=f"{base}/0", queue="qa") == 4)
        assert _value(_host(None), "celery_queue_length", broker=f"{base}/1", queue="qa") is None
    finally:
        a.close()
        b.close()
        with redis.Redis.from_url(f"{base}/0") as cleanup:
            cleanup.delete("qa")
