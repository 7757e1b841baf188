"""Statement tags and prepared statements (issue 34, item 5). A driver that prepares statements
and keeps them by their text (SQLAlchemy's asyncpg adapter, psycopg 3 with a
``prepare_threshold``) would prepare every statement once per owner if the owner were in its
text. Such connections carry a token, their slot in the process, and the server view learns the
owner from the process's owner rows: the server sees as many Parse messages as with tags off
(counted in its log), and a route behind a renaming pooler is still named."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import telemetry
from telemetry._core import sqltag as _sqltag

from .. import hostview, services
from ..renaming_proxy import RenamingProxy

pytestmark = [pytest.mark.integration, pytest.mark.matrix("shared_view", "sqlalchemy", "asyncpg_pool", "psycopg_pool")]
_host, _value, _wait_for = hostview.host, hostview.value, hostview.wait_for

OWNERS = 500


@pytest.fixture(scope="module")
def logged(pg: services.Postgres) -> Iterator[None]:
    """Every Parse, Bind and Execute in the server's log while this file's tests run (one file
    runs at a time on a test worker's server; pgbouncer refuses the setting as a startup
    parameter, so it is set for the server)."""
    pg.psql("alter system set log_min_duration_statement = 0")
    pg.psql("select pg_reload_conf()")
    try:
        assert _wait_for(lambda: pg.psql("show log_min_duration_statement") == "0", timeout=30)
        yield
    finally:
        pg.psql("alter system reset log_min_duration_statement")
        pg.psql("select pg_reload_conf()")


@pytest.fixture(scope="module")
def session_pooler(pg: services.Postgres) -> Iterator[RenamingProxy]:
    """pgbouncer in session mode (it passes prepared statements through, as 1.21+ does in
    transaction mode with ``max_prepared_statements``) behind the renaming proxy: the server
    sees "Supavisor" and pgbouncer's addresses, never the client's."""
    with services.start_pgbouncer(pg, pool_size=8, pool_mode="session") as bouncer, \
            RenamingProxy(bouncer.port) as proxy:  # fmt: skip
        yield proxy


def _url(pg: services.Postgres, pooler: RenamingProxy | None, driver: str) -> str:
    return pooler.url(driver) if pooler is not None else pg.url(driver)


def _run_owners(url: str, driver: str, marker: str, prepare: Any) -> None:
    """``OWNERS`` owners, each running the same two statements, on a pool of two connections."""
    statements = [text(f"select cast(:x as int) as {marker}"), text(f"select cast(:x as int) + 1 as {marker}")]
    if driver == "asyncpg":
        async def go() -> None:
            engine = create_async_engine(url, pool_size=2, max_overflow=0)
            try:
                for i in range(OWNERS):
                    with telemetry.db_owner(f"owner-{i}"):
                        async with engine.begin() as conn:
                            for stmt in statements:
                                await conn.execute(stmt, {"x": i})
            finally:
                await engine.dispose()

        asyncio.run(go())
        return
    engine = create_engine(url, pool_size=2, max_overflow=0, connect_args={"prepare_threshold": prepare})
    try:
        for i in range(OWNERS):
            with telemetry.db_owner(f"owner-{i}"), engine.begin() as conn:
                for stmt in statements:
                    conn.execute(stmt, {"x": i})
    finally:
        engine.dispose()


def _parses(pg: services.Postgres, offset: int, marker: str) -> int:
    with open(f"{pg.datadir}/log", errors="replace") as fh:
        fh.seek(offset)
        return sum(1 for line in fh if " parse " in line and marker in line)


def _log_end(pg: services.Postgres) -> int:
    with open(f"{pg.datadir}/log", "rb") as fh:
        return fh.seek(0, 2)


def _count(pg: services.Postgres, url: str, driver: str, prepare: Any, **settings: Any) -> int:
    """Parse messages the server logged for ``_run_owners`` under these settings."""
    telemetry.uninstrument()
    telemetry.instrument(service="api", tracing=False, **settings)
    marker = f"m_{uuid.uuid4().hex[:12]}"
    start = _log_end(pg)
    _run_owners(url, driver, marker, prepare)
    telemetry.uninstrument()
    return _parses(pg, start, marker)


@pytest.mark.parametrize("through", ["direct", "renaming pgbouncer"])
@pytest.mark.parametrize("driver, prepare", [("asyncpg", None), ("psycopg", 0), ("psycopg", 5)])
def test_tags_do_not_multiply_prepared_statements(pg: services.Postgres, logged: None, session_pooler: RenamingProxy,
                                                  through: str, driver: str, prepare: Any) -> None:  # fmt: skip
    """500 owners running the same two statements: with tags on (the default), the server
    parses them within 10% as often as with tags off. The neighbouring case shows the count can
    fail: the owner's name in the text (``statement_tag_owner="text"``) parses them per owner."""
    url = _url(pg, session_pooler if through != "direct" else None, driver)
    off = _count(pg, url, driver, prepare, statement_tag=False)
    on = _count(pg, url, driver, prepare)
    named = _count(pg, url, driver, prepare, statement_tag_owner="text")
    print(f"Parse messages, {driver} prepare={prepare} {through}: tags off {off}, on {on}, owner in text {named}")
    assert off >= 2, off  # the log saw them: the count is real
    assert on <= off * 1.1, (off, on)
    assert named >= OWNERS, (off, on, named)  # one text per owner: each parsed at least once


