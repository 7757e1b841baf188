"""The FastAPI app: POST /generate returns at once; a status stream; ordinary pages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy import func, insert, select

import telemetry

from . import config
from .db import concepts, create_schema, make_engine, notes, tasks

telemetry.configure_logging("api")
telemetry.instrument(service="api")

engine = make_engine()


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
    from .tasks import generate_content

    generate_content.delay(task_id)
    return {"task_id": task_id, "status": "pending"}


@app.get("/tasks/{task_id}/stream")
async def stream(task_id: str) -> StreamingResponse:
    async def events():
        deadline = time.monotonic() + config.STREAM_SECONDS
        if config.SSE_HOLDS_SESSION:
            # a planted cause, not the report's code (its streams read Redis only): one session
            # for the life of the stream
            async with engine.connect() as conn:
                while time.monotonic() < deadline:
                    n = (await conn.execute(select(func.count()).select_from(concepts).where(concepts.c.task_id == task_id))).scalar()
                    yield f"data: {n}\n\n"
                    await asyncio.sleep(0.5)
        else:
            while time.monotonic() < deadline:
                async with engine.connect() as conn:
                    n = (await conn.execute(select(func.count()).select_from(concepts).where(concepts.c.task_id == task_id))).scalar()
                yield f"data: {n}\n\n"
                await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/roadmaps")
async def roadmaps() -> dict:
    async with engine.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(tasks))).scalar()
    return {"tasks": n}


@app.post("/notes")
async def add_note() -> dict:
    async with engine.begin() as conn:
        await conn.execute(insert(notes).values(body="x"))
    return {"ok": True}


@app.get("/blocking")
async def blocking() -> dict:
    time.sleep(float(os.environ.get("BLOCK_SECONDS", "1.0")))  # sync work inside async def
    return {"ok": True}


app.mount("/metrics", telemetry.metrics_app())
