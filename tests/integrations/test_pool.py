"""Pool instrumentation against real databases: exact gauges, wait/hold/timeout accounting,
invalidation and termination leaving no stale state, events, and hook-error containment."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, Pool, QueuePool
from structlog.testing import capture_logs

import telemetry
from telemetry.integrations.sqlalchemy import engines as _sqlalchemy
from telemetry.integrations.sqlalchemy import events as _pool_events
from telemetry.integrations.sqlalchemy import pool as _pool
from telemetry.integrations.sqlalchemy import state as _pool_state

from ..conftest import sample, starve

pytestmark = pytest.mark.matrix("sqlalchemy")


def _state(engine) -> _pool_state.PoolState:
    pool = engine.sync_engine.pool if hasattr(engine, "sync_engine") else engine.pool
    st = pool.__dict__[_pool_state._ATTR]
    assert isinstance(st, _pool_state.PoolState)
    return st


def _exact(pool, st: _pool_state.PoolState) -> None:
    """After a burst settles, our gauges equal SQLAlchemy's own view and nothing is held."""
    assert st.in_use == pool.checkedout() == 0
    assert st.pending == 0
    assert not [h for h in _pool_state._held.values() if h.state is st]
    assert sample("db_pool_connections_in_use", pool=st.name) == 0
    assert sample("db_pool_connections_idle", pool=st.name) == pool.checkedin()
    assert sample("db_pool_overflow", pool=st.name) == pool.overflow()


@pytest.mark.integration
async def test_200_coroutines_on_a_2_plus_2_asyncpg_pool(pg):
    """200 concurrent coroutines: every gauge exact afterwards, wait count == checkouts,
    hold histogram split by owner, peak in_use never above max."""
    telemetry.instrument(service="api")
    engine = create_async_engine(pg.url("asyncpg"), pool_size=2, max_overflow=2, pool_timeout=60)
    st_peak = 0

    async def work(i: int) -> None:
        nonlocal st_peak
        owner = "resume-step" if i % 4 == 0 else "save-concept"
        with telemetry.db_owner(owner):
            async with engine.connect() as conn:
                st_peak = max(st_peak, _state(engine).in_use)
                await conn.execute(text("select pg_sleep(0.002)"))

    await asyncio.gather(*(work(i) for i in range(200)))
    st = _state(engine)
    assert st_peak == 4
    _exact(engine.sync_engine.pool, st)
    assert st.ok == 200 and st.timeouts == 0
    assert sample("db_pool_checkout_wait_seconds_count", pool=st.name) == 200
    assert sample("db_pool_checkouts_total", pool=st.name, result="ok") == 200
    assert sample("db_connection_hold_seconds_count", pool=st.name, owner="resume-step") == 50
    assert sample("db_connection_hold_seconds_count", pool=st.name, owner="save-concept") == 150
    assert sample("db_pool_connections_max", pool=st.name) == 4
    assert sample("db_pool_size", pool=st.name) == 2
    # 196 of 200 had to queue behind 4 connections held ~2 ms each: waits add up
    assert sample("db_pool_checkout_wait_seconds_sum", pool=st.name) > 0.1
    await engine.dispose()


@pytest.mark.integration
async def test_timeouts_counted_and_logged_with_a_snapshot(pg):
    """Waiters that hit pool_timeout are counted as timeouts, their wait is in the histogram,
    and db_pool_timeout carries the pool snapshot and who holds the connections."""
    telemetry.instrument(service="worker")
    engine = create_async_engine(pg.url("asyncpg"), pool_size=1, max_overflow=0, pool_timeout=0.2)
    with capture_logs() as logs:
        results = await starve(engine, 5)
    assert results == ["timeout"] * 5
    st = _state(engine)
    _exact(engine.sync_engine.pool, st)
    assert sample("db_pool_timeouts_total", pool=st.name) == 5
    assert sample("db_pool_checkouts_total", pool=st.name, result="timeout") == 5
    assert sample("db_pool_checkout_wait_seconds_count", pool=st.name) == 6
    assert sample("db_pool_checkout_wait_seconds_sum", pool=st.name) >= 5 * 0.2
    timeouts = [e for e in logs if e["event"] == "db_pool_timeout"]
    assert len(timeouts) == 1  # rate-limited: one per second per pool, the rest counted
    assert sample("telemetry_log_events_suppressed_total", event="db_pool_timeout") == 4
    ev = timeouts[0]
    assert ev["checked_out"] == 1 and ev["max_connections"] == 1 and ev["waiters"] >= 4
    assert ev["longest_holders"][0]["owner"] == "hog"
    assert ev["service"] == "worker" and ev["pool"] == st.name
    await engine.dispose()


