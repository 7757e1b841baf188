"""redis-py pools on a real Redis: a status stream's subscriptions hold the pool's connections and
its publishers time out, counted exactly and the stream's route named as holder (also while it
still holds); "too many connections"; a server that is down; sync and asyncio pools alike."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

import telemetry
from telemetry.testing import capture_events

from .. import hostview, services
from ..conftest import sample

pytestmark = [pytest.mark.integration, pytest.mark.matrix("redis")]


async def test_streams_holding_subscriptions_starve_the_publishers(redis_server):
    """3 status streams subscribe through the app's shared BlockingConnectionPool(3, timeout 1 s)
    and keep their connection for the stream's life; 5 publishes meanwhile all time out. The
    timeouts are counted exactly, the streams' route holds the connections (reported while
    held), and the publishes after the streams end succeed."""
    telemetry.instrument(service="api", hold_threshold_seconds=0.3)
    pool = aioredis.BlockingConnectionPool.from_url(redis_server.url, max_connections=3, timeout=1)
    client = aioredis.Redis(connection_pool=pool)
    name = f"127.0.0.1:{redis_server.port}/0"
    app = FastAPI()
    subscribed = asyncio.Event()
    streams_open = [0]

    @app.get("/tasks/{task_id}/stream")
    async def stream(task_id: str) -> StreamingResponse:
        async def events():  # type: ignore[no-untyped-def]
            pubsub = client.pubsub()
            await pubsub.subscribe(f"task:{task_id}")
            streams_open[0] += 1
            if streams_open[0] == 3:
                subscribed.set()
            try:
                for _ in range(30):  # 3 s of status updates: longer than the publishers wait
                    await pubsub.get_message(timeout=0.1)
                    yield b"data: tick\n\n"
            finally:
                await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.close()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/publish")
    async def publish() -> dict:
        try:
            await client.publish("task:1", "done")
        except redis.exceptions.ConnectionError as exc:
            return {"error": str(exc)}
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as http:
        async def publisher() -> list:
            await subscribed.wait()
            with capture_events("redis_connection_held_too_long") as held:
                await asyncio.sleep(0.5)
                telemetry.scan_now()  # the watchdog reports the streams while they still hold
            results = await asyncio.gather(*(http.post("/publish") for _ in range(5)))
            return [held, [r.json() for r in results]]

        outcome = await asyncio.gather(*(http.get(f"/tasks/{i}/stream") for i in range(3)), publisher())
        held_events, published = outcome[-1]
        assert all(r.status_code == 200 for r in outcome[:3])
    assert published == [{"error": "No connection available."}] * 5
    assert sample("redis_pool_checkouts_total", pool=name, result="timeout") == 5
    assert sample("redis_pool_connections_max", pool=name) == 3
    assert {e["owner"] for e in held_events if e["status"] == "held"} == {"GET /tasks/{task_id}/stream"}
    assert len([e for e in held_events if e["status"] == "held"]) == 3
    assert sample("redis_connection_hold_seconds_count", pool=name, owner="GET /tasks/{task_id}/stream") == 3
    assert sample("redis_connection_hold_seconds_sum", pool=name, owner="GET /tasks/{task_id}/stream") >= 3 * 1.0
    assert sample("redis_pool_connections_in_use", pool=name) == 0
    # the diagnosis from this process's /metrics names the pool, the failures and the holder
    from prometheus_client import REGISTRY, generate_latest

    from telemetry.tools.demo import report
    from telemetry.tools.live import diagnose

    found = [f for f in diagnose.findings(report.parse(generate_latest(REGISTRY).decode())) if f.startswith("Redis:")]
    assert len(found) == 1, found
    assert f"pool {name} of api" in found[0] and "5 checkouts failed" in found[0]
    assert "'GET /tasks/{task_id}/stream' holds" in found[0]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post("/publish")).json() == {"ok": True}
    await pool.disconnect()


def test_sync_pool_too_many_connections_and_owner(redis_server):
    telemetry.instrument(service="worker")
    pool = redis.ConnectionPool.from_url(redis_server.url, max_connections=1)
    client = redis.Redis(connection_pool=pool)
    name = f"127.0.0.1:{redis_server.port}/0"
    with telemetry.db_owner("resume-step"):
        assert client.ping()
        pubsub = client.pubsub()
        pubsub.subscribe("ch")  # holds the only connection
        assert sample("redis_pool_connections_in_use", pool=name) == 1
        with pytest.raises(redis.exceptions.ConnectionError, match="Too many connections"):
            client.ping()
        pubsub.close()
    assert sample("redis_pool_checkouts_total", pool=name, result="too_many") == 1
    assert sample("redis_pool_checkouts_total", pool=name, result="ok") == 2
    assert sample("redis_connection_hold_seconds_count", pool=name, owner="resume-step") == 2
    assert sample("redis_pool_connections_in_use", pool=name) == 0
    pool.disconnect()


def test_a_server_that_is_down_is_counted_and_the_error_reaches_the_caller_unchanged():
    telemetry.instrument(service="worker")
    port = services.free_port()  # nothing listens there
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    name = f"127.0.0.1:{port}/0"
    assert sample("redis_pool_checkouts_total", pool=name, result="error") >= 1
    assert sample("redis_pool_connections_in_use", pool=name) == 0
    try:
        hook_errors = sample("telemetry_hook_errors_total")
    except KeyError:  # none was ever counted
        hook_errors = 0
    assert hook_errors == 0


def test_password_never_in_the_pool_name(redis_server):
    telemetry.instrument(service="worker")
    pool = redis.ConnectionPool.from_url(f"redis://:s3cr3t-pw@127.0.0.1:{redis_server.port}/2")
    from telemetry.integrations import redis as _redis

    assert _redis.pool_name(pool) == f"127.0.0.1:{redis_server.port}/2"


def test_two_pools_on_one_address_each_have_their_own_series(redis_server):
    """An exhausted BlockingConnectionPool(2) beside an idle ConnectionPool(50) on the same
    host:port/db: each pool is its own series, so the small one reads 100% and its timeout is
    its own (they shared one series, the limit of the last pool: 2 of 50)."""
    telemetry.instrument(service="api")
    small = redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=2, timeout=0.2)
    large = redis.ConnectionPool.from_url(redis_server.url, max_connections=50)
    address = f"127.0.0.1:{redis_server.port}/0"
    assert redis.Redis(connection_pool=large).ping()
    def checkout():  # type: ignore[no-untyped-def]
        try:
            return small.get_connection()
        except TypeError:  # redis-py before 5.3 wants the command name
            return small.get_connection("PING")

    held = [checkout() for _ in range(2)]
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        checkout()
    assert sample("redis_pool_connections_in_use", pool=f"{address}#2") == 2
    assert sample("redis_pool_connections_max", pool=f"{address}#2") == 2
    assert sample("redis_pool_checkouts_total", pool=f"{address}#2", result="timeout") == 1
    assert sample("redis_pool_connections_in_use", pool=address) == 0
    assert sample("redis_pool_connections_max", pool=address) == 50
    assert sample("redis_pool_checkouts_total", pool=address, result="timeout") == 0
    for connection in held:
        small.release(connection)
    small.disconnect()
    large.disconnect()


def test_pool_names_are_bounded(redis_server):
    """A pool per request (same class and limit) shares one series; 10,000 distinct addresses
    give at most MAX_POOLS names, the rest folded into "other"."""
    from telemetry.integrations import redis as _redis

    telemetry.instrument(service="api")
    for _ in range(10_000):  # created and dropped one after another: one name
        _redis._state(redis.ConnectionPool(host="127.0.0.1", port=redis_server.port))
    assert set(_redis.states()) == {f"127.0.0.1:{redis_server.port}/0"}
    for i in range(10_000):
        _redis._state(redis.ConnectionPool(host=f"10.0.{i // 250}.{i % 250}", port=6379))
    names = set(_redis.states())
    assert len(names) == _redis.MAX_POOLS + 1 and _redis.OTHER in names
    assert _redis.states()[_redis.OTHER].max_connections is None  # shared: no one pool's limit


# kombu's Connection.release() takes a fresh Redis connection while closing its channel and leaves
# it to the garbage collector: Python 3.13 reports that socket (kombu's, not ours)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_celerys_own_long_lived_connections_are_named_and_never_flagged(redis_server):
    """kombu's broker channel and the result backend's pub/sub keep their connections by design:
    after send_task() they are held with owners "celery-broker" / "celery-result-backend" (not
    the enqueuing route), counted in use, and never reported as held too long; the app's own
    long hold beside them is."""
    from celery import Celery

    from telemetry.integrations import redis as _redis

    base = redis_server.url.rsplit("/", 1)[0]
    telemetry.instrument(service="api", hold_threshold_seconds=0.3)
    app = Celery("t24", broker=f"{base}/0", backend=f"{base}/1")
    own = redis.ConnectionPool.from_url(f"{base}/2")
    import kombu

    consumer = kombu.Connection(f"{base}/0")
    queue = consumer.SimpleQueue("q24-consume")

    def consume() -> None:  # what a worker's consumer does: BRPOP on its channel's connection
        with contextlib.suppress(queue.Empty):
            queue.get(block=True, timeout=5)

    thread = threading.Thread(target=consume)
    with capture_events("redis_connection_held_too_long") as events:
        with telemetry.db_owner("POST /generate"):
            app.send_task("tests.never_run", queue="q24")  # the result backend subscribes
            kept = own.get_connection() if not _needs_command_name() else own.get_connection("PING")
        thread.start()

        def owners() -> set[str]:
            return {h.owner for h in list(_redis._held.values())}

        assert hostview.wait_for(lambda: {"celery-broker", "celery-result-backend", "POST /generate"} <= owners()), owners()
        _redis.scan_long_holds(now=time.perf_counter() + 60)  # a scan a minute later
    with kombu.Connection(f"{base}/0") as producer:  # let the consumer go
        sent = producer.SimpleQueue("q24-consume")
        sent.put({"done": True})
        sent.close()
    thread.join(timeout=30)
    queue.close()
    consumer.release()
    assert [(e["pool"], e["owner"]) for e in events] == [(f"127.0.0.1:{redis_server.port}/2", "POST /generate")]
    for db in ("0", "1"):
        assert sample("redis_pool_connections_in_use", pool=f"127.0.0.1:{redis_server.port}/{db}") >= 1
        assert sample("redis_pool_connections_held_too_long", pool=f"127.0.0.1:{redis_server.port}/{db}") == 0
    own.release(kept)
    own.disconnect()
    app.close()
    app.backend.result_consumer.stop()  # the result backend's pub/sub connection
    app.backend.client.connection_pool.disconnect()
    with redis.Redis.from_url(f"{base}/0") as cleanup:
        cleanup.delete("q24")


def _needs_command_name() -> bool:
    import inspect

    parameters = inspect.signature(redis.ConnectionPool.get_connection).parameters
    command = parameters.get("command_name")
    return command is not None and command.default is inspect.Parameter.empty