def test_a_token_behind_the_renaming_pooler_is_named_by_its_process(pg: services.Postgres,
                                                                     session_pooler: RenamingProxy) -> None:  # fmt: skip
    """asyncpg with its statement cache, behind a pooler that renames its clients: the server
    sees "Supavisor", pgbouncer's address and a tag without an owner; the process's owner rows
    name the route holding the connection. A psql session running the same text (copied from
    ``pg_stat_activity``) while the route holds it is not ours."""
    telemetry.instrument(service="api", server_view_url=pg.url().replace("+psycopg", ""),
                         shared_view_interval_seconds=0.2, tracing=False)  # fmt: skip
    holding, release = threading.Event(), threading.Event()
    seen: list[str] = []

    async def hold() -> None:
        engine = create_async_engine(session_pooler.url("asyncpg"), pool_size=1, max_overflow=0)
        try:
            with telemetry.db_owner("GET /reports/{id}"):
                async with engine.begin() as conn:
                    seen.append((await conn.execute(text("select query from pg_stat_activity "
                                                          "where pid = pg_backend_pid()"))).scalar())  # fmt: skip
                    holding.set()
                    while not release.is_set():
                        await asyncio.sleep(0.05)
        finally:
            await engine.dispose()

    thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    thread.start()
    try:
        assert holding.wait(30)
        tag = _sqltag.parse(seen[0])
        assert "owner" not in tag and tag["conn"] == "0", seen[0]
        assert _wait_for(lambda: _value(_host(None), "db_server_connections_by_owner", service="api",
                                        owner="GET /reports/{id}") == 1, timeout=30)  # fmt: skip
        with psycopg.connect(pg.url().replace("+psycopg", ""), autocommit=True) as psql:
            copied = threading.Thread(target=_copied, args=(pg, seen[0].split("*/")[0] + "*/"), daemon=True)
            copied.start()
            assert _wait_for(lambda: (_value(_host(None), "db_server_statement_tags_rejected_total",
                                             reason="foreign_session") or 0) >= 2, timeout=30)  # fmt: skip
            assert _value(_host(None), "db_server_connections_by_owner", service="api",
                          owner="GET /reports/{id}") == 1  # the route's own, not the copy  # fmt: skip
            psql.execute("select pg_cancel_backend(pid) from pg_stat_activity where application_name = 'psql-copy'")
            copied.join(30)
    finally:
        release.set()
        thread.join(30)


def _copied(pg: services.Postgres, tag: str) -> None:
    """A DBA's session running the route's tag, copied by hand, until cancelled."""
    with psycopg.connect(pg.url().replace("+psycopg", ""), autocommit=True, application_name="psql-copy") as conn:
        try:
            conn.execute(f"{tag} select pg_sleep(60)")
        except psycopg.errors.QueryCanceled:
            pass


def _pool_owners(dsn: str, marker: str, **pool_args: Any) -> list[str]:
    """asyncpg's own pool (no SQLAlchemy): ``OWNERS`` owners, each running the same two
    statements and one without arguments; returns what the server showed for one of them."""
    import asyncpg

    async def go() -> list[str]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, **pool_args)
        try:
            for i in range(OWNERS):
                with telemetry.db_owner(f"owner-{i}"):
                    async with pool.acquire() as con, con.transaction():
                        await con.fetchval(f"select $1::int as {marker}", i)
                        await con.fetchval(f"select $1::int + 1 as {marker}", i)
            with telemetry.db_owner("GET /one"):
                return [await pool.fetchval("select query from pg_stat_activity where pid = pg_backend_pid()"),
                        await pool.fetchval("select query from pg_stat_activity where pid = pg_backend_pid() and $1",
                                            True)]  # fmt: skip
        finally:
            await pool.close()

    return asyncio.run(go())