@pytest.mark.integration
def test_threads_on_sync_psycopg_pool_are_exact(pg):
    """16 threads x 40 checkouts on a 2+2 psycopg pool: counts exact under thread contention."""
    telemetry.instrument(service="api")
    engine = create_engine(pg.url(), pool_size=2, max_overflow=2, pool_timeout=30)

    def work() -> None:
        for _ in range(40):
            with engine.connect() as conn:
                conn.execute(text("select 1"))

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = _state(engine)
    _exact(engine.pool, st)
    assert st.ok == 640
    assert sample("db_connection_hold_seconds_count", pool=st.name) == 640
    assert sample("db_pool_connects_total", pool=st.name) == 4
    assert sample("db_pool_connect_seconds_count", pool=st.name) == 4
    engine.dispose()


@pytest.mark.integration
def test_pg_terminate_backend_leaves_no_stale_state(pg):
    """A backend killed under a held connection: the error reaches the caller as usual, the
    connection is invalidated, and nothing stays held."""
    telemetry.instrument(service="api")
    engine = create_engine(pg.url(), pool_size=2, max_overflow=0)
    with engine.connect() as conn:
        pid = conn.execute(text("select pg_backend_pid()")).scalar()
        pg.psql(f"select pg_terminate_backend({pid})")
        with pytest.raises((OperationalError, DBAPIError)):
            conn.execute(text("select 1"))
    st = _state(engine)
    _exact(engine.pool, st)
    assert sample("db_pool_invalidations_total", pool=st.name, kind="hard") >= 1
    with engine.connect() as conn:  # the pool recovers with a new connection
        assert conn.execute(text("select 1")).scalar() == 1
    assert sample("db_pool_connects_total", pool=st.name) == 2
    _exact(engine.pool, st)
    engine.dispose()


def test_invalidate_detach_and_soft_invalidate(tmp_path):
    """Each way a connection stops being held releases its state exactly once."""
    telemetry.instrument(service="api")
    engine = create_engine(f"sqlite:///{tmp_path}/a.db", poolclass=QueuePool, pool_size=2, max_overflow=2)
    st = None
    with engine.connect() as conn:
        st = _state(engine)
        assert st.in_use == 1
        conn.invalidate()
        assert st.in_use == 0
    raw = engine.raw_connection()
    assert st.in_use == 1
    raw.detach()
    assert st.in_use == 0
    raw.close()
    soft = engine.raw_connection()
    soft.invalidate(soft=True)
    soft.close()
    _exact(engine.pool, st)
    assert sample("db_pool_invalidations_total", pool=st.name, kind="hard") == 1
    assert sample("db_pool_invalidations_total", pool=st.name, kind="soft") == 1
    assert sample("db_connection_hold_seconds_count", pool=st.name) == 3


def test_garbage_collected_connection_is_released(tmp_path):
    """A connection dropped without close() is returned by SQLAlchemy's finalizer; the hold is
    recorded and the state released."""
    import gc

    telemetry.instrument(service="api")
    engine = create_engine(f"sqlite:///{tmp_path}/g.db", poolclass=QueuePool, pool_size=1, max_overflow=0)
    conn = engine.raw_connection()
    st = _state(engine)
    assert st.in_use == 1
    del conn
    gc.collect()
    _exact(engine.pool, st)


def test_engines_before_after_and_dispose(tmp_path):
    """Engines created before and after instrument() are both measured, named by URL without
    credentials; dispose() keeps the name and the counters keep growing."""
    before = create_engine(f"sqlite:///{tmp_path}/before.db", poolclass=QueuePool)
    telemetry.instrument(service="api")
    # registered at instrument() time: its gauges exist before its first checkout
    assert sample("db_pool_size", pool=f"sqlite:///{tmp_path}/before.db") == 5
    after = create_engine(f"sqlite:///{tmp_path}/after.db", poolclass=QueuePool)
    for engine in (before, after):
        with engine.connect():
            pass
    assert sample("db_pool_checkouts_total", pool=f"sqlite:///{tmp_path}/after.db", result="ok") == 1
    old_pool = after.pool
    after.dispose()
    assert after.pool is not old_pool
    with after.connect():
        pass
    assert sample("db_pool_checkouts_total", pool=f"sqlite:///{tmp_path}/after.db", result="ok") == 2
    named = create_engine(f"sqlite:///{tmp_path}/n.db", poolclass=QueuePool, pool_logging_name="content")
    with named.connect():
        pass
    assert sample("db_pool_checkouts_total", pool="content", result="ok") == 1


