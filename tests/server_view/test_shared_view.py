"""The shared side against a real PostgreSQL and a real pgbouncer (transaction mode): the pooler
queue named by who holds its server connections, a row-lock chain named by route, idle in
transaction, two simulated hosts, one query set per host, and failures that never reach the app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from sqlalchemy import create_engine, text

import telemetry
from telemetry._core import exposition as _exposition
from telemetry.server_view import model as _shared_model
from telemetry.server_view import queries as _shared_queries
from telemetry.testing import capture_events
from telemetry.tools import cli
from telemetry.tools.demo import report
from telemetry.tools.live import diagnose

from .. import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("shared_view")]


@pytest.fixture(scope="module")
def bouncer(pg: services.Postgres) -> Iterator[services.Pgbouncer]:
    with services.start_pgbouncer(pg, pool_size=4) as server:
        yield server


@pytest.fixture(scope="module")
def row(pg: services.Postgres) -> str:
    pg.psql("create table if not exists shared_item (id int primary key, n int); "
            "insert into shared_item values (1, 0) on conflict do nothing")  # fmt: skip
    return "shared_item"


_host, _value = hostview.host, hostview.value


def _wait_for(predicate: Any, timeout: float = 20.0, step: float = 0.1) -> Any:
    return hostview.wait_for(predicate, timeout, step)


_WORKER = textwrap.dedent(
    """
    import json, sys, threading, time
    from sqlalchemy import create_engine, text
    import telemetry
    from telemetry.testing import capture_events
    url, directory, holders, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    extra = {"server_view_url": sys.argv[5]} if len(sys.argv) > 5 else {}
    telemetry.instrument(service="worker", multiproc_dir=directory, flush_interval_seconds=0.1,
                         **extra)
    engine = create_engine(url, pool_size=holders, max_overflow=0)
    ready = threading.Barrier(holders + 1)

    def hold():
        with telemetry.db_owner("content_task"), engine.begin() as conn:
            conn.execute(text(sys.argv[6] if len(sys.argv) > 6 else "select 1"))
            ready.wait()
            time.sleep(seconds)

    with capture_events("db_lock_wait") as events:
        threads = [threading.Thread(target=hold) for _ in range(holders)]
        for t in threads:
            t.start()
        ready.wait()
        print("holding", flush=True)
        for t in threads:
            t.join()
    print(json.dumps(events, default=str), flush=True)
    """
)


def _start_worker(url: str, directory: str, holders: int, seconds: float, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, url, directory, str(holders), str(seconds), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "holding":
        proc.kill()
        raise AssertionError(proc.stderr.read() if proc.stderr else "worker failed")
    return proc


def test_pooler_queue_names_the_service_and_owner_holding_the_server_connections(
    pg: services.Postgres, bouncer: services.Pgbouncer, tmp_path: Any
) -> None:
    directory = str(tmp_path)
    with capture_events("db_pooler_waiting") as events:
        telemetry.instrument(service="api", multiproc_dir=directory, flush_interval_seconds=0.1,
                             pgbouncer_url=bouncer.admin_url, server_view_url=pg.url().replace("+psycopg", ""),
                             shared_view_interval_seconds=0.2)  # fmt: skip
        api = create_engine(bouncer.url(), pool_size=3, max_overflow=0)
        with api.connect():  # the dialect's first connect, before the pooler is full
            pass
        worker = _start_worker(bouncer.url(), directory, bouncer.pool_size, 6.0)
        try:
            done: list[float] = []

            def request() -> None:
                t0 = time.monotonic()
                with telemetry.db_owner("GET /items/{id}"), api.connect() as conn:
                    conn.execute(text("select 1"))
                done.append(time.monotonic() - t0)

            threads = [threading.Thread(target=request) for _ in range(3)]
            for t in threads:
                t.start()

            exposition: list[str] = []

            def episode() -> Any:  # the API queued and the holders joined to their owner
                host = _host(directory)
                queued = (_value(host, "pgbouncer_clients", state="waiting") or 0) >= 3
                joined = _value(host, "db_server_connections_by_owner", service="worker", owner="content_task")
                if queued and joined == bouncer.pool_size:
                    exposition.append(generate_latest(_exposition.host_registry(directory)).decode())
                    return host
                return None

            host = waiting = _wait_for(episode)
            for t in threads:
                t.join(30)
        finally:
            worker.communicate(timeout=30)
            api.dispose()
    assert waiting, "the API's clients never showed as waiting in the pooler"
    assert len(done) == 3 and min(done) > 2.0  # they did wait for the worker's transactions
    assert _value(host, "pgbouncer_servers_by_application", application="worker") == bouncer.pool_size
    assert _value(host, "pgbouncer_clients_by_application", application="api", state="waiting") == 3
    assert (_value(host, "pgbouncer_client_wait_longest_seconds", application="api") or 0) > 0
    assert _value(host, "pgbouncer_pool_size", database="postgres") == bouncer.pool_size
    assert _value(host, "pgbouncer_max_client_connections") == 500  # SHOW CONFIG max_client_conn
    # the server view joins the server backends (through the pooler) to the worker's owner
    assert _value(host, "db_server_connections_by_owner", service="worker", owner="content_task") == 4
    # the host-wide gauges carry no pid: one series whichever process polls
    assert all("pid" not in dict(lb) for (n, lb) in host if n.startswith(("pgbouncer_", "db_server_")))
    assert events, "no db_pooler_waiting event during the episode"
    first = events[0]
    assert first["holders"] == [{"service": "worker", "owner": "content_task", "server_connections": 4}]
    assert first["waiting_applications"] == {"api": first["clients_waiting"]}
    assert len(events) == 1  # once per episode (it lasted < 30 s)
    # the diagnosis from that /metrics names the pooler, the holding service and its owner
    found = diagnose.findings(report.parse(exposition[0]))
    pooler = [f for f in found if f.startswith("pgbouncer:")]
    assert len(pooler) == 1, found
    assert "3 clients of postgres/postgres queue" in pooler[0]
    assert "held by worker (4)" in pooler[0] and "worker 'content_task' (4)" in pooler[0]
    # the pooler's own wait total counts the three waits (seconds each); pgbouncer adds a wait when
    # the client gets its server, which the poll in hand may precede: wait for the next polls
    def wait_total() -> float:
        return _value(_host(directory), "pgbouncer_client_wait_seconds_total", database="postgres") or 0.0

    assert _wait_for(lambda: wait_total() > 6.0, timeout=5.0), wait_total()


def _lock_app(pg: services.Postgres, table: str) -> Any:
    from fastapi import FastAPI
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(pg.url("asyncpg"), pool_size=5, max_overflow=0)
    app = FastAPI()

    @app.post("/items/{item_id}/reserve")
    async def reserve(item_id: int) -> dict[str, int]:
        async with engine.begin() as conn:
            await conn.execute(text(f"select n from {table} where id = :id for update"), {"id": item_id})
            await asyncio.sleep(3.0)  # the slow step (an LLM call) with the row lock held
        return {"ok": 1}

    @app.put("/items/{item_id}/count")
    async def count(item_id: int) -> dict[str, int]:
        async with engine.begin() as conn:
            await conn.execute(text(f"update {table} set n = n + 1 where id = :id"), {"id": item_id})
        return {"ok": 1}

    @app.put("/items/{item_id}/title")
    async def title(item_id: int) -> dict[str, int]:
        async with engine.begin() as conn:
            await conn.execute(text(f"update {table} set n = n + 10 where id = :id"), {"id": item_id})
        return {"ok": 1}

    @app.post("/slow-transaction")
    async def slow_transaction() -> dict[str, int]:
        async with engine.begin() as conn:
            await conn.execute(text(f"select n from {table} where id = 1"))
            await asyncio.sleep(2.5)  # awaiting something slow inside the transaction
        return {"ok": 1}

    return app, engine


def test_lock_chain_names_the_blocking_route_and_each_blocked_route(
    pg: services.Postgres, row: str, capsys: Any
) -> None:
    telemetry.instrument(service="api", server_view_url=pg.url(), shared_view_interval_seconds=0.2,
                         lock_wait_event_seconds=0.5)  # fmt: skip
    port = services.free_port()
    telemetry.start_metrics_server(port)
    app, engine = _lock_app(pg, row)
    diagnosis: list[int] = []

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            hold = asyncio.create_task(client.post("/items/1/reserve"))
            await asyncio.sleep(0.5)
            b = asyncio.create_task(client.put("/items/1/count"))
            await asyncio.sleep(0.2)
            c = asyncio.create_task(client.put("/items/1/title"))
            await asyncio.sleep(1.5)  # both wait now: diagnose from this process's /metrics
            diagnosis.append(await asyncio.to_thread(
                cli.main, ["diagnose", "--window", "1s", "--metrics-url", f"http://127.0.0.1:{port}/metrics"]))
            responses = await asyncio.gather(hold, b, c)
        await engine.dispose()
        return [r.status_code for r in responses]

    with capture_events("db_lock_wait") as events:
        assert asyncio.run(scenario()) == [200, 200, 200]
    assert len(events) == 2, events  # B and C, each once
    assert {e["blocked_owner"] for e in events} == {"PUT /items/{item_id}/count", "PUT /items/{item_id}/title"}
    for e in events:
        assert e["blocker_owner"] == "POST /items/{item_id}/reserve"
        assert e["blocker_service"] == e["blocked_service"] == "api"
        assert e["blocker_state"] == "idle in transaction"  # awaiting the slow step
        assert e["blocker_xact_seconds"] >= 0.5
        assert e["blocked_wait_seconds"] >= 0.5
        assert e["relation"] == row
        assert "for update" in e["blocker_statement"] and "$1" in e["blocker_statement"]
        assert "1" not in e["blocked_statement"].replace("$1", "")  # no parameter values
    assert telemetry.testing.sample("db_server_events_total", event="db_lock_wait") == 2
    out = capsys.readouterr().out
    assert diagnosis == [1]  # findings: exit 1
    locks = [line for line in out.splitlines() if line.startswith("- Locks:")]
    assert len(locks) == 1, out
    assert "api 'POST /items/{item_id}/reserve' holds a lock that blocks" in locks[0]
    assert "api 'PUT /items/{item_id}/count' (1)" in locks[0] and "api 'PUT /items/{item_id}/title' (1)" in locks[0]


def test_idle_in_transaction_names_the_route(pg: services.Postgres, row: str) -> None:
    telemetry.instrument(service="api", server_view_url=pg.url(), shared_view_interval_seconds=0.2,
                         idle_in_transaction_event_seconds=1.0)  # fmt: skip
    app, engine = _lock_app(pg, row)
    peak: list[float] = []

    async def scenario() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            task = asyncio.create_task(client.post("/slow-transaction"))
            await asyncio.sleep(2.0)
            peak.append(telemetry.testing.sample("db_server_oldest_idle_in_transaction_seconds",
                                                 application="api"))  # fmt: skip
            response = await task
        await engine.dispose()
        return response.status_code

    with capture_events("db_idle_in_transaction") as events:
        assert asyncio.run(scenario()) == 200
    assert len(events) == 1, events
    assert events[0]["idle_owner"] == "POST /slow-transaction"
    assert events[0]["idle_service"] == "api"
    assert events[0]["idle_seconds"] >= 1.0
    assert "?" in events[0]["last_statement"] or "where id = ?" in events[0]["last_statement"]
    assert peak and peak[0] >= 1.0


def _application_name(url: str, **kwargs: Any) -> str:
    engine = create_engine(url, **kwargs)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("show application_name")).scalar())
    finally:
        engine.dispose()


def test_application_name_is_set_and_a_users_own_is_kept(pg: services.Postgres) -> None:
    telemetry.instrument(service="api")
    named = _application_name(pg.url())
    service, pid, host = _shared_model.parse_application(named)
    assert (service, pid) == ("api", str(os.getpid())) and host
    if _has("psycopg2"):
        assert _application_name(pg.url("psycopg2")) == named
    assert _application_name(pg.url() + "?application_name=mine") == "mine"
    assert _application_name(pg.url(), connect_args={"application_name": "theirs"}) == "theirs"

    async def on_asyncpg() -> tuple[str, str]:
        from sqlalchemy.ext.asyncio import create_async_engine

        named = create_async_engine(pg.url("asyncpg"))
        kept = create_async_engine(pg.url("asyncpg"), connect_args={"server_settings": {"application_name": "own"}})
        async with named.connect() as a, kept.connect() as b:
            out = ((await a.execute(text("show application_name"))).scalar(),
                   (await b.execute(text("show application_name"))).scalar())  # fmt: skip
        await named.dispose()
        await kept.dispose()
        return out  # type: ignore[return-value]

    from_asyncpg, kept = asyncio.run(on_asyncpg())
    assert from_asyncpg == named and kept == "own"


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_one_poller_for_two_hosts_names_both_sides_of_a_lock(pg: services.Postgres, row: str, tmp_path: Any) -> None:
    """Host 1 (a directory, three processes): the worker holds the row lock; host 2: this process
    waits on it. Each host has one monitoring connection (its leader), and of those exactly one
    holds the deployment's advisory lock and runs the query set; that one poller names the
    blocker's owner and the blocked owner alike. Their psycopg connections prepare statements,
    so the tags carry each connection's token, not its owner: the host that follows tells the
    poller who holds its tokens, over the server."""
    host1, host2 = str(tmp_path / "h1"), str(tmp_path / "h2")
    os.mkdir(host1)
    os.mkdir(host2)
    server = pg.url().replace("+psycopg", "")
    lock_sql = f"select n from {row} where id = 1 for update"
    # the idle workers first, then the blocker: its hold counts from its "holding", and starting
    # two processes inside it took most of an 8 s hold on a loaded CI machine (no wait was seen)
    idle = [_start_worker(pg.url(), host1, 1, 12.0, server) for _ in range(2)]
    blocker = _start_worker(pg.url(), host1, 1, 12.0, server, lock_sql)
    theirs: list[dict[str, Any]] = []
    try:
        telemetry.instrument(service="api", multiproc_dir=host2, server_view_url=server,
                             shared_view_interval_seconds=0.2, lock_wait_event_seconds=0.5,
                             flush_interval_seconds=0.1)  # fmt: skip
        engine = create_engine(pg.url(), pool_size=1, max_overflow=0)

        def update() -> None:
            with telemetry.db_owner("PUT /items/{item_id}/count"), engine.begin() as conn:
                conn.execute(text(f"update {row} set n = n + 1 where id = 1"))

        def reported() -> float:
            return sum(_value(_host(h), "db_server_events_total", event="db_lock_wait") or 0 for h in (host1, host2))

        with capture_events("db_lock_wait") as events:
            waiter = threading.Thread(target=update)
            waiter.start()
            assert _wait_for(lambda: reported() >= 1, timeout=30)
            pollers = pg.psql("select count(*) from pg_stat_activity where application_name like 'telemetry-shared-view/%'")
            holders = pg.psql(f"select count(*) from pg_locks where locktype = 'advisory' and granted "
                              f"and classid = {_shared_queries.CLUSTER_LOCK[0]} and objid = {_shared_queries.CLUSTER_LOCK[1]}")  # fmt: skip
            polls = {h: _value(_host(h), "db_server_view_polls_total") or 0 for h in (host1, host2)}
            waiter.join(30)
        engine.dispose()
    finally:
        for proc in [blocker, *idle]:
            out, _err = proc.communicate(timeout=30)
            theirs.extend({**e, "reported_by": proc.pid} for e in json.loads(out.strip().splitlines()[-1]))
    assert int(pollers) == 2  # one monitoring connection per host: host 1's three processes share one
    assert int(holders) == 1  # one of them polls for the whole deployment
    assert sorted(v > 0 for v in polls.values()) == [False, True], polls
    mine = [e for e in events + theirs if e["blocked_owner"] == "PUT /items/{item_id}/count"]
    # on failure: which process reported which episode (a CI run saw host 1 report one twice)
    assert len(mine) == 1, [(e.get("reported_by", "host 2"), e.get("lock_key"), e.get("blocked_wait_seconds"))
                            for e in mine]  # fmt: skip
    assert (mine[0]["blocker_service"], mine[0]["blocker_owner"]) == ("worker", "content_task")
    assert mine[0]["blocked_service"] == "api" and mine[0]["blocker_host"]


_POLLER = textwrap.dedent(
    """
    import sys, time
    import telemetry
    telemetry.instrument(service=sys.argv[3], multiproc_dir=sys.argv[1], server_view_url=sys.argv[2],
                         shared_view_interval_seconds=0.2, flush_interval_seconds=0.1, sqlalchemy=False)
    print("started", flush=True)
    time.sleep(120)
    """
)


_HOLDER_SQL = ("select a.application_name from pg_locks l join pg_stat_activity a using (pid) "
               f"where l.locktype = 'advisory' and l.granted and l.classid = {_shared_queries.CLUSTER_LOCK[0]} "
               f"and l.objid = {_shared_queries.CLUSTER_LOCK[1]}")  # fmt: skip


@contextlib.contextmanager
def _two_hosts(pg: services.Postgres, tmp_path: Any, script: str = _POLLER) -> Iterator[tuple[dict, str, str]]:
    """Two hosts (directories ``h1``, ``h2``) of one poller process each, under ``script``;
    yields the processes by host, the host whose poller holds the deployment's lock, and the
    other. Every process is ended (continued first, if stopped) when the block ends."""
    import signal

    server = pg.url().replace("+psycopg", "")
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name in ("h1", "h2"):
            os.mkdir(tmp_path / name)
            procs[name] = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / name), server, f"svc-{name}"],
                                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        first = _wait_for(lambda: pg.psql(_HOLDER_SQL), timeout=30)
        leader = next(n for n, p in procs.items() if p.pid == int(first.split("/")[1].split("@")[0]))
        yield procs, leader, "h2" if leader == "h1" else "h1"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()


def _holder_pid(pg: services.Postgres) -> int | None:
    holder = pg.psql(_HOLDER_SQL)
    return int(holder.split("/")[1].split("@")[0]) if holder else None


def test_a_killed_cluster_poller_is_replaced_by_another_host(pg: services.Postgres, tmp_path: Any) -> None:
    with _two_hosts(pg, tmp_path) as (procs, killed, other):
        before = _value(_host(str(tmp_path / other)), "db_server_view_polls_total") or 0
        assert before == 0  # the other host only contends
        procs[killed].kill()
        procs[killed].wait(timeout=30)
        assert _wait_for(lambda: _holder_pid(pg) == procs[other].pid, timeout=30)
        assert _wait_for(lambda: (_value(_host(str(tmp_path / other)), "db_server_view_polls_total") or 0) > 0)


def test_failures_are_counted_and_never_reach_the_app(pg: services.Postgres, bouncer: services.Pgbouncer) -> None:
    closed = services.free_port()
    with capture_events("telemetry_shared_view_failed") as events:
        telemetry.instrument(
            service="api", server_view_url=f"postgresql://monitor:secret@127.0.0.1:{closed}/postgres",
            pgbouncer_url=f"postgresql://nobody:pw@127.0.0.1:{bouncer.port}/pgbouncer",
            shared_view_interval_seconds=0.2,
        )  # fmt: skip
        engine = create_engine(pg.url())
        for _ in range(10):  # the app keeps serving while the views fail
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar() == 1
            time.sleep(0.1)
        engine.dispose()
        assert _wait_for(lambda: (_value(_host(None), "db_server_view_errors_total") or 0) >= 2
                         and (_value(_host(None), "pgbouncer_view_errors_total") or 0) >= 2)  # fmt: skip
    host = _host(None)
    assert _value(host, "db_server_view_up") == 0 and _value(host, "pgbouncer_view_up") == 0
    assert _value(host, "db_server_view_errors_total", reason="refused") >= 2
    assert {e["target"] for e in events} == {"db_server", "pgbouncer"}  # logged once per outage
    assert len(events) == 2
    assert all("secret" not in json.dumps(e) and "pw@" not in json.dumps(e) for e in events)


def test_stale_values_are_kept_and_marked_when_the_pooler_goes_away(pg: services.Postgres) -> None:
    with services.start_pgbouncer(pg, pool_size=2) as own:
        telemetry.instrument(service="api", pgbouncer_url=own.admin_url, shared_view_interval_seconds=0.2)
        assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1)
        assert _value(_host(None), "pgbouncer_pool_size", database="postgres") == 2
    # pgbouncer stopped: the last values stay, marked stale
    assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 0)
    time.sleep(0.5)
    host = _host(None)
    assert _value(host, "pgbouncer_pool_size", database="postgres") == 2
    assert (_value(host, "pgbouncer_view_age_seconds") or 0) >= 0.4


def test_statement_text_carries_no_parameter_values() -> None:
    sql = "update t set name = 'O''Brien', n = 42, x = -1.5e3 where id = $1 and tag = E'a\\'b' and d = $$x$$"
    out = _shared_model.statement(sql)
    assert out == "update t set name = ?, n = ?, x = ? where id = $1 and tag = ? and d = ?"
    assert _shared_model.statement("select col1, t2.c3 from t2") == "select col1, t2.c3 from t2"


def test_bad_urls_fail_at_start_up_without_showing_the_password() -> None:
    with pytest.raises(telemetry.ConfigError) as info:
        telemetry.instrument(service="api", server_view_url="mysql://u:hunter2@h/db")
    message = str(info.value)
    assert "server_view_url" in message and "postgresql://" in message and "hunter2" not in message


_FROZEN_POLLER = _POLLER.replace("shared_view_interval_seconds=0.2,", "shared_view_interval_seconds=0.2, shared_view_timeout_seconds=1,")


def test_a_frozen_cluster_poller_loses_its_lease_and_stands_down_when_it_wakes(pg: services.Postgres, tmp_path: Any) -> None:
    """SIGSTOP the host that polls for the deployment: its session is ended within the lease
    (2 intervals + the timeout + 1 s: 2.4 s here), the other host takes the lock and polls.
    SIGCONT it: it asks the server before polling again, finds its session gone, stands down,
    and never polls again while the other leads."""
    import signal

    def polls(name: str) -> float:
        return _value(_host(str(tmp_path / name)), "db_server_view_polls_total") or 0

    with _two_hosts(pg, tmp_path, _FROZEN_POLLER) as (procs, frozen, other):
        # a leader at work: its host shows what it published
        assert _wait_for(lambda: _value(_host(str(tmp_path / frozen)), "db_server_view_up") == 1, timeout=30)
        os.kill(procs[frozen].pid, signal.SIGSTOP)
        assert _wait_for(lambda: _holder_pid(pg) == procs[other].pid, timeout=30)
        assert _wait_for(lambda: polls(other) > 0 and _value(_host(str(tmp_path / other)), "db_server_view_up") == 1)
        # the frozen host's own /metrics: what its poller last published ages on, then reads not up
        assert _wait_for(lambda: _value(_host(str(tmp_path / frozen)), "db_server_view_up") == 0, timeout=30)
        assert (_value(_host(str(tmp_path / frozen)), "db_server_view_age_seconds") or 0) > 5
        os.kill(procs[frozen].pid, signal.SIGCONT)
        # the woken host stands down: its figures go (no stale up 1 left behind) ...
        assert _wait_for(lambda: _value(_host(str(tmp_path / frozen)), "db_server_view_up") is None, timeout=30)
        woke_polls, led_polls = polls(frozen), polls(other)
        # ... and stays down while the other host polls ten more times
        assert _wait_for(lambda: polls(other) >= led_polls + 10, timeout=30)
        assert polls(frozen) == woke_polls
        assert _holder_pid(pg) == procs[other].pid  # one holder all along


def test_a_holder_idle_past_the_lease_marks_the_view_down_until_it_is_gone(pg: services.Postgres) -> None:
    """A session holding the deployment's lock without polling (a frozen leader on a server
    older than PostgreSQL 14, or a leader the monitoring role may not end): every other host
    exports ``db_server_view_up 0`` with reason ``leader_stale``, and logs it once. Once the
    holder is gone, a host takes over and the view is up again."""
    import psycopg

    pg.psql("do $$ begin create role monitor login; exception when duplicate_object then null; end $$; "
            "grant pg_monitor to monitor")  # fmt: skip
    monitor = f"postgresql://monitor@127.0.0.1:{pg.port}/postgres"
    squatter = psycopg.connect(pg.url().replace("+psycopg", ""), autocommit=True)  # a superuser: not ours to end
    try:
        squatter.execute(f"select pg_advisory_lock({_shared_queries.CLUSTER_LOCK[0]}, {_shared_queries.CLUSTER_LOCK[1]})")
        with capture_events("telemetry_shared_view_leader_stale") as events:
            telemetry.instrument(service="api", server_view_url=monitor, shared_view_interval_seconds=0.2,
                                 shared_view_timeout_seconds=1)  # fmt: skip
            assert _wait_for(lambda: (_value(_host(None), "db_server_view_errors_total", reason="leader_stale") or 0) >= 3,
                             timeout=30)  # fmt: skip
            assert _value(_host(None), "db_server_view_up") == 0
            assert (_value(_host(None), "db_server_view_polls_total") or 0) == 0  # it never polled meanwhile
    finally:
        squatter.close()
    assert len(events) == 1 and events[0]["lease_seconds"] == 2.4, events
    assert _wait_for(lambda: _value(_host(None), "db_server_view_up") == 1, timeout=30)


def test_one_idle_in_transaction_event_across_a_failover(pg: services.Postgres, tmp_path: Any) -> None:
    """A transaction left idle is reported once by the host polling for the deployment. That
    host is killed mid-episode: the host that takes over heard of the report (``NOTIFY``) and
    does not report the same transaction again."""
    import psycopg

    script = _POLLER.replace("shared_view_interval_seconds=0.2,",
                             "shared_view_interval_seconds=0.2, idle_in_transaction_event_seconds=0.5,")  # fmt: skip

    def events() -> float:
        return sum(_value(_host(str(tmp_path / n)), "db_server_events_total", event="db_idle_in_transaction") or 0
                   for n in ("h1", "h2"))  # fmt: skip

    idle = psycopg.connect(pg.url().replace("+psycopg", ""), application_name="left-open")
    try:
        with _two_hosts(pg, tmp_path, script) as (procs, killed, other):
            idle.execute("select 1")  # a transaction begins, and is left idle
            assert _wait_for(lambda: events() == 1, timeout=30)
            procs[killed].kill()
            procs[killed].wait(timeout=30)
            # the other host leads, and has looked ten times
            assert _wait_for(lambda: (_value(_host(str(tmp_path / other)), "db_server_view_polls_total") or 0) >= 10,
                             timeout=30)  # fmt: skip
            assert events() == 1
    finally:
        idle.close()
