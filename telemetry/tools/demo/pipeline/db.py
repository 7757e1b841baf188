from __future__ import annotations

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import config

metadata = MetaData()
tasks = Table("tasks", metadata, Column("id", String(40), primary_key=True),
              Column("status", String(20)), Column("created", Float), Column("viewed", Float))  # fmt: skip
concepts = Table("concepts", metadata, Column("task_id", String(40), primary_key=True),
                 Column("n", Integer, primary_key=True), Column("tutorial", Text),
                 Column("resource", Text), Column("quiz", Text))  # fmt: skip
notes = Table("notes", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
              Column("body", Text))  # fmt: skip
logs = Table("logs", metadata, Column("id", Integer, primary_key=True, autoincrement=True),
             Column("task_id", String(40)), Column("line", Text))  # fmt: skip


def connect_args(url: str) -> dict:
    """What the URL's driver needs here: SQLite waits for the file's write lock; psycopg behind a
    transaction-mode pooler prepares no server-side statements."""
    if url.startswith("sqlite"):
        return {"timeout": 60}
    if "+psycopg" in url:
        return {"prepare_threshold": None}
    return {}


def make_engine(pool_size: int | None = None, max_overflow: int | None = None) -> AsyncEngine:
    kwargs: dict = {"pool_size": config.DB_POOL_SIZE if pool_size is None else pool_size,
                    "max_overflow": config.DB_MAX_OVERFLOW if max_overflow is None else max_overflow,
                    "pool_timeout": config.DB_POOL_TIMEOUT, "connect_args": connect_args(config.DATABASE_URL)}  # fmt: skip
    if config.DATABASE_URL.startswith("sqlite"):
        from sqlalchemy.pool import AsyncAdaptedQueuePool

        kwargs["poolclass"] = AsyncAdaptedQueuePool
    return create_async_engine(config.DATABASE_URL, **kwargs)


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
