"""The FastAPI app: POST /generate returns at once; status streams that read Redis only (the
incident report's); ordinary pages. The planted hypotheses (``config``) are marked where they act."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import func, insert, select, update

import telemetry

from . import config
from .db import concepts, create_schema, make_engine, notes, tasks

telemetry.configure_logging("api")
telemetry.instrument(service="api")

engine = make_engine()
redis: Any = None
subscriber: Any = None
if config.REDIS_URL:
    import redis.asyncio as aioredis

    # the app's one shared pool (the report's max_connections: 50, scaled by the demo)
    redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
        config.REDIS_URL, max_connections=config.REDIS_MAX_CONNECTIONS, timeout=config.REDIS_TIMEOUT))  # fmt: skip
    # remedy for the subscription suspect: subscriptions get a pool of their own
    subscriber = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
        config.REDIS_URL, max_connections=500, timeout=config.REDIS_TIMEOUT)) if config.SUBSCRIBE_DEDICATED else redis  # fmt: skip


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await create_schema(engine)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.post("/generate")
async def generate() -> dict:
    task_id = uuid.uuid4().hex
    async with engine.begin() as conn:
        await conn.execute(insert(tasks).values(id=task_id, status="pending", created=time.time()))
    from .tasks import advance_workflow, generate_content

    generate_content.delay(task_id)
    advance_workflow.delay(task_id)
    if redis is not None:
        await redis.set(f"progress:{task_id}", 0)
    return {"task_id": task_id, "status": "pending"}


async def _count(conn: Any, task_id: str) -> int:
    return int((await conn.execute(select(func.count()).select_from(concepts).where(concepts.c.task_id == task_id))).scalar() or 0)


@app.get("/tasks/{task_id}/stream")
async def stream(task_id: str) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        deadline = time.monotonic() + config.STREAM_SECONDS
        if config.STREAM_HOLDS_SESSION:
            # PLANTED (suspect "stream-session"), not the report's code: one database session
            # for the life of the stream
            async with engine.connect() as conn:
                while time.monotonic() < deadline:
                    yield f"data: {await _count(conn, task_id)}\n\n"
                    await asyncio.sleep(0.5)
        elif config.STREAM_SESSION_PER_POLL:
            # the remedy the diagnosis recommends: a short session per poll
            while time.monotonic() < deadline:
                async with engine.connect() as conn:
                    n = await _count(conn, task_id)
                yield f"data: {n}\n\n"
                await asyncio.sleep(0.5)
        elif redis is not None and (config.SUBSCRIBE_ON_SHARED_POOL or config.SUBSCRIBE_DEDICATED):
            # PLANTED (suspect "redis-subscriptions"): the subscription keeps a connection of
            # the pool it comes from for the life of the stream
            pubsub = subscriber.pubsub()
            await pubsub.subscribe(f"task:{task_id}")
            try:
                while time.monotonic() < deadline:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    yield f"data: {message['data'] if message else 'waiting'}\n\n"
            finally:
                await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.reset()
        else:
            # the report's streams: Redis only, no database connection (heartbeats on the
            # embedded stack, which has no Redis)
            while time.monotonic() < deadline:
                progress = await redis.get(f"progress:{task_id}") if redis is not None else b"-"
                yield f"data: {progress!r}\n\n"
                await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/tasks/{task_id}/status")
async def status(task_id: str) -> dict:
    """A task's progress: from Redis (the report's), from its row on the embedded stack."""
    if redis is not None:
        return {"progress": await redis.get(f"progress:{task_id}")}
    async with engine.connect() as conn:
        return {"progress": await _count(conn, task_id)}


def _blocking_call() -> None:
    time.sleep(config.SYNC_CALL_SECONDS)  # a synchronous SDK call (HTTP, file, hashing)


@app.get("/roadmaps")
async def roadmaps() -> dict:
    if config.SYNC_CALL_SECONDS:
        if config.SYNC_CALL_OFFLOADED:
            await asyncio.to_thread(_blocking_call)  # the remedy: off the event loop
        else:
            _blocking_call()  # PLANTED (suspect "sync-call"): blocks every request of this worker
    async with engine.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(tasks))).scalar()
    return {"tasks": n}


@app.get("/blocking")
async def blocking() -> dict:
    """Sync work inside async def, on purpose (the integration test's blocked loop)."""
    time.sleep(float(os.environ.get("BLOCK_SECONDS", "1.0")))
    return {"ok": True}


@app.post("/notes")
async def add_note() -> dict:
    async with engine.begin() as conn:
        await conn.execute(insert(notes).values(body="x"))
    return {"ok": True}


@app.post("/tasks/{task_id}/seen")
async def seen(task_id: str) -> dict:
    """The user opened the task's page: one short update of its row."""
    async with engine.begin() as conn:
        await conn.execute(update(tasks).where(tasks.c.id == task_id).values(viewed=time.time()))
    return {"ok": True}


app.mount("/metrics", telemetry.metrics_app())
