"""Where a connection holder is: its stack, read only when something is reported.

Nothing is captured at checkout beyond the holder's thread id or asyncio task. When the watchdog
reports a long hold, it reads that thread's current frames (``sys._current_frames``) or the
task's coroutine stack: the block that still holds the connection is on it.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from types import FrameType
from typing import Any

#: the package's own frames are not the holder's code, except the demo's app (an application)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEMO_APP_DIR = os.path.join(_PACKAGE_DIR, "tools", "demo", "pipeline")
_LIBRARY_DIRS = tuple(
    {os.path.abspath(p) for p in (sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"),
                                  sysconfig.get_path("platlib")) if p}  # fmt: skip
)


@functools.lru_cache(maxsize=2048)
def _is_library(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_DEMO_APP_DIR):
        return False
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


def checkout_site(limit: int = 200) -> str | None:
    """The innermost frame of the application's own code on the stack checking out now, as
    ``file:line in function``; through SQLAlchemy's greenlet (whose frames do not link to the
    coroutine awaiting it) into the awaiting coroutine's frames. Read only for owners that leaked
    a connection before (``holds.SUSPECTS``)."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(2):
        depth = 0
        while frame is not None and depth < limit:
            code = frame.f_code
            if not _is_library(code.co_filename):
                return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
            frame, depth = frame.f_back, depth + 1
        greenlet = sys.modules.get("greenlet")
        parent = greenlet.getcurrent().parent if greenlet is not None else None
        if parent is None:
            return None
        frame = parent.gr_frame
    return None
