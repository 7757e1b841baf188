from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from ...db import get_session

router = APIRouter(prefix="/items", tags=["items"])
SessionDep = Annotated[AsyncSession, Depends(get_session)]


@router.get("/{item_id}")
async def read_item(item_id: int, session: SessionDep) -> dict:
    await session.execute(text("select 1"))
    return {"id": item_id}


@router.post("/")
async def create_item(session: SessionDep) -> dict:
    await session.execute(text("select 1"))
    return {"created": True}
