"""A FastAPI app under uvicorn workers for the OTLP metrics test: ``/work`` checks out a
connection (routers in a module's ``APIRouter``), ``/metrics`` serves the host aggregate. The
export is turned on from the environment only (``OTEL_METRICS_EXPORTER=otlp``)."""

from __future__ import annotations

import os

from fastapi import APIRouter, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import telemetry

telemetry.instrument(service="api")
engine = create_async_engine(os.environ["APP_DATABASE_URL"], pool_size=2, max_overflow=2, pool_logging_name="main-db")
router = APIRouter()


@router.get("/work/{n}")
async def work(n: int) -> dict[str, int]:
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))
    return {"n": n, "pid": os.getpid()}


app = FastAPI()
app.include_router(router)
app.mount("/metrics", telemetry.metrics_app())
