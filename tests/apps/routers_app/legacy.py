"""A mounted sub-application with its own router (an older API version kept alive)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from .db import get_session

router = APIRouter(prefix="/v2")


@router.get("/things/{thing_id}")
async def read_thing(thing_id: int, session: Annotated[AsyncSession, Depends(get_session)]) -> dict:
    await session.execute(text("select 1"))
    return {"thing": thing_id}


app = FastAPI()
app.include_router(router)
