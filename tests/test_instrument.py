"""The lifecycle: instrument() installs each integration once; uninstrument() removes exactly
what was attached (patched methods, pool listeners, Celery signals, the ASGI patch, the loop hook,
OpenTelemetry's SQLAlchemy instrumentor, the collector, the housekeeper); instrument() after
instrument_sqlalchemy() completes the set."""

from __future__ import annotations

import asyncio
import threading

import prometheus_client
import pytest
import redis.asyncio.connection
import redis.connection
from celery import signals
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, SingletonThreadPool, StaticPool
from sqlalchemy.pool.base import _ConnectionFairy
from starlette.applications import Starlette

import telemetry
from telemetry import _api as _instrument
from telemetry._core import runtime as _runtime
from telemetry._core.settings import Settings
from telemetry.integrations.sqlalchemy import engines as _sqlalchemy

from .conftest import sample


def _attached() -> dict[str, object]:
    """Everything the package can attach, as it stands now."""
    import asyncpg.pool
    import psycopg_pool
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    return {
        "Pool.connect": Pool.__dict__["connect"],
        "SingletonThreadPool.connect": SingletonThreadPool.__dict__["connect"],
        "StaticPool.connect": StaticPool.__dict__.get("connect"),
        "fairy.detach": _ConnectionFairy.__dict__["detach"],
        "Engine.__init__": Engine.__dict__["__init__"],
        "pool listeners": [name for name, fn in _sqlalchemy._LISTENERS if event.contains(Pool, name, fn)],
        "celery receivers": sum(len(s.receivers or []) for s in (signals.task_prerun, signals.task_postrun,
                                                                 signals.before_task_publish, signals.worker_init)),
        "starlette": Starlette.__dict__["build_middleware_stack"],
        "run_forever": asyncio.base_events.BaseEventLoop.__dict__["run_forever"],
        "redis pools": [cls.__dict__[m] for cls in (redis.connection.ConnectionPool, redis.connection.BlockingConnectionPool,
                                                    redis.asyncio.connection.ConnectionPool,
                                                    redis.asyncio.connection.BlockingConnectionPool)
                        for m in ("get_connection", "release")],
        "psycopg pools": [cls.__dict__[m] for cls in (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool)
                          for m in ("getconn", "putconn", "__init__")],
        "asyncpg pools": [asyncpg.pool.Pool.__dict__[m] for m in ("_acquire", "release", "__init__")],
        "sql instrumentor": SQLAlchemyInstrumentor().is_instrumented_by_opentelemetry,
        "collectors": len(list(prometheus_client.REGISTRY._collector_to_names)),
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("telemetry")),
    }  # fmt: skip


@pytest.mark.matrix(*(e.name for e in _instrument.INTEGRATIONS))
def test_uninstrument_after_everything_leaves_nothing():
    before = _attached()
    create_engine("sqlite://")  # an engine that exists before (trace_sql instruments it)
    telemetry.instrument(service="api", trace_sql=True)
    during = _attached()
    changed = {k for k in before if before[k] != during[k]}
    assert changed == set(before)  # every kind of attachment was made...
    assert _runtime.current() is not None and set(_runtime.current().integrations) == {
        e.name for e in _instrument.INTEGRATIONS if e.wanted(_runtime.current().settings)}  # fmt: skip
    telemetry.uninstrument()
    assert _attached() == before
    assert _runtime.current() is None


@pytest.mark.matrix(*(e.name for e in _instrument.INTEGRATIONS))
@pytest.mark.parametrize("entry", _instrument.INTEGRATIONS, ids=lambda e: e.name)
def test_each_registered_integration_alone_is_removed_by_uninstrument(entry):
    """Every integration of the registry, installed by itself, leaves nothing behind: a new one
    is covered by being registered."""
    before = _attached()
    settings = Settings.load(service="api", server_view_url="postgresql://nobody@127.0.0.1:1/none", otlp_metrics=True)
    with _runtime.LOCK:
        runtime = _runtime.Runtime.start(settings)
        assert entry.install(runtime) is not None
    assert set(runtime.integrations) == {entry.name}
    telemetry.uninstrument()
    assert _attached() == before
    assert _runtime.current() is None


def test_second_instrument_is_a_no_op_and_refuses_other_settings():
    """The same call again (or with no argument) returns the settings in force; one asking for
    another service or setting is refused, naming both, instead of being silently ignored."""
    first = telemetry.instrument(service="api")
    runtime = _runtime.current()
    assert telemetry.instrument(service="api") is first
    assert telemetry.instrument() is first
    with pytest.raises(telemetry.ConfigError) as info:
        telemetry.instrument(service="worker")
    assert "service='worker' (in force: 'api')" in str(info.value)
    with pytest.raises(telemetry.ConfigError, match="hold_threshold_seconds=2.0 \\(in force: 5.0\\)"):
        telemetry.instrument(service="api", hold_threshold_seconds=2)
    assert _runtime.current() is runtime and telemetry.instrument(service="api") is first


def test_instrument_after_instrument_sqlalchemy_completes_the_set(tmp_path):
    """An explicitly registered engine first (only that one measured), then instrument(): every
    pool is measured, with the settings instrument() names."""
    explicit = create_engine(f"sqlite:///{tmp_path}/a.db", pool_logging_name="explicit")
    other = create_engine(f"sqlite:///{tmp_path}/b.db", pool_logging_name="other")
    telemetry.instrument_sqlalchemy(explicit)
    with explicit.connect(), other.connect():
        pass
    assert sample("db_pool_checkouts_total", pool="explicit", result="ok") == 1
    try:
        sample("db_pool_checkouts_total", pool="other", result="ok")
        raise AssertionError("an engine not registered was measured")
    except KeyError:
        pass
    telemetry.instrument(service="api")
    assert set(_runtime.current().integrations) >= {"sqlalchemy", "asyncio", "asgi"}
    with other.connect():
        pass
    assert sample("db_pool_checkouts_total", pool="other", result="ok", service="api") == 1
    # the engine registered first reports under the service instrument() names from now on,
    # not the program name it was first seen with
    with explicit.connect():
        pass
    assert sample("db_pool_checkouts_total", pool="explicit", result="ok", service="api") == 2


def test_instrument_loads_no_worker_machinery_in_an_api_process():
    """An API process with FastAPI, SQLAlchemy, Celery and redis-py: instrument() imports
    none of Celery's worker machinery nor its test worker (7.5 MB), nor structlog (rich,
    pygments) unless the app did; a test harness imported afterwards is still hooked."""
    import subprocess
    import sys

    script = (
        "import sys, fastapi, sqlalchemy, redis, celery\n"
        "from celery import Celery\n"
        "app = Celery('x', broker='redis://127.0.0.1:1/0')\n"
        "before = set(sys.modules)\n"
        "import telemetry\n"
        "telemetry.instrument(service='api', tracing=False)\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('celery.worker', "
        "'celery.contrib', 'structlog', 'rich', 'pygments'))))\n"
        "import celery.contrib.testing.worker as w\n"
        "from telemetry.integrations.celery import tasks as _celery\n"
        "print(any(s is w.test_worker_started for s, _f in _celery._connected))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout
