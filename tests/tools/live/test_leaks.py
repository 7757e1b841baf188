"""Leaked connections (issue 33): a route or task that returns without closing its session keeps
its connection after it ended. The ASGI and Celery integrations mark the end; the housekeeper
counts what is still checked out then, SQLAlchemy's garbage-collection return is counted where it
happens, and from an owner's second leak on the line that checked it out is named. Neighbours: a
stream that holds its session while it streams, and routes that close theirs, are no leak."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

import telemetry
from telemetry.tools.live import diagnose
from telemetry.tools.samples import parse

from ... import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("asgi", "sqlalchemy", "celery")]


def _count(name: str, **labels: str) -> float:
    return hostview.value(hostview.host(None), name, **labels) or 0.0


def _leaked(owner: str) -> float:
    return _count("db_pool_connections_leaked_total", owner=owner)


def _gets(app: FastAPI, *paths: str) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [await client.get(p) for p in paths]

    return asyncio.run(main())


@pytest.fixture
def kept() -> Iterator[list[Any]]:
    """The sessions a route forgot: closed after the test."""
    sessions: list[Any] = []
    yield sessions
    for s in sessions:
        s.close()


def test_a_route_that_returns_without_closing_its_session_is_named_with_its_line(
    pg: services.Postgres, kept: list[Any]
) -> None:
    telemetry.instrument(service="api", tracing=False)
    engine = create_engine(pg.url(), pool_size=3, max_overflow=0, pool_timeout=30)
    app = FastAPI()

    @app.get("/orders/{oid}")
    def order(oid: int) -> dict:
        session = Session(engine)
        session.execute(text("select 1"))  # the checkout: the line a leak names
        if oid > 0:
            kept.append(session)  # an early return that forgets the session
            return {"oid": oid}
        session.close()
        return {"oid": oid}

    with capture_logs() as logs:
        assert [r.status_code for r in _gets(app, "/orders/0", "/orders/1")] == [200, 200]
        assert hostview.wait_for(lambda: _leaked("GET /orders/{oid}") >= 1, timeout=20)
        assert _gets(app, "/orders/2")[0].status_code == 200
        assert hostview.wait_for(lambda: _leaked("GET /orders/{oid}") >= 2, timeout=20)
    page = parse(generate_latest().decode())
    for session in kept:
        session.close()
    kept.clear()
    engine.dispose()
    sites = {lb["call_site"] for n, lb, v in page if n == "db_pool_connections_leaked_total" and v > 0}
    assert "unknown" in sites and any("test_leaks.py" in s and "in order" in s for s in sites), sites
    events = [e for e in logs if e["event"] == "db_connection_leaked"]
    assert events and events[0]["owner"] == "GET /orders/{oid}" and events[0]["after_end_seconds"] >= 1.0, events
    found = diagnose.all_findings(page)
    leak = [f for f in found if f.kind == "leak"]
    assert len(leak) == 1 and leak[0].service == "api", found
    assert leak[0].text.startswith("Leaked connections: 2 of api's connections were still checked out after the "
                                   "request or task that took them had ended ('GET /orders/{oid}' 2, checked out at "), leak  # fmt: skip
    assert "test_leaks.py" in leak[0].text and "Close the session on every path" in leak[0].text, leak
    assert "garbage collector, never closed" not in leak[0].text  # nothing was collected


def test_a_session_only_the_garbage_collector_returns_is_counted(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    engine = create_engine(pg.url(), pool_size=3, max_overflow=0, pool_timeout=30)
    app = FastAPI()

    @app.get("/cycle")
    def cycle() -> dict:
        session = Session(engine)
        session.execute(text("select 1"))
        knot: list[Any] = [session]
        knot.append(knot)  # a reference cycle: only the collector frees the session
        return {}

    gc.disable()
    try:
        assert _gets(app, "/cycle")[0].status_code == 200
        assert hostview.wait_for(lambda: _leaked("GET /cycle") >= 1, timeout=20)
        in_use = hostview.value(hostview.host(None), "db_pool_connections_in_use")
        gc.collect()
    finally:
        gc.enable()
    page = parse(generate_latest().decode())
    after = hostview.value(hostview.host(None), "db_pool_connections_in_use")
    engine.dispose()
    assert (in_use, after) == (1, 0)  # held until the collector ran, returned by it
    assert _count("db_pool_connections_gc_returned_total", owner="GET /cycle") == 1
    leak = [f.text for f in diagnose.all_findings(page) if f.kind == "leak"]
    assert leak and "1 were returned only by the garbage collector, never closed by the code ('GET /cycle' 1" in leak[0], leak


def test_an_async_session_left_open_is_named_through_the_greenlet(pg: services.Postgres, kept: list[Any]) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    telemetry.instrument(service="api", tracing=False)
    engine = create_async_engine(pg.url().replace("+psycopg", "+asyncpg"), pool_size=3, max_overflow=0)
    app = FastAPI()

    @app.get("/feeds/{fid}")
    async def feed(fid: int) -> dict:
        session = AsyncSession(engine)
        await session.execute(text("select 1"))  # the line: reached through SQLAlchemy's greenlet
        kept.append(session)
        return {"fid": fid}

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/feeds/1")).status_code == 200
            assert await asyncio.to_thread(hostview.wait_for, lambda: _leaked("GET /feeds/{fid}") >= 1, 20)
            assert (await client.get("/feeds/2")).status_code == 200
            assert await asyncio.to_thread(hostview.wait_for, lambda: _leaked("GET /feeds/{fid}") >= 2, 20)
        for session in kept:
            await session.close()
        kept.clear()
        await engine.dispose()

    asyncio.run(main())
    sites = {dict(lb)["call_site"] for (n, lb) in hostview.host(None) if n == "db_pool_connections_leaked_total"}
    assert any("test_leaks.py" in s and "in feed" in s for s in sites), sites


def test_a_celery_task_that_keeps_its_connection_is_named(pg: services.Postgres, kept: list[Any]) -> None:
    from celery import Celery

    telemetry.instrument(service="worker", tracing=False)
    engine = create_engine(pg.url(), pool_size=3, max_overflow=0, pool_timeout=30)
    app = Celery("leaks", broker="memory://", backend="cache+memory://")

    @app.task(name="reports.export")
    def export() -> int:
        conn = engine.connect()
        conn.execute(text("select 1"))
        kept.append(conn)  # returned, never closed
        return 1

    with telemetry.db_owner("before"):
        assert export.apply().get() == 1
    assert hostview.wait_for(lambda: _leaked("reports.export") >= 1, timeout=20)
    leak = [f.text for f in diagnose.all_findings(parse(generate_latest().decode())) if f.kind == "leak"]
    for conn in kept:
        conn.close()
    kept.clear()
    engine.dispose()
    assert leak and leak[0].startswith("Leaked connections: 1 of worker's connections") and "'reports.export' 1" in leak[0], leak


def test_a_stream_holding_its_session_and_closed_routes_are_no_leak(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    engine = create_engine(pg.url(), pool_size=3, max_overflow=0, pool_timeout=30)
    app = FastAPI()

    @app.get("/items/{iid}/stream")
    async def stream(iid: int) -> StreamingResponse:
        async def body() -> Any:
            with engine.connect() as conn:  # held while the response streams, closed at its end
                for _ in range(3):
                    conn.execute(text("select 1"))
                    yield b"x"
                    await asyncio.sleep(0.6)  # the stream outlasts the leak grace: still no leak

        return StreamingResponse(body())

    @app.get("/items/{iid}")
    def item(iid: int) -> dict:
        with Session(engine) as session:
            session.execute(text("select 1"))
        return {"iid": iid}

    responses = _gets(app, "/items/1/stream", "/items/2", "/items/3")
    assert [r.status_code for r in responses] == [200, 200, 200] and responses[0].content == b"xxx"
    held = _count("db_connection_hold_seconds_count")
    page = parse(generate_latest().decode())
    # a tick of the housekeeper after every request ended: it counts no leak
    assert hostview.wait_for(lambda: _count("db_connection_hold_seconds_count") == held and
                             hostview.value(hostview.host(None), "db_pool_connections_in_use") == 0, timeout=10)  # fmt: skip
    engine.dispose()
    assert _count("db_pool_connections_leaked_total") == 0 and _count("db_pool_connections_gc_returned_total") == 0
    assert not [f for f in diagnose.all_findings(page) if f.kind == "leak"]