@pytest.mark.parametrize("through", ["direct", "renaming pgbouncer"])
def test_asyncpg_pools_statements_are_tagged_without_multiplying_them(pg: services.Postgres, logged: None,
                                                                      session_pooler: RenamingProxy,
                                                                      through: str) -> None:  # fmt: skip
    """``asyncpg.create_pool()``: its statements carry the connection's token (its statement cache
    is on), so 500 owners parse them as often as with tags off; with the cache off
    (``statement_cache_size=0``, a transaction pooler's setting) they carry the owner's name;
    with tags off, nothing."""
    dsn = (_url(pg, session_pooler if through != "direct" else None, "asyncpg")
           .replace("postgresql+asyncpg://", "postgresql://"))  # fmt: skip
    counts, shown = {}, {}
    for name, settings, pool_args in (("off", {"statement_tag": False}, {}), ("on", {}, {}),
                                      ("uncached", {}, {"statement_cache_size": 0})):  # fmt: skip
        telemetry.instrument(service="api", tracing=False, **settings)
        marker = f"m_{uuid.uuid4().hex[:12]}"
        start = _log_end(pg)
        shown[name] = _pool_owners(dsn, marker, **pool_args)
        counts[name] = _parses(pg, start, marker)
        telemetry.uninstrument()
    print(f"Parse messages, asyncpg pool {through}: {counts}")
    assert counts["off"] >= 2 and counts["on"] <= counts["off"] * 1.1, counts
    assert counts["uncached"] >= 2 * OWNERS, counts  # every statement parsed: its tag costs nothing more
    assert [_sqltag.parse(q) for q in shown["off"]] == [{}, {}]
    for query in shown["on"]:
        tag = _sqltag.parse(query)
        assert tag["application"].startswith("api/") and tag["conn"] in ("0", "1") and "owner" not in tag, query
        assert query.count("*/") == 1, query
    for query in shown["uncached"]:
        assert _sqltag.parse(query)["owner"] == "GET /one", query


def test_an_asyncpg_pool_route_behind_the_renaming_pooler_is_named(pg: services.Postgres,
                                                                  session_pooler: RenamingProxy) -> None:  # fmt: skip
    """A FastAPI-style lifespan pool (``asyncpg.create_pool()``) behind a pooler that renames its
    clients: the route holding a connection in a transaction is named by its token; with tags off
    it is not (the renaming pooler leaves nothing else to join on)."""
    import asyncpg

    dsn = session_pooler.url("asyncpg").replace("postgresql+asyncpg://", "postgresql://")

    async def hold(holding: threading.Event, release: threading.Event) -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            with telemetry.db_owner("GET /reports/{rid}"):
                async with pool.acquire() as con, con.transaction():
                    await con.fetchval("select 1")
                    holding.set()
                    while not release.is_set():
                        await asyncio.sleep(0.05)
        finally:
            await pool.close()

    _named_only_with_tags(pg, "api", "GET /reports/{rid}", hold)


def _psycopg_pool_owners(dsn: str, marker: str, prepare: Any) -> list[str]:
    """psycopg_pool's ``AsyncConnectionPool`` (LangGraph's checkpointer's pool): ``OWNERS``
    owners, each running the same two statements (``%s`` parameters) in a transaction; returns
    what the server showed for one statement with and one without parameters."""
    from psycopg_pool import AsyncConnectionPool

    async def go() -> list[str]:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                       kwargs={"prepare_threshold": prepare}) as pool:  # fmt: skip
            for i in range(OWNERS):
                with telemetry.db_owner(f"owner-{i}"):
                    async with pool.connection() as conn, conn.transaction():
                        await conn.execute(f"select %s::int as {marker}", (i,))
                        await conn.execute(f"select %s::int + 1 as {marker}", (i,))
            with telemetry.db_owner("GET /one"):
                async with pool.connection() as conn:
                    own = "select query from pg_stat_activity where pid = pg_backend_pid()"
                    plain = await (await conn.execute(own)).fetchone()
                    bound = await (await conn.execute(own + " and %s", (True,))).fetchone()
            return [plain[0], bound[0]]  # type: ignore[index]

    return asyncio.run(go())


@pytest.mark.parametrize("through", ["direct", "renaming pgbouncer"])
def test_psycopg_pools_statements_are_tagged_without_multiplying_them(pg: services.Postgres, logged: None,
                                                                      session_pooler: RenamingProxy,
                                                                      through: str) -> None:  # fmt: skip
    """psycopg_pool: with psycopg's ``prepare_threshold`` (5 by default; 0: every statement) the
    tags carry the connection's token and 500 owners parse as often as with tags off; with
    ``prepare_threshold=None`` (a transaction pooler's setting) they carry the owner's name, and
    a ``%`` in a tag is doubled where parameters are passed (the statement still runs)."""
    dsn = _url(pg, session_pooler if through != "direct" else None, "psycopg").replace("postgresql+psycopg://",
                                                                                      "postgresql://")  # fmt: skip
    counts, shown = {}, {}
    for name, settings, prepare in (("off", {"statement_tag": False}, 0), ("on", {}, 0), ("default", {}, 5),
                                    ("off-default", {"statement_tag": False}, 5), ("unprepared", {}, None)):  # fmt: skip
        telemetry.instrument(service="api%", tracing=False, **settings)  # a "%" in the service's name
        marker = f"m_{uuid.uuid4().hex[:12]}"
        start = _log_end(pg)
        shown[name] = _psycopg_pool_owners(dsn, marker, prepare)
        counts[name] = _parses(pg, start, marker)
        telemetry.uninstrument()
    print(f"Parse messages, psycopg_pool {through}: {counts}")
    assert counts["off"] >= 2 and counts["on"] <= counts["off"] * 1.1, counts
    assert counts["off-default"] >= 2 and counts["default"] <= counts["off-default"] * 1.1, counts
    assert counts["unprepared"] >= 2 * OWNERS, counts
    assert [_sqltag.parse(q) for q in shown["off"]] == [{}, {}]
    for query in shown["on"] + shown["default"]:
        tag = _sqltag.parse(query)
        assert tag["application"].startswith("api%/") and tag["conn"] in ("0", "1") and "owner" not in tag, query
    for query in shown["unprepared"]:
        assert _sqltag.parse(query)["owner"] == "GET /one", query


@pytest.fixture(scope="module")
def transaction_pooler(pg: services.Postgres) -> Iterator[RenamingProxy]:
    """pgbouncer in transaction mode behind the renaming proxy (Supabase's port 6543)."""
    with services.start_pgbouncer(pg, pool_size=4) as bouncer, RenamingProxy(bouncer.port) as proxy:
        yield proxy


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_a_checkpointer_style_psycopg_pool_behind_the_renaming_pooler_is_named(
    pg: services.Postgres, transaction_pooler: RenamingProxy, session_pooler: RenamingProxy, mode: str
) -> None:
    """LangGraph's ``AsyncPostgresSaver`` pattern: an ``AsyncConnectionPool`` whose connections
    run in autocommit, a "put" holding one. Behind a renaming pooler in transaction mode
    (``prepare_threshold=None``, as it must be there) its tags carry the owner's name; in session
    mode (psycopg's default threshold) its token. Either way the server view names the owner; with
    tags off, nobody is named."""
    from psycopg_pool import AsyncConnectionPool

    proxy, prepare = (transaction_pooler, None) if mode == "transaction" else (session_pooler, 5)
    dsn = proxy.url().replace("postgresql+psycopg://", "postgresql://")

    async def put(holding: threading.Event, release: threading.Event) -> None:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False,
                                       kwargs={"autocommit": True, "prepare_threshold": prepare}) as pool:  # fmt: skip
            with telemetry.db_owner("checkpointer.aput"):
                async with pool.connection() as conn:
                    await conn.execute("select pg_sleep(0.01)")
                    holding.set()
                    while not release.is_set():  # a long statement on the held connection
                        await conn.execute("select pg_sleep(0.2)")

    _named_only_with_tags(pg, "agent", "checkpointer.aput", put)


def _named_only_with_tags(pg: services.Postgres, service: str, owner: str, hold: Any) -> None:
    """``hold(holding, release)`` (a coroutine, run in a thread of its own) holds a connection
    behind a renaming pooler: with tags on, the server view names ``owner``; with tags off, it is
    not named (the renaming pooler leaves nothing else to join on)."""
    for tags in (True, False):
        telemetry.instrument(service=service, server_view_url=pg.url().replace("+psycopg", ""), tracing=False,
                             shared_view_interval_seconds=0.2, statement_tag=tags)  # fmt: skip
        holding, release = threading.Event(), threading.Event()
        thread = threading.Thread(target=asyncio.run, args=(hold(holding, release),), daemon=True)
        thread.start()
        try:
            assert holding.wait(30)
            if tags:
                assert _wait_for(lambda: (_value(_host(None), "db_server_connections_by_owner", service=service,
                                                 owner=owner) or 0) >= 1, timeout=30)  # fmt: skip
            else:
                assert _wait_for(lambda: (_value(_host(None), "db_server_view_polls_total") or 0) >= 5, timeout=30)
                assert _value(_host(None), "db_server_connections_by_owner", owner=owner) is None
        finally:
            release.set()
            thread.join(30)
        telemetry.uninstrument()
