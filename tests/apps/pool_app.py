"""A minimal ASGI app for multi-worker tests: /work checks out a connection, /metrics serves
the host aggregate. The engine is created before instrument() on purpose."""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import telemetry

engine = create_async_engine(os.environ["APP_DATABASE_URL"], pool_size=2, max_overflow=2)
telemetry.instrument(service="api")
metrics = telemetry.metrics_app()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await engine.dispose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"].startswith("/metrics"):

        async def tell_pid(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":  # which worker answered this scrape
                message = dict(message, headers=[*message.get("headers", []), (b"x-served-by", str(os.getpid()).encode())])
            await send(message)

        await metrics(scope, receive, tell_pid)
        return
    with telemetry.db_owner("GET /work"):
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
