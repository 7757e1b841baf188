"""The fault matrix, against real services. Each row asserts that the host saw no exception
caused by the instrumentation (no hook error, only the database's own errors), that gauges
return to exact values, and that counters stayed monotonic."""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import signal
import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool
from structlog.testing import capture_logs

import telemetry
from telemetry._core import exposition as _exposition
from telemetry._core import log as _log
from telemetry.integrations.sqlalchemy import state as _pool_state

from . import services
from .conftest import sample, starve

pytestmark = pytest.mark.matrix("sqlalchemy")


def _state(engine) -> _pool_state.PoolState:  # type: ignore[no-untyped-def]
    pool = engine.sync_engine.pool if hasattr(engine, "sync_engine") else engine.pool
    return pool.__dict__[_pool_state._ATTR]


def _clean(pool, st: _pool_state.PoolState) -> None:  # type: ignore[no-untyped-def]
    assert st.in_use == pool.checkedout() == 0 and st.pending == 0
    assert not _pool_state._held and not _pool_state._flagged
    assert not _log.INTERNAL.hook_errors, _log.INTERNAL.hook_errors


def _counters(st: _pool_state.PoolState) -> tuple[int, ...]:
    return (st.ok, st.timeouts, st.errors, st.connects, st.invalid_hard, st.wait.count)


@pytest.mark.integration
def test_postgres_restarted_while_connections_are_checked_out():
    with services.start_postgres(max_connections=20) as pg:
        telemetry.instrument(service="api")
        engine = create_engine(pg.url(), pool_size=2, max_overflow=2, pool_pre_ping=True)
        held = [engine.connect() for _ in range(2)]
        for conn in held:
            conn.execute(text("select 1"))
        st = _state(engine)
        before = _counters(st)
        services.restart_postgres(pg)
        for conn in held:
            with pytest.raises((OperationalError, DBAPIError)):  # the database's error, unchanged
                conn.execute(text("select 1"))
            conn.close()
        with engine.connect() as conn:  # pre-ping replaces the dead connections
            assert conn.execute(text("select 1")).scalar() == 1
        _clean(engine.pool, st)
        after = _counters(st)
        assert all(a >= b for a, b in zip(after, before, strict=True))
        assert st.invalid_hard >= 2 and st.connects >= 3
        engine.dispose()


@pytest.mark.integration
def test_server_max_connections_reached():
    """The server refuses connections: connect errors counted, the pool's state exact."""
    with services.start_postgres(max_connections=4) as pg:
        pg.psql("alter system set superuser_reserved_connections = 0")
        services.restart_postgres(pg)
        telemetry.instrument(service="worker")
        engine = create_engine(pg.url(), pool_size=8, max_overflow=0, pool_timeout=5)
        results: list[str] = []
        gate = threading.Barrier(8)

        def take() -> None:
            gate.wait()
            try:
                with engine.connect() as conn:
                    conn.execute(text("select pg_sleep(0.5)"))
                    results.append("ok")
            except (OperationalError, DBAPIError):
                results.append("refused")

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = _state(engine)
        assert results.count("refused") >= 4 and results.count("ok") >= 1
        assert st.errors == results.count("refused") == sample("db_pool_connect_errors_total", pool=st.name)
        assert st.ok == results.count("ok")
        _clean(engine.pool, st)
        engine.dispose()


@pytest.mark.integration
async def test_pool_timeout_storm(pg):
    """300 waiters time out behind one hog: every one counted, one log event, the rest counted
    as suppressed, the wait histogram has all 301."""
    telemetry.instrument(service="api")
    engine = create_async_engine(pg.url("asyncpg"), pool_size=1, max_overflow=0, pool_timeout=0.3)
    with capture_logs() as logs:
        out = await starve(engine, 300)
    st = _state(engine)
    assert out.count("timeout") == 300 == st.timeouts
    assert st.wait.count == 301
    assert len([e for e in logs if e["event"] == "db_pool_timeout"]) == 1
    assert sample("telemetry_log_events_suppressed_total", event="db_pool_timeout") == 299
    _clean(engine.sync_engine.pool, st)
    await engine.dispose()


def test_a_million_checkouts_with_invalidations_and_detaches_keep_memory_flat(tmp_path):
    telemetry.instrument(service="api")
    engine = create_engine(f"sqlite:///{tmp_path}/m.db", poolclass=QueuePool, pool_size=2, max_overflow=2)
    pool = engine.pool

    def run(n: int) -> None:
        for i in range(n):
            conn = pool.connect()
            if i % 1000 == 0:
                conn.invalidate()
            elif i % 1000 == 1:
                conn.detach()
            conn.close()

    run(100_000)
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(900_000)
    gc.collect()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    st = _state(engine)
    assert st.ok == 1_000_000
    assert st.invalid_hard == 1000
    assert sum(h.count for h in st.hold.values()) == 1_000_000
    assert rss_after - rss_before < 5 * 1024  # KiB: per-connection state fully released
    _clean(pool, st)


def _child_holds_and_dies(url: str, directory: str, ready: object) -> None:
    engine = create_engine(url, poolclass=QueuePool, pool_size=2, max_overflow=0)
    conns = [engine.connect() for _ in range(2)]
    telemetry.flush()
    ready.set()  # type: ignore[attr-defined]
    time.sleep(60)
    del conns


def test_kill_9_of_a_child_holding_connections(tmp_path):
    """A forked child killed with SIGKILL while holding connections: the next scrape drops its
    gauges and keeps its flushed counters; totals never go backwards."""
    directory = str(tmp_path / "mp")
    os.mkdir(directory)
    telemetry.instrument(service="worker", multiproc_dir=directory, flush_interval_seconds=0.05)
    url = f"sqlite:///{tmp_path}/k.db"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_child_holds_and_dies, args=(url, directory, ready))
    child.start()
    assert ready.wait(30)

    def host() -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for fam in _exposition.host_registry(directory).collect():
            for s in fam.samples:
                key = (s.name, s.labels.get("pid", ""))
                out[key] = out.get(key, 0) + s.value
        return out

    alive = host()
    assert alive[("db_pool_connections_in_use", str(child.pid))] == 2
    before = alive[("db_pool_checkouts_total", "")]
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    dead = host()
    assert ("db_pool_connections_in_use", str(child.pid)) not in dead
    assert dead[("db_pool_checkouts_total", "")] == before == 2
