"""Behind a transaction pooler that renames every client and has no console (Supabase's
Supavisor, played here by a proxy that rewrites ``application_name`` in front of a real
pgbouncer in transaction mode), the server view names who holds the server connections and who
holds a lock, from the statement tags alone; a session without a tag is not ours."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import telemetry
from telemetry.testing import capture_events

from .. import hostview, services
from ..renaming_proxy import RenamingProxy

pytestmark = [pytest.mark.integration, pytest.mark.matrix("shared_view", "sqlalchemy")]
_host, _value, _wait_for = hostview.host, hostview.value, hostview.wait_for

_NEIGHBOUR = textwrap.dedent(
    """
    import sys, threading
    from sqlalchemy import create_engine, text
    import telemetry
    url, holders, sql = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    telemetry.instrument(service="worker", tracing=False)
    # behind pgbouncer in transaction mode: psycopg must not prepare statements (docs/hosted-poolers.md)
    engine = create_engine(url, pool_size=holders, max_overflow=0, connect_args={"prepare_threshold": None})
    ready = threading.Barrier(holders + 1)
    releases = [threading.Event() for _ in range(holders)]

    def hold(release):
        with telemetry.db_owner("save-concept"), engine.begin() as conn:
            conn.execute(text(sql))
            ready.wait()
            release.wait(60)

    threads = [threading.Thread(target=hold, args=(r,)) for r in releases]
    for t in threads:
        t.start()
    ready.wait()
    print("holding", flush=True)
    for line in sys.stdin:  # "one": end one transaction; anything else (or EOF): all of them
        if line.strip() == "one" and releases:
            releases.pop().set()
            continue
        break
    for r in releases:
        r.set()
    for t in threads:
        t.join()
    engine.dispose()
    """
)


@pytest.fixture(scope="module")
def supavisor(pg: services.Postgres) -> Iterator[RenamingProxy]:
    """pgbouncer (transaction mode, 4 server connections) behind the renaming proxy; the
    pgbouncer's console is for the test's own eyes only (``proxy.bouncer``)."""
    with services.start_pgbouncer(pg, pool_size=4) as bouncer, RenamingProxy(bouncer.port) as proxy:
        proxy.bouncer = bouncer  # type: ignore[attr-defined]
        yield proxy


@pytest.fixture(scope="module")
def item(pg: services.Postgres) -> str:
    pg.psql("create table if not exists hosted_item (id int primary key, n int); "
            "insert into hosted_item values (1, 0) on conflict do nothing")  # fmt: skip
    return "hosted_item"


#: asyncpg behind a transaction pooler: neither asyncpg's nor SQLAlchemy's statement cache
#: (docs/hosted-poolers.md; a cached statement prepared on one server connection is missing on the next)
_TRANSACTION_MODE = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}


def _neighbour(url: str, holders: int, sql: str = "select 1") -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR, url, str(holders), sql], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "holding":
        proc.kill()
        raise AssertionError(proc.communicate()[1][-3000:])
    return proc


def _done(proc: subprocess.Popen[str]) -> None:
    proc.communicate("all\n", timeout=60)
    assert proc.returncode == 0


def _release_one(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("one\n")
    proc.stdin.flush()


def _direct(pg: services.Postgres) -> str:
    return pg.url().replace("+psycopg", "")


def test_the_neighbour_holding_every_server_connection_is_named(pg: services.Postgres, supavisor: RenamingProxy) -> None:
    """A worker keeps the pooler's 4 server connections in transactions: on the server they all
    read application "Supavisor", and the view names the worker and its owner anyway."""
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    neighbour = _neighbour(supavisor.url(), 4)
    try:
        assert _wait_for(lambda: _value(_host(None), "db_server_connections_by_owner", service="worker",
                                        owner="save-concept") == 4, timeout=30)  # fmt: skip
        host = _host(None)
    finally:
        _done(neighbour)
    assert (_value(host, "db_server_connections", application="Supavisor") or 0) >= 4
    assert _value(host, "db_server_connections", application="worker") is None  # the name never got through


def test_a_three_deep_lock_chain_behind_the_pooler_names_each_service_and_owner(
    pg: services.Postgres, supavisor: RenamingProxy, item: str
) -> None:
    """The worker holds a row lock; the API's first request waits for it, its second waits for
    the first (a row's second waiter waits on the first): both events name the worker's owner
    as the blocker, each victim by its own route, through asyncpg behind the pooler."""
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2,
                         lock_wait_event_seconds=0.3)  # fmt: skip
    neighbour = _neighbour(supavisor.url(), 1, f"select n from {item} where id = 1 for update")
    engine = create_async_engine(supavisor.url("asyncpg"), pool_size=2, max_overflow=0,
                                 connect_args=_TRANSACTION_MODE, pool_pre_ping=False)  # fmt: skip
    done = threading.Event()

    async def waiters() -> None:
        async def update(owner: str) -> None:
            with telemetry.db_owner(owner):
                async with engine.begin() as conn:
                    await conn.execute(text(f"update {item} set n = n + 1 where id = 1"))

        first = asyncio.create_task(update("PUT /items/{id}/count"))
        await asyncio.sleep(0)  # the first is queued on the row before the second
        second = asyncio.create_task(update("PUT /items/{id}/title"))
        await asyncio.to_thread(done.wait, 60)
        await asyncio.gather(first, second)
        await engine.dispose()

    with capture_events("db_lock_wait") as events:
        runner = threading.Thread(target=lambda: asyncio.run(waiters()))
        runner.start()
        try:
            assert _wait_for(lambda: (_value(_host(None), "db_server_events_total", event="db_lock_wait") or 0) >= 2,
                             timeout=30)  # fmt: skip
            pairs = [dict(lb) for (n, lb), _v in _host(None).items() if n == "db_server_lock_blocking"]
        finally:
            _done(neighbour)
            done.set()
            runner.join(timeout=60)
    assert {e["blocked_owner"] for e in events} == {"PUT /items/{id}/count", "PUT /items/{id}/title"}, events
    for e in events:
        assert (e["blocker_service"], e["blocker_owner"]) == ("worker", "save-concept"), e
        assert e["blocked_service"] == "api" and e["blocker_host"] and e["blocked_host"]
        assert "/*" not in e["blocker_statement"] and "for update" in e["blocker_statement"]
    assert {(p["blocker_service"], p["blocker_owner"]) for p in pairs} == {("worker", "save-concept")}


def test_a_session_without_a_tag_behind_the_pooler_is_not_ours(
    pg: services.Postgres, supavisor: RenamingProxy, item: str
) -> None:
    import psycopg

    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    with psycopg.connect(supavisor.url().replace("+psycopg", "")) as foreign:
        foreign.execute(f"select n from {item} where id = 1 for update")

        def waiter() -> None:
            engine = create_async_engine(supavisor.url("asyncpg"), connect_args=_TRANSACTION_MODE)

            async def go() -> None:
                with telemetry.db_owner("resume-step"):
                    async with engine.begin() as conn:
                        await conn.execute(text(f"update {item} set n = n where id = 1"))
                await engine.dispose()

            asyncio.run(go())

        thread = threading.Thread(target=waiter)
        thread.start()
        try:
            def named() -> list[dict[str, str]]:  # the waiter named (a loaded poll once said "unknown" first)
                found = [dict(lb) for (n, lb), _v in _host(None).items() if n == "db_server_lock_blocking"]
                return found if any(p.get("blocked_owner") == "resume-step" for p in found) else []

            pairs = _wait_for(named, timeout=30)
        finally:
            foreign.rollback()
            thread.join(timeout=30)
    assert pairs == [{"blocker_service": "Supavisor", "blocker_owner": "unknown",
                      "blocked_service": "api", "blocked_owner": "resume-step"}]  # fmt: skip


def test_the_wait_for_a_server_connection_is_measured_by_the_client(pg: services.Postgres, supavisor: RenamingProxy) -> None:
    """The neighbour holds the 4 server connections; two pages of the API check out the 2
    connections of their own pool at once and then wait in the pooler's queue. That wait is the
    first statement of their transactions: measured per owner and per request without the
    pooler's console, not counted as pool wait; and diagnose, while the API's pool is full,
    says the pooler or server is the cause and names the neighbour, not the API's pool."""
    import time

    import httpx
    import psycopg
    from fastapi import FastAPI

    telemetry.instrument(service="api", tracing=False, server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    engine = create_async_engine(supavisor.url("asyncpg"), pool_size=2, max_overflow=0,
                                 connect_args=_TRANSACTION_MODE)  # fmt: skip
    app = FastAPI()
    warmed, go, started, finish = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    @app.get("/roadmaps")
    async def roadmaps() -> dict:
        async with engine.begin() as conn:
            n = (await conn.execute(text("select 1"))).scalar()
            await asyncio.to_thread(finish.wait, 60)  # holds its server connection until told
            return {"n": n}

    async def warm_then_pages() -> int:
        async with engine.connect() as one, engine.connect() as two:  # pooled: the pages do not connect
            await one.execute(text("select 1"))
            await two.execute(text("select 1"))
        warmed.set()
        await asyncio.to_thread(go.wait, 60)  # the neighbour holds every server connection now
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            started.set()
            pages = await asyncio.gather(client.get("/roadmaps"), client.get("/roadmaps"))  # the pool: 2 of 2
        await engine.dispose()
        return max(p.status_code for p in pages)

    def findings_now() -> list[str]:
        from prometheus_client import generate_latest

        from telemetry.tools.demo import report
        from telemetry.tools.live import diagnose

        return diagnose.findings(report.parse(generate_latest().decode()))

    status: list[int] = []
    neighbour = None
    admin = psycopg.connect(supavisor.bouncer.admin_url, autocommit=True, prepare_threshold=None)  # type: ignore[attr-defined]

    def pools() -> list[dict]:
        cur = admin.execute("SHOW POOLS")
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def waiting() -> int:
        return sum(p["cl_waiting"] for p in pools())

    def oldest_wait() -> float:
        return max((p["maxwait"] + p.get("maxwait_us", 0) / 1e6 for p in pools()), default=0.0)

    runner = threading.Thread(target=lambda: status.append(asyncio.run(warm_then_pages())))
    runner.start()
    try:
        assert warmed.wait(30)
        neighbour = _neighbour(supavisor.url(), 4)
        start = time.monotonic()
        go.set()
        assert started.wait(30) and _wait_for(lambda: waiting() >= 2, timeout=30)  # both pages queue
        # long enough to matter (diagnose names a queue from a p95 of 0.1 s): released at once, a
        # page queued 60 ms on a fast run and diagnose rightly called it no finding
        assert _wait_for(lambda: oldest_wait() >= 0.3, timeout=30)
        released = time.monotonic()
        _release_one(neighbour)  # one server connection frees up: one page runs and holds it
        assert _wait_for(lambda: (_value(_host(None), "db_server_wait_seconds_count", owner="GET /roadmaps") or 0) >= 1
                         and _value(_host(None), "db_server_connections_by_owner", service="worker") == 3, timeout=30)  # fmt: skip
        findings = findings_now()  # the API's pool is 2 of 2: one page holding, one queued
    finally:
        finish.set()
        go.set()
        if neighbour is not None:
            _done(neighbour)
        runner.join(timeout=60)
        admin.close()
    queued = released - start
    assert status == [200]
    server_wait = telemetry.testing.sample("db_server_wait_seconds_sum", service="api", owner="GET /roadmaps")
    request_wait = telemetry.testing.sample("http_server_db_server_wait_seconds_sum", route="/roadmaps")
    pool_wait = telemetry.testing.sample("http_server_pool_wait_seconds_sum", route="/roadmaps")
    assert server_wait >= 0.5 * queued, (server_wait, queued)
    assert request_wait == pytest.approx(server_wait, rel=0.01)
    assert pool_wait < 0.2 * server_wait  # the pool had room for both: this was not pool wait
    said = " ".join(findings)
    assert "Server connections: api's transactions spent" in said, findings
    assert "waiting for a server connection (the server sees connections named" in said, findings
    assert "worker 'save-concept' (3)" in said and "not api's pool" in said
    assert "Slow statements" not in said and "Unknown whether" not in said, findings
    assert not [f for f in findings if f.startswith("Pool: the busiest api")], findings


def _hold_each(url: str, owners: list[str]) -> tuple[list[threading.Thread], threading.Event, object]:
    """One connection per owner, each in a transaction that ran one tagged statement, until
    the returned event is set."""
    from sqlalchemy import create_engine

    engine = create_engine(url, pool_size=len(owners), max_overflow=0, connect_args={"prepare_threshold": None})
    ready = threading.Barrier(len(owners) + 1)
    release = threading.Event()

    def hold(owner: str) -> None:
        with telemetry.db_owner(owner), engine.begin() as conn:
            conn.execute(text("select 1"))
            ready.wait(30)
            release.wait(60)

    threads = [threading.Thread(target=hold, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    ready.wait(30)
    return threads, release, engine


def _server_owners(service: str) -> dict[str, float]:
    return {dict(lb)["owner"]: v for (n, lb), v in _host(None).items()
            if n == "db_server_connections_by_owner" and dict(lb).get("service") == service}  # fmt: skip


def test_long_owners_are_cut_to_fit_the_tag_and_still_named(pg: services.Postgres, supavisor: RenamingProxy) -> None:
    """Owners whose tag would pass what PostgreSQL keeps of a statement (1,024 bytes): a
    127-character Japanese route and a 1,000-character ``db_owner``. Behind the renaming pooler
    the tag is the only join: each is named by its start, cut to fit, never dropped."""
    route, long_owner = "GET /" + "日本語のルート" * 18 + "ab", "x" * 1000
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    threads, release, engine = _hold_each(supavisor.url(), [route, long_owner])
    try:
        assert _wait_for(lambda: sum(_server_owners("api").values()) >= 2, timeout=30), _server_owners("api")
        named = _server_owners("api")
    finally:
        release.set()
        for t in threads:
            t.join()
        engine.dispose()  # type: ignore[attr-defined]
    assert len(named) == 2, named
    for full in (route, long_owner):
        [cut] = [o for o in named if o.endswith("\u2026") and full.startswith(o[:-1])]
        assert len(cut) > 40  # most of the name survives


def test_owners_read_from_tags_are_capped_like_the_owner_label(pg: services.Postgres) -> None:
    """With ``max_owners=10``, 24 owners holding connections: the server view names at most 10
    of them, the rest read ``other``, and each fold is counted."""
    owners = [f"owner-{i:02d}" for i in range(24)]
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2, max_owners=10)
    threads, release, engine = _hold_each(pg.url(), owners)
    try:
        assert _wait_for(lambda: sum(_server_owners("api").values()) >= 24, timeout=30), _server_owners("api")
        named = _server_owners("api")
        folded = _value(_host(None), "telemetry_label_values_folded_total", label="owner") or 0
    finally:
        release.set()
        for t in threads:
            t.join()
        engine.dispose()  # type: ignore[attr-defined]
    assert len(set(named) - {"other"}) == 10 and named["other"] == 14, named
    assert folded >= 14


def _forged(pid: int, owner: str = "GET /reports/{id}") -> str:
    """A statement tag as ours look, naming ``api/<pid>@<this host>``."""
    import socket
    import urllib.parse

    app = urllib.parse.quote(f"api/{pid}@{socket.gethostname()}", safe="")
    return f"/*application='{app}',owner='{urllib.parse.quote(owner, safe='')}'*/ select 1"


def _rejected(reason: str) -> float:
    return _value(_host(None), "db_server_statement_tags_rejected_total", reason=reason) or 0


def test_a_tag_copied_into_psql_is_never_ours(pg: services.Postgres) -> None:
    """A DBA's psql session runs a statement copied from ``pg_stat_activity``, its tag naming
    this very process: the session is not counted as ours, the rejection is."""
    import os

    import psycopg

    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    with psycopg.connect(_direct(pg), application_name="psql") as psql:
        psql.execute(_forged(os.getpid()))  # a transaction begins, and stays open
        assert _wait_for(lambda: _rejected("foreign_session") >= 2, timeout=30)
        named = _host(None)
    assert _value(named, "db_server_connections_by_owner", owner="GET /reports/{id}") is None
    assert (_value(named, "db_server_connections", application="psql") or 0) >= 1


def test_behind_a_renaming_pooler_a_tag_naming_a_dead_process_is_not_ours(pg: services.Postgres,
                                                                          supavisor: RenamingProxy) -> None:  # fmt: skip
    """Behind the pooler every backend reads "Supavisor", so the tag is the only word: one
    naming a process of this host that is gone is not believed."""
    import psycopg

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    with psycopg.connect(supavisor.url().replace("+psycopg", ""), prepare_threshold=None) as conn:
        conn.execute(_forged(gone.pid))
        assert _wait_for(lambda: _rejected("dead_process") >= 2, timeout=30)
        named = _host(None)
    assert _value(named, "db_server_connections_by_owner", owner="GET /reports/{id}") is None


def test_with_tags_off_no_tag_is_read(pg: services.Postgres, supavisor: RenamingProxy) -> None:
    """``statement_tag=False``: tags in other sessions' statements are not read either (a live
    process of ours named behind the renaming pooler would otherwise be believed)."""
    import os

    import psycopg

    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2,
                         statement_tag=False)  # fmt: skip
    with psycopg.connect(supavisor.url().replace("+psycopg", ""), prepare_threshold=None) as conn:
        conn.execute(_forged(os.getpid()))
        assert _wait_for(lambda: (_value(_host(None), "db_server_view_polls_total") or 0) >= 5, timeout=30)
        named = _host(None)
    assert _value(named, "db_server_connections_by_owner", owner="GET /reports/{id}") is None
    assert _value(named, "db_server_statement_tags_rejected_total") is None  # not read, so not judged


def _named_while(work: Any, owner: str, stop: threading.Event, engine: Any, first: Any = None) -> Any:
    """Run ``work`` in a thread until ``stop``; the api's server connections held by ``owner``
    once named (after ``first()``, a (condition met, what to show if not) pair, holds)."""
    thread = threading.Thread(target=work)
    thread.start()
    try:
        if first is not None:
            met, shown = first()
            assert met, shown
        return _wait_for(lambda: _value(_host(None), "db_server_connections_by_owner", service="api", owner=owner),
                         timeout=30)  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_streaming_route_behind_the_renaming_pooler_is_named(pg: services.Postgres, supavisor: RenamingProxy,
                                                               driver: str) -> None:
    """A route streams rows through a server-side cursor (stream_results): between its batches
    the backend runs the driver's untagged FETCH, or sits idle in the transaction after one, on a
    server connection named "Supavisor". The cursor's name, published by its holder, names the
    route (issue 34)."""
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    engine = create_engine(supavisor.url(driver), pool_size=1, max_overflow=0,
                           connect_args={"prepare_threshold": None} if driver == "psycopg" else {})  # fmt: skip
    seen: list[str] = []
    stop = threading.Event()
    owner = "GET /exports/{eid}/stream"

    def stream() -> None:
        with telemetry.db_owner(owner), engine.connect() as conn:
            rows = conn.execution_options(stream_results=True, max_row_buffer=5).execute(
                text("select n from generate_series(1, 100000) n"))
            try:
                for _ in rows:
                    if stop.wait(0.05):
                        break
            finally:
                rows.close()  # the driver's CLOSE of the cursor

    def fetching() -> bool:  # the server shows the driver's FETCH (or the transaction it left idle)
        with psycopg.connect(_direct(pg), autocommit=True) as probe:
            found = probe.execute("select query from pg_stat_activity where application_name = 'Supavisor' "
                                  "and query ilike 'fetch%'").fetchall()  # fmt: skip
        seen.extend(r[0] for r in found)
        return bool(found)

    named = _named_while(stream, owner, stop, engine, lambda: (_wait_for(fetching, timeout=30), seen))
    assert seen and "/*" not in seen[0], seen  # the FETCH itself carries no tag
    assert named and named >= 1


def test_a_statement_run_by_exec_driver_sql_is_tagged(pg: services.Postgres, supavisor: RenamingProxy) -> None:
    """SQLAlchemy's exec_driver_sql goes through the dialect's execute: tagged like the rest, so
    behind the renaming pooler its backend is named (issue 34)."""
    telemetry.instrument(service="api", server_view_url=_direct(pg), shared_view_interval_seconds=0.2)
    engine = create_engine(supavisor.url(), pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None})
    stop, owner = threading.Event(), "POST /reports/raw"

    def raw() -> None:
        with telemetry.db_owner(owner), engine.connect() as conn:
            while not stop.is_set():
                conn.exec_driver_sql("select pg_sleep(0.3)")

    named = _named_while(raw, owner, stop, engine)
    assert named and named >= 1
