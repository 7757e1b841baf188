"""Raw ASGI drivers for what httpx's ASGITransport does not speak: WebSocket and lifespan."""

from __future__ import annotations

import asyncio
from typing import Any


async def websocket(app: Any, path: str, *, client_messages: int = 1) -> list[dict[str, Any]]:
    """Open a WebSocket at ``path``; returns every message the app sent until it closed."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await incoming.put({"type": "websocket.connect"})
    sent: list[dict[str, Any]] = []
    closed = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if closed.is_set():
            return {"type": "websocket.disconnect", "code": 1000}
        return await incoming.get()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] in ("websocket.close", "websocket.http.response.body"):
            closed.set()
            await incoming.put({"type": "websocket.disconnect", "code": 1000})

    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
             "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "server": ("t", 80), "client": ("127.0.0.1", 5000), "subprotocols": []}  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


async def lifespan(app: Any) -> list[str]:
    """Run startup and shutdown; returns the message types the app answered."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        await incoming.put({"type": kind})
    answered: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        answered.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await asyncio.wait_for(app(scope, incoming.get, send), 10)
    return answered
