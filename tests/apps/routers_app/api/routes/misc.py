from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from ...db import Session, get_session


class TimedRoute(APIRoute):
    """A custom route class, as apps write them for timing or error handling."""

    def get_route_handler(self) -> Callable[..., Any]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Any:
            started = time.perf_counter()
            response = await original(request)
            response.headers["x-elapsed"] = f"{time.perf_counter() - started:.6f}"
            return response

        return handler


timed = APIRouter(prefix="/timed", route_class=TimedRoute)


@timed.get("/{key}")
async def read_timed(key: str, session: Annotated[AsyncSession, Depends(get_session)]) -> dict:
    await session.execute(text("select 1"))
    return {"key": key}


streams = APIRouter()


@streams.get("/stream/{n}")
async def stream(n: int) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(n):
            async with Session() as session:  # a session per chunk, inside the response's life
                await session.execute(text("select 1"))
            yield f"{i}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/plain")


@streams.websocket("/ws/{room}")
async def room(websocket: WebSocket, room: str) -> None:
    if room == "closed":
        await websocket.close()  # refused before accept
        return
    await websocket.accept()
    async with Session() as session:
        await session.execute(text("select 1"))
    await websocket.send_text(room)
    await websocket.close()
