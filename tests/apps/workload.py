"""A process that exercises every metric family the package exports, continuously, and serves
/metrics for a real Prometheus: ``python -m tests.apps.workload PORT SECONDS``.

Real parts only: SQLite pools (one starved into timeouts, one pointing at a closed port for
connect errors), a FastAPI app driven through ASGI, a Celery worker thread on Redis (so tasks are published and carry the queue-wait header), an event loop that is
blocked now and then, a semaphore with waiters. With ``WORKLOAD_PG_URL`` (and pgbouncer's),
the shared side too: a pooler kept full by two transactions, one client queued behind them, a
row lock with a waiter, transactions idle in transaction.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time

import telemetry

PORT, SECONDS = int(sys.argv[1]), float(sys.argv[2])
telemetry.instrument(service="api", loop_blocked_seconds=0.3, hold_threshold_seconds=0.5, connection_limit=50,
                     server_view_url=os.environ.get("WORKLOAD_SERVER_VIEW_URL"),
                     pgbouncer_url=os.environ.get("WORKLOAD_PGBOUNCER_ADMIN_URL"))
telemetry.start_metrics_server(PORT)

import httpx  # noqa: E402
from celery import Celery  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402
from fastapi import FastAPI, HTTPException  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool  # noqa: E402

tmp = tempfile.mkdtemp()
sync_engine = create_engine(f"sqlite:///{tmp}/a.db", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.05)
broken = create_engine("postgresql+psycopg://x@127.0.0.1:1/none", pool_size=1, max_overflow=0)
async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp}/b.db", poolclass=AsyncAdaptedQueuePool, pool_size=2, max_overflow=1)
deadline = time.monotonic() + SECONDS

app = FastAPI()


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict:
    async with async_engine.connect() as conn:
        await conn.execute(text("select 1"))
    if item_id % 7 == 0:
        raise HTTPException(503)
    return {"id": item_id}


async def loop_work() -> None:
    sem = telemetry.Semaphore(2, name="MAX_DB_CONCURRENT")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        i = 0
        while time.monotonic() < deadline:
            i += 1

            async def save(n: int) -> None:
                async with sem:
                    with telemetry.db_owner("save-concept"):
                        async with async_engine.connect() as conn:
                            await conn.execute(text("select 1"))
                            await asyncio.sleep(0.02)

            await asyncio.gather(*(save(n) for n in range(5)), client.get(f"/items/{i}"), client.get("/nope"))
            if i % 25 == 0:
                time.sleep(0.4)  # blocks the loop
            await asyncio.sleep(0.01)


def sync_work() -> None:
    while time.monotonic() < deadline:
        with telemetry.db_owner("resume-step"), sync_engine.connect() as conn:
            conn.execute(text("select 1"))
            try:
                with sync_engine.connect():  # the only connection is held: times out
                    pass
            except Exception:
                pass
        try:
            with broken.connect():
                pass
        except Exception:
            pass
        time.sleep(0.05)


# the broker on Redis (db 2): the backlog poller reads its queue lengths
celery = Celery("workload", broker=os.environ["WORKLOAD_REDIS_URL"].rsplit("/", 1)[0] + "/2", backend="cache+memory://")
celery.conf.task_default_queue = "content"


@celery.task(name="generate_content")
def generate_content(n: int) -> int:
    if n % 5 == 0:
        raise ValueError("bad concept")
    with sync_engine.connect():
        pass
    return n


def redis_work() -> None:
    """A subscription holds one of two connections (a status stream); two command threads
    share the other, so some checkouts wait and time out; a 1-connection pool overflows."""
    import redis

    url = os.environ["WORKLOAD_REDIS_URL"]
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=2, timeout=0.05)
    client = redis.Redis(connection_pool=pool)
    with telemetry.db_owner("GET /tasks/{task_id}/stream"):
        pubsub = client.pubsub()
        pubsub.subscribe("status")

    def commands() -> None:
        with telemetry.db_owner("POST /publish"):
            while time.monotonic() < deadline:
                try:
                    with client.pipeline() as pipe:  # holds its connection for the whole batch
                        pipe.publish("status", "x").execute()
                        time.sleep(0.08)
                except redis.exceptions.ConnectionError:
                    pass

    for _ in range(2):
        threading.Thread(target=commands, daemon=True).start()
    tiny = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url.replace("/0", "/1"), max_connections=1))
    while time.monotonic() < deadline:
        held = tiny.pubsub()
        held.subscribe("tiny")
        try:
            tiny.ping()
        except redis.exceptions.ConnectionError:  # "Too many connections"
            pass
        held.close()
        time.sleep(0.2)


def shared_work() -> None:
    """Through a pgbouncer with pool_size 2: two "content_task" transactions hold both server
    connections (one holds a row lock; both sit idle in transaction), one client queues in the
    pooler behind them, and a direct connection waits for the row lock."""
    direct = create_engine(os.environ["WORKLOAD_PG_URL"], pool_size=2, max_overflow=0)
    pooled = create_engine(os.environ["WORKLOAD_PGBOUNCER_URL"], pool_size=3, max_overflow=0)
    with direct.begin() as conn:
        conn.execute(text("create table if not exists wl_item (id int primary key, n int)"))
        conn.execute(text("insert into wl_item values (1, 0) on conflict do nothing"))
    with pooled.connect():  # the dialect's first connect, before the pooler is full
        pass
    holding = threading.Barrier(3)

    def hold(statement: str) -> None:
        with telemetry.db_owner("content_task"), pooled.begin() as conn:
            conn.execute(text(statement))
            holding.wait()
            while time.monotonic() < deadline:
                time.sleep(0.1)

    def queued() -> None:
        with telemetry.db_owner("GET /items/{item_id}"), pooled.connect() as conn:
            conn.execute(text("select 1"))

    def blocked() -> None:
        with telemetry.db_owner("PUT /items/{item_id}"), direct.begin() as conn:
            conn.execute(text("update wl_item set n = n + 1 where id = 1"))

    for statement in ("select n from wl_item where id = 1 for update", "select 1"):
        threading.Thread(target=hold, args=(statement,), daemon=True).start()
    holding.wait()
    for target in (queued, blocked):
        threading.Thread(target=target, daemon=True).start()


stream_engine = create_engine(f"sqlite:///{tmp}/s.db", poolclass=QueuePool, pool_size=3, max_overflow=0)


def stream_work() -> None:
    """Three streams keep their sessions for the whole run: no hold of theirs ever ends, so only
    what is held now names them (over Prometheus too)."""
    with telemetry.db_owner("GET /items/{item_id}/stream"), stream_engine.connect() as conn:
        conn.execute(text("select 1"))
        while time.monotonic() < deadline:
            time.sleep(0.2)


def main() -> None:
    for _ in range(3):
        threading.Thread(target=stream_work, daemon=True).start()
    threading.Thread(target=sync_work, daemon=True).start()
    threading.Thread(target=redis_work, daemon=True).start()
    if os.environ.get("WORKLOAD_PG_URL"):
        threading.Thread(target=shared_work, daemon=True).start()
    with start_worker(celery, pool="solo", perform_ping_check=False, shutdown_timeout=5):
        t = threading.Thread(target=lambda: asyncio.run(loop_work()), daemon=True)
        t.start()
        n = 0
        while time.monotonic() < deadline:
            n += 1
            generate_content.apply_async((n,), countdown=0)
            time.sleep(0.1)
        t.join()
    print("done", flush=True)
    os._exit(0)


main()
