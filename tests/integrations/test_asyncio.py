"""telemetry.Semaphore exports exact capacity/in-use/waiters/wait counts; the loop monitor names
the line that blocks the loop; the ASGI middleware splits pool wait from the rest exactly."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

import telemetry
from telemetry.integrations import asyncio as _asyncio

from ..conftest import sample

pytestmark = pytest.mark.matrix("asyncio")


def _blocks_counted() -> float:
    """``event_loop_blocked_total`` as counted now, read from the counters without rendering every
    series: that rendering is sync work inside the loop, and on a loaded machine it takes long
    enough to be a block of its own (a CI run counted one of 0.875 s at the read)."""
    return sum(v for (name, _labels), v in list(_asyncio.STATS.counters.items()) if name == "event_loop_blocked_total")


async def test_semaphore_numbers_are_exact():
    telemetry.instrument(service="worker")
    sem = telemetry.Semaphore(3, name="MAX_DB_CONCURRENT")
    release = asyncio.Event()
    observed = {}

    async def hold() -> None:
        async with sem:
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(10)]
    await asyncio.sleep(0.05)
    for name in ("capacity", "in_use", "waiters"):
        observed[name] = sample(f"asyncio_semaphore_{name}", semaphore="MAX_DB_CONCURRENT")
    release.set()
    await asyncio.gather(*tasks)
    assert observed == {"capacity": 3, "in_use": 3, "waiters": 7}
    assert sample("asyncio_semaphore_in_use", semaphore="MAX_DB_CONCURRENT") == 0
    assert sample("asyncio_semaphore_waiters", semaphore="MAX_DB_CONCURRENT") == 0
    assert sample("asyncio_semaphore_wait_seconds_count", semaphore="MAX_DB_CONCURRENT") == 10
    # 3 got a permit at once (wait 0); 7 waited at least the 50 ms the holders slept
    assert sample("asyncio_semaphore_wait_seconds_bucket", semaphore="MAX_DB_CONCURRENT", le="0.0005") == 3
    assert sample("asyncio_semaphore_wait_seconds_sum", semaphore="MAX_DB_CONCURRENT") >= 7 * 0.04


def test_semaphore_rejects_bad_arguments():
    with pytest.raises(ValueError, match="expected a whole number >= 1"):
        telemetry.Semaphore(0, name="x")
    with pytest.raises(ValueError, match="non-empty string"):
        telemetry.Semaphore(2, name="")


async def test_blocked_loop_names_the_blocking_line():
    telemetry.instrument(service="api", loop_blocked_seconds=0.2)
    telemetry.watch_event_loop()
    await asyncio.sleep(0.15)  # a few healthy beats
    before = _blocks_counted()
    with capture_logs() as logs:
        time.sleep(0.6)  # sync work inside async def: the line to find
        await asyncio.sleep(0.2)
        counted = _blocks_counted() - before
    blocked = [e for e in logs if e["event"] == "event_loop_blocked"]
    assert [e["status"] for e in blocked] == ["blocked", "resumed"]
    assert "test_asyncio.py" in blocked[0]["call_site"] and "test_blocked_loop" in blocked[0]["call_site"]
    assert blocked[1]["blocked_seconds"] >= 0.5
    assert counted == 1 and sample("event_loop_blocked_total") >= 1  # and exported
    assert sample("event_loop_lag_seconds_count") >= 3
    assert sample("event_loop_lag_seconds_bucket", le="0.25") < sample("event_loop_lag_seconds_count")


async def test_a_block_that_ends_between_two_watchdog_ticks_is_reported_by_the_late_beat():
    """A block just over the threshold can end before the watchdog's next tick (a busy machine
    delays it); the beat that comes late reports it: counted once, blocked then resumed."""
    telemetry.instrument(service="api", loop_blocked_seconds=0.2)
    telemetry.watch_event_loop()
    await asyncio.sleep(0.15)  # a few healthy beats
    before = _blocks_counted()
    with capture_logs() as logs, _asyncio._monitored_lock:  # the watchdog cannot look meanwhile
        time.sleep(0.5)
        await asyncio.sleep(0.15)  # the late beat runs here
        counted = _blocks_counted() - before
    blocked = [e for e in logs if e["event"] == "event_loop_blocked"]
    assert [e["status"] for e in blocked] == ["blocked", "resumed"]
    assert blocked[0]["blocked_seconds"] >= 0.4 and blocked[0]["task"] is None  # nothing sampled
    assert counted == 1 and sample("event_loop_blocked_total") >= 1  # and exported


def test_a_loop_standing_stopped_between_two_runs_is_neither_lagging_nor_blocked():
    """One loop, run_until_complete() once per job with sync work between (older Celery code):
    the time it stands stopped is no lag and no block; a block inside a run still is one."""
    telemetry.instrument(service="worker", loop_blocked_seconds=0.2)
    loop = asyncio.new_event_loop()
    try:
        with capture_logs() as logs:
            loop.run_until_complete(asyncio.sleep(0.15))
            time.sleep(0.6)  # the loop stands stopped; its beat is overdue when it runs again
            loop.run_until_complete(asyncio.sleep(0.15))
            assert [e for e in logs if e["event"] == "event_loop_blocked"] == []
            assert sample("event_loop_lag_seconds_bucket", le="0.25") == sample("event_loop_lag_seconds_count") >= 2

            async def blocks() -> None:
                await asyncio.sleep(0)
                time.sleep(0.6)  # a real block, in the third run
                await asyncio.sleep(0.15)

            loop.run_until_complete(blocks())
        assert [e["status"] for e in logs if e["event"] == "event_loop_blocked"] == ["blocked", "resumed"]
        assert sample("event_loop_blocked_total") == 1
    finally:
        loop.close()


async def test_blocked_loop_names_the_trace_of_the_request_that_blocks_it():
    """With tracing on, the event carries the trace id of the request whose handler blocks the
    loop, also after the handler served a request of its own in the same task (an in-process
    ASGI call); the request's entry in the task map goes when the request ends (no growth)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    telemetry.instrument(service="api", loop_blocked_seconds=0.2, tracing=True)
    exporter = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()

    @app.get("/reports/{report_id}")
    async def report(report_id: int) -> dict:
        inner = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        async with inner:  # runs in this task: its request ends before ours
            assert (await inner.get("/ok")).status_code == 200
        time.sleep(0.6)  # sync work inside async def
        return {"id": report_id}

    @app.get("/ok")
    async def ok() -> dict:
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/ok")).status_code == 200  # the loop is watched from here on
        await asyncio.sleep(0.15)
        with capture_logs() as logs:
            assert (await client.get("/reports/3")).status_code == 200
            await asyncio.sleep(0.2)
        assert not _asyncio.TASK_SPANS, "a finished request left its task in the map"
    blocked = [e for e in logs if e["event"] == "event_loop_blocked" and e["status"] == "blocked"]
    assert len(blocked) == 1, logs
    spans = [s for s in exporter.get_finished_spans() if s.name == "GET /reports/{report_id}"]
    assert len(spans) == 1
    assert blocked[0]["trace_id"] == format(spans[0].context.trace_id, "032x")
    assert blocked[0]["span_id"] == format(spans[0].context.span_id, "016x")


