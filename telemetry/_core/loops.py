"""The caller's holder, cheaply: its thread outside an event loop, else its asyncio task. Every
checkout notes it (the watchdog reads the holder's stack; a finished holder has leaked).

On Python 3.11, ``asyncio._get_running_loop()`` makes a ``getpid()`` system call whenever a loop
runs (its fork check; 3.12 replaced it with an at-fork hook), and ``current_task()`` is a Python
function around it: about 0.2 us of the 1 us a library pool's accounting took per checkout here.
There :func:`running_loop` keeps the last loop seen and believes it while the loop's ``_thread_id``
(which ``run_forever`` sets to the running thread, and clears when it returns) is the calling
thread's; otherwise it asks asyncio (no system call when no loop runs). Sync code pays one
Python call more (about 30 ns). A forked child forgets the loop. A loop that is not asyncio's
own (uvloop) is asked for every time, as before. From 3.12 these are asyncio's own functions.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

_get_loop, _ident = asyncio._get_running_loop, threading.get_ident
#: the last asyncio loop found running (Python 3.11)
_seen: list[Any] = [None]
#: what ``asyncio.current_task(loop)`` reads on Python 3.11 (a C function from 3.12)
_tasks: dict[Any, Any] | None = getattr(asyncio.tasks, "_current_tasks", None)
_FAST = sys.version_info >= (3, 12) or _tasks is None


def _running_loop_311(_seen: list[Any] = _seen, _get_loop: Any = _get_loop, _ident: Any = _ident) -> Any:
    loop = _seen[0]
    if loop is None or loop._thread_id != _ident():
        loop = _get_loop()
        if loop is not None and isinstance(loop, asyncio.BaseEventLoop):
            _seen[0] = loop
    return loop


#: the event loop running in this thread, or None
running_loop: Any = _get_loop if _FAST else _running_loop_311
#: ``task_of(loop)``: the task that loop is running now (None between tasks)
task_of: Any = asyncio.current_task if _FAST else _tasks.get  # type: ignore[union-attr]


def holder(_running_loop: Any = running_loop, _task_of: Any = task_of, _ident: Any = _ident) -> tuple[int | None, Any]:  # fmt: skip
    """``(thread ident, None)`` outside a running event loop, else ``(None, its current task)``."""
    loop = _running_loop()
    return (_ident(), None) if loop is None else (None, _task_of(loop))


def after_fork_in_child() -> None:
    """A forked child runs none of its parent's loops (the runtime's at-fork hook calls this)."""
    _seen[0] = None
