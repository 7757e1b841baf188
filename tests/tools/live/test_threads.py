"""Thread-pool starvation (issue 33): sync ``def`` routes run in anyio's default thread limiter (40
threads), which admits more concurrent database users than the pool holds. The limiter is a gauge
per process, and diagnose compares it with the pool its threads use; async routes on the same full
pool are not this cause."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest
from sqlalchemy import create_engine, text

import telemetry
from telemetry.tools.live import diagnose
from telemetry.tools.samples import parse

from ... import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("asgi", "sqlalchemy")]


def _run(pg: services.Postgres, sync: bool) -> tuple[list[str], dict[str, Any]]:
    telemetry.instrument(service="api", tracing=False)
    engine = create_engine(pg.url(), pool_size=2, max_overflow=0, pool_timeout=30)
    app = FastAPI()
    release = threading.Event()

    def work() -> None:
        with telemetry.db_owner("GET /reports/{rid}"), engine.connect() as conn:
            conn.execute(text("select 1"))
            release.wait(30)

    if sync:
        @app.get("/reports/{rid}")
        def report(rid: int) -> dict:
            work()
            return {"rid": rid}
    else:
        @app.get("/reports/{rid}")
        async def report(rid: int) -> dict:
            await asyncio.to_thread(work)  # the same holds, from async code: no anyio thread
            return {"rid": rid}

    def loaded() -> bool:
        now = hostview.host(None)
        return (hostview.value(now, "db_pool_pending_requests") or 0) >= 2 and (
            hostview.value(now, "db_pool_connections_in_use") or 0) >= 2  # fmt: skip

    async def main() -> tuple[list[str], dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            calls = [asyncio.create_task(client.get(f"/reports/{i}")) for i in range(6)]
            assert await asyncio.to_thread(hostview.wait_for, loaded, 30)
            now = hostview.host(None)
            seen = {k: hostview.value(now, f"asyncio_thread_limiter_{k}") for k in ("tokens", "borrowed", "waiting")}
            found = diagnose.findings(parse(generate_latest().decode()))
            release.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*calls))
        return found, seen

    try:
        return asyncio.run(main())
    finally:
        release.set()
        engine.dispose()


def test_sync_routes_admitted_beyond_the_pool_are_named(pg: services.Postgres) -> None:
    found, seen = _run(pg, sync=True)
    assert seen["tokens"] == 40 and seen["borrowed"] == 6, seen  # anyio's default: 40 threads
    threads = [f for f in found if f.startswith("Thread pool: in the busiest api process")]
    assert threads, found
    assert "6 threads of anyio's limiter (40 per process)" in threads[0] and "a pool of 2 connections" in threads[0]
    assert "up to 4 threads waited for a connection" in threads[0] and ".total_tokens = 2" in threads[0], threads


def test_async_routes_on_a_full_pool_are_not_thread_starvation(pg: services.Postgres) -> None:
    found, seen = _run(pg, sync=False)
    assert seen["borrowed"] == 0, seen
    assert any(f.startswith("Pool: the busiest api") for f in found), found
    assert not [f for f in found if f.startswith("Thread pool")], found