@pytest.mark.integration
def test_password_never_in_pool_name(pg):
    telemetry.instrument(service="api")
    engine = create_engine(pg.url(password="s3cr3t-pw") + "?application_name=x&password=q")
    with engine.connect():
        pass
    assert _state(engine).name == f"postgresql+psycopg://127.0.0.1:{pg.port}/postgres"
    assert not [n for n in _sqlalchemy.states() if "s3cr3t" in n]
    from prometheus_client import generate_latest

    assert b"s3cr3t" not in generate_latest()
    engine.dispose()


def test_instrument_sqlalchemy_only_that_engine(tmp_path):
    """The per-engine verb instruments the named engine and leaves the others alone."""
    mine = create_engine(f"sqlite:///{tmp_path}/m.db", poolclass=QueuePool)
    other = create_engine(f"sqlite:///{tmp_path}/o.db", poolclass=QueuePool)
    telemetry.instrument_sqlalchemy(mine, name="api-db")
    for engine in (mine, other):
        with engine.connect():
            pass
    assert list(_sqlalchemy.states()) == ["api-db"]
    assert _sqlalchemy.states()["api-db"].ok == 1
    assert other.pool.__dict__[_pool_state._ATTR] is _pool_state._SKIP
    with pytest.raises(TypeError, match="expected a sqlalchemy Engine"):
        telemetry.instrument_sqlalchemy("postgresql://x", name="y")


def test_critical_usage_event_and_rate_limit(tmp_path):
    """db_pool_critical_usage above 90% of pool_size + max_overflow with the incident report's fields, at
    most once per interval per pool; the rest are counted."""
    telemetry.instrument(service="content", critical_log_interval_seconds=60)
    engine = create_engine(f"sqlite:///{tmp_path}/c.db", poolclass=QueuePool, pool_size=2, max_overflow=2)
    with capture_logs() as logs:
        for _ in range(3):
            conns = [engine.connect() for _ in range(4)]
            for c in conns:
                c.close()
    events = [e for e in logs if e["event"] == "db_pool_critical_usage"]
    assert len(events) == 1
    ev = events[0]
    assert (ev["checked_out"], ev["max_connections"], ev["usage_ratio"]) == (4, 4, 100.0)
    assert ev["service"] == "content" and ev["log_level"] == "error"
    assert sample("telemetry_log_events_suppressed_total", event="db_pool_critical_usage") == 2
    # 3 of 4 (75%) is below the 90% line: no event at all
    telemetry.uninstrument()
    telemetry.instrument(service="content")
    with capture_logs() as logs:
        conns = [engine.connect() for _ in range(3)]
        for c in conns:
            c.close()
    assert not [e for e in logs if e["event"] == "db_pool_critical_usage"]


async def test_long_hold_reported_while_held_then_on_release(tmp_path):
    """db_connection_held_too_long fires while the connection is still held, names the owner and
    the line of the holder, and a follow-up on release gives the total hold."""
    telemetry.instrument(service="content", hold_threshold_seconds=0.2)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/h.db", poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    seen_while_held: list[dict] = []
    with capture_logs() as logs:
        with telemetry.db_owner("save-concept"):
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
                for _ in range(40):
                    await asyncio.sleep(0.05)  # the holder's line
                    seen_while_held = [e for e in logs if e["event"] == "db_connection_held_too_long"]
                    if seen_while_held:
                        break
    assert seen_while_held, "not reported while held"
    held = seen_while_held[0]
    assert held["status"] == "held" and held["owner"] == "save-concept"
    assert held["held_seconds"] >= 0.2
    assert "test_pool.py" in held["call_site"] and "test_long_hold" in held["call_site"]
    released = [e for e in logs if e["event"] == "db_connection_held_too_long" and e["status"] == "released"]
    assert len(released) == 1 and released[0]["held_seconds"] >= held["held_seconds"]
    assert not _pool_state._flagged
    await engine.dispose()


def test_long_hold_in_a_thread_points_at_the_holder(tmp_path):
    telemetry.instrument(service="api", hold_threshold_seconds=0.1)
    engine = create_engine(f"sqlite:///{tmp_path}/t.db", poolclass=QueuePool)
    with capture_logs() as logs:
        with engine.connect():
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not logs:
                time.sleep(0.02)  # sync holder line
    ev = [e for e in logs if e["event"] == "db_connection_held_too_long"][0]
    assert "test_long_hold_in_a_thread" in ev["call_site"]


