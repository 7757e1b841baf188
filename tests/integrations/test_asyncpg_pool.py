"""asyncpg's own pool (issue 32): the same ``db_pool_*`` series, named ``host:port/db`` (``#2`` for a
second pool on one address, never a password). The app shape: a FastAPI app creating its pool in
its lifespan, served by uvicorn on a loopback port; a report route holding its connection
across a slow step starves the pool, and the holder is named, by diagnose too."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import generate_latest

import telemetry
from telemetry.integrations import asyncpg_pool
from telemetry.tools.live import diagnose
from telemetry.tools.samples import parse

from .. import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("asyncpg_pool")]


def _value(name: str, **labels: str) -> float | None:
    return hostview.value(hostview.host(None), name, **labels)


def _dsn(pg: services.Postgres, password: str = "") -> str:
    auth = f"postgres:{password}@" if password else "postgres@"
    return f"postgresql://{auth}127.0.0.1:{pg.port}/postgres"


def _app(dsn: str, release: threading.Event) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        yield
        await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/reports/{rid}")
    async def report(rid: int, request: Request) -> dict:
        async with request.app.state.pool.acquire() as con:
            await con.fetchval("select 1")
            while not release.is_set():  # the slow step, the connection held across it
                await asyncio.sleep(0.05)
        return {"rid": rid}

    @app.get("/health")
    async def health(request: Request) -> dict:
        return {"ok": await request.app.state.pool.fetchval("select 1")}

    return app


@contextlib.contextmanager
def _served(app: FastAPI) -> Iterator[str]:
    port = services.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        assert hostview.wait_for(lambda: server.started, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_lifespan_pool_starved_by_a_route_is_named_with_its_holder(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    release = threading.Event()
    name = f"127.0.0.1:{pg.port}/postgres"
    with _served(_app(_dsn(pg), release)) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/health").json() == {"ok": 1}
        results: list[int] = []
        calls = [threading.Thread(target=lambda i=i: results.append(client.get(f"/reports/{i}").status_code))
                 for i in range(4)]  # fmt: skip
        for t in calls:
            t.start()
        try:
            assert hostview.wait_for(lambda: (_value("db_pool_pending_requests", pool=name) or 0) >= 2 and
                                     (_value("db_pool_connections_in_use", pool=name) or 0) >= 2, timeout=30)  # fmt: skip
            now = hostview.host(None)
            seen = {k: hostview.value(now, f"db_pool_{k}", pool=name)
                    for k in ("connections_in_use", "connections_idle", "size", "connections_max")}
            found = diagnose.findings(parse(generate_latest().decode()))
        finally:
            release.set()
            for t in calls:
                t.join(30)
    assert results == [200] * 4
    assert seen == {"connections_in_use": 2, "connections_idle": 0, "size": 1, "connections_max": 2}, seen
    pool_line = [f for f in found if f.startswith("Pool: the busiest api process has 100%")]
    assert pool_line and "Held now by 'GET /reports/{rid}' (2)" in pool_line[0], found
    assert _value("db_connection_hold_seconds_count", pool=name, owner="GET /reports/{rid}") == 4
    assert _value("db_connection_hold_seconds_count", pool=name, owner="GET /health") == 1
    assert (_value("db_pool_checkout_wait_seconds_sum", pool=name) or 0) > 0


def test_acquire_timeouts_second_pools_and_no_password(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    secret = "s3cr:t@pw"

    async def main() -> tuple[Any, ...]:
        first = await asyncpg.create_pool(_dsn(pg), min_size=1, max_size=1)
        second = await asyncpg.create_pool(_dsn(pg), min_size=1, max_size=1)
        held = await first.acquire()
        with pytest.raises(asyncio.TimeoutError):
            await first.acquire(timeout=0.2)
        await second.fetchval("select 1")
        names = sorted({dict(lb)["pool"] for (n, lb) in hostview.host(None)
                        if n == "db_pool_checkouts_total" and dict(lb)["pool"].startswith(f"127.0.0.1:{pg.port}/")})  # fmt: skip
        timeouts = _value("db_pool_timeouts_total", pool=names[0])
        await first.release(held)
        await first.close()
        await second.close()
        return names, timeouts

    names, timeouts = asyncio.run(main())
    base = f"127.0.0.1:{pg.port}/postgres"
    assert names == [base, f"{base}#2"] and timeouts == 1
    assert asyncpg_pool.address((f"postgresql://app:{secret}@db.internal:6543/content",), {}) == "db.internal:6543/content"
    assert secret not in generate_latest().decode()


def test_the_holder_is_the_acquiring_task_even_when_the_pool_keeps_another_loop(pg: services.Postgres) -> None:
    """The holder is found through the loop the pool keeps (no asking which loop runs); a pool
    whose loop is not the running one (made outside it) still names the acquiring task."""
    telemetry.instrument(service="api", tracing=False)

    async def acquire_in_a_task(pool: Any) -> tuple[Any, Any]:
        async def step() -> tuple[Any, Any]:
            con = await pool.acquire()
            try:
                held = asyncpg_pool.TABLE.held[con]
                return (held.thread, held.task), (None, asyncio.current_task())
            finally:
                await pool.release(con)

        return await asyncio.create_task(step())

    async def main() -> list[tuple[Any, Any]]:
        pool = await asyncpg.create_pool(_dsn(pg), min_size=1, max_size=1)
        try:
            seen = [await acquire_in_a_task(pool)]
            other, kept = asyncio.new_event_loop(), pool._loop
            pool._loop = other  # as if made outside the loop that now runs it
            try:
                seen.append(await acquire_in_a_task(pool))
            finally:
                pool._loop = kept
                other.close()
            return seen
        finally:
            await pool.close()

    for noted, expected in asyncio.run(main()):
        assert noted == expected and expected[1] is not None
