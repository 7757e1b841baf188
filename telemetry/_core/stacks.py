"""Where a connection holder is: its stack, read only when something is reported.

Nothing is captured at checkout beyond the holder's thread id or asyncio task. When the watchdog
reports a long hold, it reads that thread's current frames (``sys._current_frames``) or the
task's coroutine stack: the block that still holds the connection is on it.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from types import FrameType
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_DIRS = tuple(
    {os.path.abspath(p) for p in (sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"),
                                  sysconfig.get_path("platlib")) if p}  # fmt: skip
)


def _is_library(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path.startswith(_LIBRARY_DIRS) or filename.startswith("<")


def _frames_of_thread(ident: int) -> list[FrameType]:
    frame = sys._current_frames().get(ident)
    out: list[FrameType] = []
    while frame is not None and len(out) < 200:
        out.append(frame)
        frame = frame.f_back
    out.reverse()
    return out


def holder_stack(thread_ident: int | None, task: Any, limit: int = 30) -> list[str]:
    """The holder's frames, oldest first, as ``file:line in function``; the holder's own code
    when it can be told apart from libraries, else everything."""
    frames: list[FrameType] = []
    if task is not None:
        frames = list(task.get_stack(limit=200))
    elif thread_ident is not None:
        frames = _frames_of_thread(thread_ident)
    rows = [(f.f_code.co_filename, f.f_lineno, f.f_code.co_name) for f in frames]
    user = [r for r in rows if not _is_library(r[0])]
    chosen = (user or rows)[-limit:]
    return [f"{fn}:{line} in {name}" for fn, line, name in chosen]


def call_site(stack: list[str]) -> str | None:
    """The innermost frame of the holder's own code."""
    return stack[-1] if stack else None