def test_hook_error_never_reaches_the_caller(tmp_path, monkeypatch):
    """An exception inside the checkout hook is caught, counted and logged once; the caller's
    checkouts all succeed."""
    telemetry.instrument(service="api")
    engine = create_engine(f"sqlite:///{tmp_path}/e.db", poolclass=QueuePool)

    def broken() -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(_pool, "_owner_get", broken)
    with capture_logs() as logs:
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar() == 1
    assert sample("telemetry_hook_errors_total", hook="pool.checkout") == 3
    assert [e["hook"] for e in logs if e["event"] == "telemetry_hook_error"] == ["pool.checkout"]


def test_uninstrument_removes_everything(tmp_path):
    """uninstrument() restores Pool.connect, removes every listener and the collector; a second
    instrument() call is a no-op."""
    original = Pool.__dict__["connect"]
    first = telemetry.instrument(service="a")
    assert telemetry.instrument(service="a") is first
    assert Pool.__dict__["connect"] is not original
    assert event.contains(Pool, "checkin", _pool._release)
    telemetry.uninstrument()
    assert Pool.__dict__["connect"] is original
    for name, fn in _sqlalchemy._LISTENERS:
        assert not event.contains(Pool, name, fn)
    with pytest.raises(KeyError):
        sample("db_pool_checkouts_total")
    engine = create_engine(f"sqlite:///{tmp_path}/u.db", poolclass=QueuePool)
    with engine.connect():
        pass
    assert not _sqlalchemy.states()


def test_owner_cap_folds_into_other(tmp_path):
    telemetry.instrument(service="api", max_owners=3)
    engine = create_engine(f"sqlite:///{tmp_path}/o.db", poolclass=QueuePool)
    for i in range(6):
        with telemetry.db_owner(f"route-{i}"), engine.connect():
            pass
    st = _state(engine)
    assert sorted(st.hold) == ["other", "route-0", "route-1", "route-2"]
    assert sample("telemetry_owner_overflow_total", pool=st.name) == 3
    assert sample("db_connection_hold_seconds_count", pool=st.name, owner="other") == 3


def test_an_engine_per_task_keeps_one_series(tmp_path):
    """Apps that create (and dispose) an engine per task must not grow a new pool label each
    time: engines with the same URL share the name and its counters."""
    telemetry.instrument(service="worker")
    url = f"sqlite:///{tmp_path}/per-task.db"
    keep = []
    for _ in range(5):
        engine = create_engine(url, poolclass=QueuePool, pool_size=2, max_overflow=2)
        with engine.connect():
            pass
        engine.dispose()
        keep.append(engine)  # still alive: the name must not depend on garbage collection
    names = [n for n in _sqlalchemy.states() if "per-task.db" in n]
    assert names == [f"sqlite:///{tmp_path}/per-task.db"]
    assert _sqlalchemy.states()[names[0]].ok == 5


def test_static_pool_overlapping_checkouts_are_both_counted():
    """StaticPool hands one shared record to every checkout: two overlapping connections are 2 in
    use, both holds are recorded, and (the pool has no bound) no critical-usage event fires."""
    from sqlalchemy.pool import StaticPool

    telemetry.instrument(service="api")
    engine = create_engine("sqlite://", poolclass=StaticPool, pool_logging_name="static")
    with capture_logs() as logs:
        first = engine.connect()
        second = engine.connect()
        assert sample("db_pool_connections_in_use", pool="static") == 2
        first.close()
        assert sample("db_pool_connections_in_use", pool="static") == 1
        second.close()
    assert sample("db_pool_connections_in_use", pool="static") == 0
    assert sample("db_connection_hold_seconds_count", pool="static") == 2
    assert not [e for e in logs if e["event"] == "db_pool_critical_usage"]
    with pytest.raises(KeyError):
        sample("db_pool_connections_max", pool="static")
    assert not _pool_state._held


