"""The content task: ~30 concepts generated concurrently, each saved behind a semaphore.

Imported by the API (to send) and by the worker (to run); ``worker.py`` instruments the worker.
"""

from __future__ import annotations

import asyncio

import structlog
from celery import Celery
from sqlalchemy import insert, select, update

import telemetry

from . import config
from .db import concepts, make_engine, tasks

app = Celery("content_pipeline", broker=config.BROKER_URL, backend=config.RESULT_BACKEND)
app.conf.update(task_acks_late=False, worker_prefetch_multiplier=1, task_track_started=False,
                broker_connection_retry_on_startup=True)  # fmt: skip


async def _llm(step: str, n: int) -> str:
    await asyncio.sleep(config.LLM_SECONDS)  # a slow model call, no connection held
    return f"{step} for concept {n}"


async def _pipeline(task_id: str) -> dict:
    engine = make_engine()
    sem = telemetry.Semaphore(config.MAX_DB_CONCURRENT, name="MAX_DB_CONCURRENT")
    try:
        with telemetry.db_owner("resume-step"):
            async with engine.connect() as conn:
                done = {r[0] for r in await conn.execute(select(concepts.c.n).where(concepts.c.task_id == task_id))}
        buffer: list[dict] = []
        lock = asyncio.Lock()

        async def save(rows: list[dict]) -> None:
            async with sem, engine.begin() as conn:
                # the slow part of a save (serialising, a remote database's latency) while the
                # session is held; the INSERT itself comes last so SQLite's write lock is brief
                await asyncio.sleep(config.SAVE_SECONDS * (1 + 0.2 * (len(rows) - 1)))
                await conn.execute(insert(concepts), rows)

        async def one(n: int) -> None:
            tutorial = await _llm("tutorial", n)
            resource = await _llm("resource", n)
            quiz = await _llm("quiz", n)
            row = {"task_id": task_id, "n": n, "tutorial": tutorial, "resource": resource, "quiz": quiz}
            if config.BATCH_SIZE <= 1:
                with telemetry.db_owner("save-concept"):
                    await save([row])
                return
            async with lock:
                buffer.append(row)
                batch = list(buffer) if len(buffer) >= config.BATCH_SIZE else None
                if batch:
                    buffer.clear()
            if batch:
                with telemetry.db_owner("save-batch"):
                    await save(batch)

        await asyncio.gather(*(one(n) for n in range(config.CONCEPTS) if n not in done))
        if buffer:
            with telemetry.db_owner("save-batch"):
                await save(list(buffer))
        async with engine.begin() as conn:
            await conn.execute(update(tasks).where(tasks.c.id == task_id).values(status="done"))
        return {"task_id": task_id, "concepts": config.CONCEPTS - len(done)}
    finally:
        await engine.dispose()


@app.task(name="generate_content")
def generate_content(task_id: str) -> dict:
    result = asyncio.run(_pipeline(task_id))
    structlog.get_logger("content").info("content_task_done", **result)
    return result
