from __future__ import annotations

from fastapi import APIRouter, FastAPI

import telemetry

from . import legacy
from .api.routes import items, misc, users

api_router = APIRouter()
api_router.include_router(items.router)
api_router.include_router(users.router)
api_router.include_router(misc.timed)
api_router.include_router(misc.streams)

app = FastAPI(title="routers app")
app.include_router(api_router, prefix="/api/v1")
app.mount("/legacy", legacy.app)
app.add_route("/metrics", telemetry.metrics_app())


@app.get("/health")
async def health() -> dict:
    return {"ok": True}
