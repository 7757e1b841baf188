"""psycopg_pool (issue 32): its pools report the same ``db_pool_*`` series as SQLAlchemy's, named by
the pool's ``name``. The app shape is LangGraph's: a checkpointer saving each step through an
``AsyncConnectionPool`` while graph runs hold connections across an awaited model call; the
starvation is named with its holder, by diagnose too, and the server view joins the held
connections to their owners."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import psycopg_pool
import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

import telemetry
from telemetry.tools.live import diagnose
from telemetry.tools.samples import parse

from .. import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("psycopg_pool")]


def _value(name: str, **labels: str) -> float | None:
    return hostview.value(hostview.host(None), name, **labels)


def _conninfo(pg: services.Postgres) -> str:
    return pg.url().replace("postgresql+psycopg://", "postgresql://")


def test_a_sync_pool_reports_use_wait_timeouts_and_holders(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    pool = psycopg_pool.ConnectionPool(_conninfo(pg), min_size=1, max_size=2, name="checkpoints", open=True)
    release, holding = threading.Event(), threading.Barrier(3)

    def hold() -> None:
        with telemetry.db_owner("graph-step"), pool.connection() as conn:
            conn.execute("select 1")
            holding.wait(30)
            release.wait(30)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        holding.wait(30)
        with capture_logs() as logs, pytest.raises(psycopg_pool.PoolTimeout, match="couldn't get a connection"):
            pool.getconn(timeout=0.3)
        now = hostview.host(None)
        seen = {k: hostview.value(now, f"db_pool_{k}", pool="checkpoints")
                for k in ("connections_in_use", "connections_idle", "size", "connections_max", "timeouts_total")}
        held_now = hostview.value(now, "db_pool_connections_in_use_by_owner", pool="checkpoints", owner="graph-step")
        found = diagnose.findings(parse(generate_latest().decode()))
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert seen == {"connections_in_use": 2, "connections_idle": 0, "size": 1, "connections_max": 2,
                    "timeouts_total": 1}, seen  # fmt: skip
    assert held_now == 2
    timeout = [e for e in logs if e["event"] == "db_pool_timeout"]
    assert timeout and timeout[0]["pool"] == "checkpoints" and timeout[0]["waited_seconds"] >= 0.3, logs
    assert [h["owner"] for h in timeout[0]["longest_holders"]] == ["graph-step", "graph-step"]
    pool_line = [f for f in found if f.startswith("Pool: the busiest api process has 100%")]
    assert pool_line and "Held now by 'graph-step' (2)" in pool_line[0], found
    assert hostview.wait_for(lambda: _value("db_pool_connections_in_use", pool="checkpoints") == 0, timeout=10)
    assert _value("db_connection_hold_seconds_count", pool="checkpoints", owner="graph-step") == 2
    assert (_value("db_pool_checkout_wait_seconds_count", pool="checkpoints") or 0) >= 3  # two, and the timeout
    pool.close()


class Checkpointer:
    """The shape of LangGraph's ``AsyncPostgresSaver``: every step of a run saved through the
    pool, each save a short checkout."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.pool = pool

    async def setup(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("create table if not exists checkpoints (run int, step int, state text)")

    async def aput(self, run: int, step: int, state: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("insert into checkpoints values (%s, %s, %s)", (run, step, state))


async def _graph_run(saver: Checkpointer, run: int, model_seconds: float) -> None:
    """A run whose 'plan' node keeps its connection across the awaited model call: the defect
    the holder's name points at."""
    async with telemetry.db_owner("graph-run"):
        await saver.aput(run, 0, "start")
        async with saver.pool.connection() as conn:
            await conn.execute("select 1")
            await asyncio.sleep(model_seconds)  # the model call, the connection held across it
        await saver.aput(run, 1, "done")


def test_a_langgraph_style_checkpointer_starving_its_pool_is_named_with_its_holder(pg: services.Postgres) -> None:
    telemetry.instrument(service="agent", tracing=False, hold_threshold_seconds=0.3,
                         server_view_url=_conninfo(pg), shared_view_interval_seconds=0.2)  # fmt: skip
    seen: dict[str, Any] = {}

    async def main() -> None:
        pool = psycopg_pool.AsyncConnectionPool(_conninfo(pg), min_size=1, max_size=2, name="langgraph", open=False)
        await pool.open()
        saver = Checkpointer(pool)
        await saver.setup()
        runs = [asyncio.create_task(_graph_run(saver, i, 1.5)) for i in range(4)]

        def starved() -> bool:
            return (_value("db_pool_pending_requests", pool="langgraph") or 0) >= 1 and (
                _value("db_pool_connections_in_use", pool="langgraph") or 0) >= 2  # fmt: skip

        assert await asyncio.to_thread(hostview.wait_for, starved, 30)
        seen["joined"] = await asyncio.to_thread(
            hostview.wait_for, lambda: _value("db_server_connections_by_owner", service="agent", owner="graph-run"), 30)
        seen["found"] = diagnose.findings(parse(generate_latest().decode()))
        await asyncio.gather(*runs)
        await pool.close()

    with capture_logs() as logs:
        asyncio.run(main())
    pool_line = [f for f in seen["found"] if f.startswith("Pool: the busiest agent process has 100%")]
    assert pool_line and "Held now by 'graph-run' (2)" in pool_line[0], seen["found"]
    assert seen["joined"] and seen["joined"] >= 1  # the server view names the holder of the backend
    held = [e for e in logs if e["event"] == "db_connection_held_too_long" and e["status"] == "held"]
    assert held and held[0]["pool"] == "langgraph" and held[0]["owner"] == "graph-run", logs
    assert "test_psycopg_pool.py" in (held[0]["call_site"] or "") and "_graph_run" in held[0]["call_site"], held[0]
    assert _value("db_pool_checkouts_total", pool="langgraph", result="ok") == 1 + 4 * 3
    with psycopg.connect(_conninfo(pg), autocommit=True) as conn:
        assert conn.execute("select count(*) from checkpoints").fetchone() == (8,)
        conn.execute("drop table checkpoints")


def test_a_connection_a_task_never_returns_is_a_leak(pg: services.Postgres) -> None:
    from celery import Celery

    telemetry.instrument(service="worker", tracing=False)
    pool = psycopg_pool.ConnectionPool(_conninfo(pg), min_size=1, max_size=2, name="jobs", open=True)
    app = Celery("leaky", broker="memory://", backend="cache+memory://")
    kept: list[Any] = []

    @app.task(name="jobs.export")
    def export() -> int:
        conn = pool.getconn()
        conn.execute("select 1")
        kept.append(conn)  # never put back
        return 1

    assert export.apply().get() == 1
    assert hostview.wait_for(lambda: _value("db_pool_connections_leaked_total", pool="jobs", owner="jobs.export"), 20)
    leak = [f.text for f in diagnose.all_findings(parse(generate_latest().decode())) if f.kind == "leak"]
    pool.putconn(kept.pop())
    pool.close()
    assert leak and leak[0].startswith("Leaked connections: 1 of worker's connections"), leak


def test_copy_and_server_side_cursors_on_a_lent_connection_are_tagged(pg: services.Postgres) -> None:
    """The statements a lent connection runs besides ``execute``: a ``COPY`` (``cursor.copy()``,
    seen on the server while rows are still being written) and a server-side cursor's
    ``DECLARE`` carry the tag; psycopg's own ``FETCH`` carries none and is joined to the owner by
    the cursor's name the owner rows publish; a connection that no pool lent carries no tag."""
    from telemetry._core import sqltag
    from telemetry.server_view.model import Owners
    from telemetry.server_view.queries import host_owners

    pg.psql("create table if not exists copied (n int)")
    telemetry.instrument(service="api", tracing=False)
    own = "select query from pg_stat_activity where pid = %s"
    with psycopg.connect(_conninfo(pg), autocommit=True) as watcher, \
            psycopg_pool.ConnectionPool(_conninfo(pg), min_size=1, max_size=1, open=True,
                                        kwargs={"prepare_threshold": None}) as pool:  # fmt: skip
        with telemetry.db_owner("POST /imports"), pool.connection() as conn:
            pid = conn.info.backend_pid
            with conn.cursor() as cur, cur.copy("copy copied (n) from stdin") as copy:
                copy.write_row((1,))
                copying = watcher.execute(own, (pid,)).fetchone()[0]  # type: ignore[index]
            with conn.transaction(), conn.cursor(name="export") as cur:
                cur.execute("select n from copied where n > %s", (0,))
                declared = watcher.execute(own, (pid,)).fetchone()[0]  # type: ignore[index]
                cur.fetchone()
                fetched = watcher.execute(own, (pid,)).fetchone()[0]  # type: ignore[index]
                holder = Owners(host_owners(None)).cursor(fetched)  # psycopg's FETCH: joined by the name
        with psycopg.connect(_conninfo(pg)) as bare:
            plain = bare.execute("select query from pg_stat_activity where pid = pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    assert sqltag.parse(copying)["owner"] == "POST /imports" and copying.endswith("copy copied (n) from stdin"), copying
    assert sqltag.parse(declared)["owner"] == "POST /imports" and "declare" in declared.lower(), declared
    assert sqltag.parse(fetched) == {} and holder is not None and holder.owner == "POST /imports", fetched
    assert sqltag.parse(plain) == {}, plain