def test_engines_sharing_a_creator_keep_their_own_names(tmp_path):
    """A writer (5+0) and a reader (20+0) engine over one creator function: the reader's held
    connections are the reader's, with its own max, also after reader.dispose()."""
    import sqlite3

    path = str(tmp_path / "db.sqlite")

    def creator() -> sqlite3.Connection:
        return sqlite3.connect(path, check_same_thread=False)

    telemetry.instrument(service="api")
    writer = create_engine("sqlite://", creator=creator, poolclass=QueuePool, pool_size=5, max_overflow=0,
                           pool_logging_name="writer")  # fmt: skip
    reader = create_engine("sqlite://", creator=creator, poolclass=QueuePool, pool_size=20, max_overflow=0,
                           pool_logging_name="reader")  # fmt: skip
    with writer.connect():
        pass
    held = [reader.connect() for _ in range(3)]
    assert sample("db_pool_connections_in_use", pool="reader") == 3
    assert sample("db_pool_connections_in_use", pool="writer") == 0
    assert sample("db_pool_connections_max", pool="reader") == 20
    assert sample("db_pool_connections_max", pool="writer") == 5
    for conn in held:
        conn.close()
    reader.dispose()
    with reader.connect():
        assert sample("db_pool_connections_in_use", pool="reader") == 1
    assert sample("db_pool_checkouts_total", pool="reader", result="ok") == 4
    assert sample("db_pool_checkouts_total", pool="writer", result="ok") == 1


def test_release_racing_the_long_hold_report(tmp_path, monkeypatch):
    """The connection is released after the watchdog picked it up and before it reported: no
    "held" event after the release, no stale held-too-long gauge, and the next long hold of the
    same connection is reported again."""
    telemetry.instrument(service="api", hold_threshold_seconds=100)
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", pool_size=1, max_overflow=0,
                           pool_logging_name="race")  # fmt: skip
    conn = engine.connect()

    class ReleaseWhileScanning(dict):
        trigger = staticmethod(conn.close)

        def __contains__(self, key: object) -> bool:
            trigger, ReleaseWhileScanning.trigger = ReleaseWhileScanning.trigger, None  # type: ignore[assignment]
            if trigger is not None:
                trigger()  # the holder releases right now, on the scan's way to reporting
            return super().__contains__(key)

    flagged = ReleaseWhileScanning()
    monkeypatch.setattr(_pool_state.TABLE, "flagged", flagged)  # the watchdog's flags
    monkeypatch.setattr(_pool, "_flagged", flagged)  # the hot path's alias of them
    with capture_logs() as logs:
        _pool_events.scan_long_holds(now=time.perf_counter() + 1000)
    assert [e for e in logs if e["event"] == "db_connection_held_too_long"] == []
    assert sample("db_pool_connections_held_too_long", pool="race") == 0
    assert not _pool_state._flagged
    again = engine.connect()
    with capture_logs() as logs:
        assert _pool_events.scan_long_holds(now=time.perf_counter() + 1000) == 1
        assert sample("db_pool_connections_held_too_long", pool="race") == 1
        again.close()
    assert [e["status"] for e in logs if e["event"] == "db_connection_held_too_long"] == ["held", "released"]
    assert sample("db_pool_connections_held_too_long", pool="race") == 0


def test_detach_under_thread_contention_stays_exact(tmp_path):
    """SQLAlchemy returns a detached connection's record to the pool before the detach event:
    with 4 threads and a tiny switch interval, another thread holds it by then. in_use ends at 0
    and every checkout is matched by one release."""
    import sys

    telemetry.instrument(service="api")
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", pool_size=2, max_overflow=2, pool_timeout=30,
                           connect_args={"check_same_thread": False}, pool_logging_name="detach")  # fmt: skip

    def work(k: int) -> None:
        for i in range(150):
            conn = engine.connect()
            if (i + k) % 2 == 0:
                conn.detach()
            conn.close()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    st = _state(engine)
    assert st.in_use == engine.pool.checkedout() == 0
    assert sample("db_pool_connections_in_use", pool="detach") == 0
    assert sample("db_connection_hold_seconds_count", pool="detach") == 600
    assert not _pool_state._held


def test_gauges_exist_from_engine_creation_not_first_checkout(tmp_path):
    """An engine created after instrument(): its pool's gauges read 0 (and its max is known)
    before anything checks a connection out, so idle is not "not reporting"."""
    telemetry.instrument(service="api")
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", poolclass=QueuePool, pool_size=3, max_overflow=1,
                           pool_logging_name="fresh")  # fmt: skip
    assert sample("db_pool_connections_in_use", pool="fresh") == 0
    assert sample("db_pool_pending_requests", pool="fresh") == 0
    assert sample("db_pool_connections_max", pool="fresh") == 4
    engine.dispose()
    del engine
    gc.collect()  # a pool gone can open nothing: the connection budget no longer counts it
    assert not [v for (n, lb), v in telemetry.testing.metrics().items()
                if n == "db_pool_connections_max" and ("pool", "fresh") in lb]  # fmt: skip
