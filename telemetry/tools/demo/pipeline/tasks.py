"""The Celery tasks of the report's three worker groups: ``generate_content`` (queue ``content``:
~30 concepts with ``asyncio.gather``, each saved on its own session behind ``MAX_DB_CONCURRENT``),
``write_log`` (queue ``logs``) and ``advance_workflow`` (queue ``workflow``), each with its own
short database work.

Imported by the API (to send) and by the workers (to run); ``worker.py`` instruments the workers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from celery import Celery
from sqlalchemy import insert, select, update

import telemetry

from . import config
from .db import concepts, logs, make_engine, tasks

app = Celery("content_pipeline", broker=config.BROKER_URL, backend=config.RESULT_BACKEND)
app.conf.update(task_acks_late=False, worker_prefetch_multiplier=1, task_track_started=False,
                broker_connection_retry_on_startup=True,
                task_routes={"generate_content": {"queue": "content"}, "write_log": {"queue": "logs"},
                             "advance_workflow": {"queue": "workflow"}})  # fmt: skip


async def _llm(step: str, n: int) -> str:
    await asyncio.sleep(config.LLM_SECONDS)  # a slow model call, no connection held
    return f"{step} for concept {n}"


async def _progress(client: Any, task_id: str, n: int) -> None:
    if client is not None:
        await client.set(f"progress:{task_id}", n)
        await client.publish(f"task:{task_id}", n)


async def _pipeline(task_id: str) -> dict:
    engine = make_engine()
    sem = telemetry.Semaphore(config.MAX_DB_CONCURRENT, name="MAX_DB_CONCURRENT")
    client = None
    if config.REDIS_URL:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(config.REDIS_URL)
    try:
        if config.ROW_LOCK_ACROSS_LLM:
            # PLANTED (suspect "row-lock"), not the report's code: the task's row locked while
            # its outline is generated (8 model steps); every update of that row waits behind it
            async with engine.begin() as conn:
                await conn.execute(select(tasks.c.id).where(tasks.c.id == task_id).with_for_update())
                for step in range(8):
                    await _llm("outline", step)
                await conn.execute(update(tasks).where(tasks.c.id == task_id).values(status="generating"))
        with telemetry.db_owner("resume-step"):
            async with engine.connect() as conn:
                done = {r[0] for r in await conn.execute(select(concepts.c.n).where(concepts.c.task_id == task_id))}
        buffer: list[dict] = []
        lock = asyncio.Lock()
        saved = 0

        async def save(rows: list[dict]) -> None:
            nonlocal saved
            async with sem, engine.begin() as conn:
                # the slow part of a save (the report's 2-5 s writes, scaled) while the session
                # is held; the INSERT itself comes last so SQLite's write lock is brief
                await asyncio.sleep(config.SAVE_SECONDS * (1 + 0.2 * (len(rows) - 1)))
                await conn.execute(insert(concepts), rows)
            saved += len(rows)
            await _progress(client, task_id, saved)

        async def one(n: int) -> None:
            if config.TX_ACROSS_LLM:
                # PLANTED (suspect "worker-transactions"): the transaction opens before the LLM
                # steps, so its server connection stays taken through the pooler meanwhile
                async with sem, engine.begin() as conn:
                    await conn.execute(select(concepts.c.n).where(concepts.c.task_id == task_id, concepts.c.n == n))
                    row = {"task_id": task_id, "n": n, "tutorial": await _llm("tutorial", n),
                           "resource": await _llm("resource", n), "quiz": await _llm("quiz", n)}  # fmt: skip
                    await conn.execute(insert(concepts), [row])
                return
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
        if client is not None:
            await client.aclose() if hasattr(client, "aclose") else await client.close()
        await engine.dispose()


@app.task(name="generate_content")
def generate_content(task_id: str) -> dict:
    write_log.delay(task_id, "content started")
    result = asyncio.run(_pipeline(task_id))
    write_log.delay(task_id, "content done")
    structlog.get_logger("content").info("content_task_done", **result)
    return result


def _short(statement: Any) -> None:
    async def go() -> None:
        engine = make_engine(pool_size=1, max_overflow=1)
        try:
            async with engine.begin() as conn:
                await conn.execute(statement)
        finally:
            await engine.dispose()

    asyncio.run(go())


@app.task(name="write_log")
def write_log(task_id: str, line: str) -> None:
    """The logs group's work: one short insert."""
    _short(insert(logs).values(task_id=task_id, line=line))


@app.task(name="advance_workflow")
def advance_workflow(task_id: str) -> None:
    """The workflow group's work: one short update of the task's row."""
    _short(update(tasks).where(tasks.c.id == task_id).values(status="queued"))
