from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from ...db import get_session

posts = APIRouter()


@posts.get("/{post_id}")
async def read_post(user_id: int, post_id: int, session: Annotated[AsyncSession, Depends(get_session)]) -> dict:
    await session.execute(text("select 1"))
    return {"user": user_id, "post": post_id}


router = APIRouter(prefix="/users")
router.include_router(posts, prefix="/{user_id}/posts")  # nested include_router