@pytest.mark.integration
async def test_asgi_pool_wait_split_and_route_templates(pg):
    """With a 1-connection pool held by a hog, a request's pool wait is the time it queued, and
    the route label is the template."""
    telemetry.instrument(service="api")
    engine = create_async_engine(pg.url("asyncpg"), pool_size=1, max_overflow=0)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
        return {"id": item_id}

    async def hog() -> None:
        async with engine.connect():
            await asyncio.sleep(0.3)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        hogging = asyncio.create_task(hog())
        await asyncio.sleep(0.05)
        r = await client.get("/items/42")
        await hogging
        assert r.status_code == 200
        assert (await client.get("/nope/1")).status_code == 404
    labels = {"route": "/items/{item_id}", "method": "GET"}
    assert sample("http_server_request_duration_seconds_count", status="200", **labels) == 1
    assert sample("http_server_request_duration_seconds_count", route="unmatched", status="404") == 1
    waited = sample("http_server_pool_wait_seconds_sum", **labels)
    total = sample("http_server_request_duration_seconds_sum", **labels)
    assert 0.2 <= waited <= total  # queued behind the hog for most of the request
    assert sample("http_server_pool_hold_seconds_count", **labels) == 1
    assert sample("db_connection_hold_seconds_count", owner="GET /items/{item_id}") == 1
    assert sample("http_server_requests_in_flight", **labels) == 0
    await engine.dispose()


async def test_capacity_follows_live_semaphores_and_survives_a_reset():
    import gc

    telemetry.instrument(service="worker")
    a = telemetry.Semaphore(3, name="S")
    b = telemetry.Semaphore(2, name="S")
    assert sample("asyncio_semaphore_capacity", semaphore="S") == 5
    del b
    gc.collect()
    assert sample("asyncio_semaphore_capacity", semaphore="S") == 3
    telemetry.uninstrument()  # resets the gauges: a later collection of `a` must not go negative
    telemetry.instrument(service="worker")
    del a
    gc.collect()
    with pytest.raises(KeyError):
        sample("asyncio_semaphore_capacity", semaphore="S")


@pytest.mark.parametrize("state", ["instrumented", "never-instrumented", "uninstrumented"])
def test_thousands_of_asyncio_run_leave_no_loop_behind(tmp_path, state):
    """The report's content-task pattern, asyncio.run() per task, with an async engine and a
    telemetry.Semaphore: after 2,000 runs no closed loop is still referenced, the watchdog
    tracks none, and traced memory stays bounded; also when the semaphore is used without
    instrument() (a script, a unit test) or after uninstrument() (it kept every loop)."""
    import gc
    import tracemalloc

    from sqlalchemy.pool import NullPool

    if state != "never-instrumented":
        telemetry.instrument(service="worker")
    if state == "uninstrumented":
        telemetry.uninstrument()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite", poolclass=NullPool)
    sem = telemetry.Semaphore(3, name="MAX_DB_CONCURRENT")

    async def task() -> None:
        async with sem:
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))

    def loops_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop))

    for _ in range(50):  # warm-up: imports, caches
        asyncio.run(task())
    before_loops = loops_alive()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        asyncio.run(task())
    telemetry.scan_now()  # a watchdog tick prunes the finished loops
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert loops_alive() <= before_loops
    from telemetry.integrations import asyncio as _asyncio

    assert _asyncio.watched_loops() <= 1
    assert grown < 1_000_000, f"{grown} bytes kept after 2,000 asyncio.run()"
    if state == "instrumented":
        assert sample("asyncio_semaphore_in_use", semaphore="MAX_DB_CONCURRENT") == 0


MODULE_SEMAPHORE = telemetry.Semaphore(2, name="IMPORT_TIME")  # before any instrument()


async def test_semaphore_created_at_import_takes_the_service_name():
    """module-level ``Semaphore(...)`` exists before instrument(): its series carry the service
    that instrument() names, not "unknown"."""
    telemetry.instrument(service="content-worker")
    async with MODULE_SEMAPHORE:
        assert sample("asyncio_semaphore_in_use", semaphore="IMPORT_TIME", service="content-worker") == 1
    assert sample("asyncio_semaphore_capacity", semaphore="IMPORT_TIME", service="content-worker") == 2
    with pytest.raises(KeyError):
        sample("asyncio_semaphore_capacity", semaphore="IMPORT_TIME", service="unknown")


async def test_release_without_acquire_never_goes_negative():
    telemetry.instrument(service="worker")
    sem = telemetry.Semaphore(2, name="unbalanced")
    sem.release()  # allowed by asyncio.Semaphore; no permit of ours was taken
    assert sample("asyncio_semaphore_in_use", semaphore="unbalanced") == 0
    async with sem:
        assert sample("asyncio_semaphore_in_use", semaphore="unbalanced") == 1
    assert sample("asyncio_semaphore_in_use", semaphore="unbalanced") == 0


def test_a_loop_that_blocks_before_touching_anything_is_watched():
    """asyncio.run() of code that blocks at once, before any database or request: reported, with
    the blocking line seen in most of the samples taken during the episode."""
    telemetry.instrument(service="worker", loop_blocked_seconds=0.2)

    async def blocks_first() -> None:
        time.sleep(0.8)  # the line to find
        await asyncio.sleep(0.15)

    with capture_logs() as logs:
        asyncio.run(blocks_first())
    blocked = [e for e in logs if e["event"] == "event_loop_blocked"]
    assert [e["status"] for e in blocked] == ["blocked", "resumed"]
    assert "in blocks_first" in blocked[0]["call_site"]
    assert blocked[0]["samples"] >= 2 and blocked[0]["call_site_samples"] == blocked[0]["samples"]
    assert blocked[1]["samples"] > blocked[0]["samples"]  # sampling went on until it resumed
    assert "in blocks_first" in blocked[1]["call_site"]
