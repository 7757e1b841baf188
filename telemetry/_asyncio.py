"""asyncio: a measured drop-in Semaphore and the event-loop lag monitor.

``Semaphore`` is the seed's ``MAX_DB_CONCURRENT`` guard with capacity, in use, waiters and wait
time exported. The loop monitor schedules a callback every 0.1 s and measures how late it runs
(the lag histogram); a watchdog thread notices when the loop has not run it for longer than the
threshold and then, while the loop is still blocked, reads the loop thread's stack: the line
that blocks (a ``time.sleep`` inside ``async def``) is on it. Loops are picked up automatically
the first time they check out a database connection, serve a request through the ASGI
middleware, or create a ``Semaphore``; ``watch_event_loop()`` adds one explicitly.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any, Literal

from . import _stacks
from ._log import INTERNAL, emit, hook_error, trace_ids
from ._stats import REGISTRY, LabeledStats

_perf = time.perf_counter

STATS = LabeledStats()
REGISTRY.add(STATS)


class _Config:
    blocked_threshold = 0.5
    beat_interval = 0.1


CONFIG = _Config()

#: asyncio task -> trace ids of the request it serves (set by the ASGI middleware), so a blocked
#: loop can name the trace of the code that blocks it
TASK_TRACES: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def _release_capacity(labels: Any, value: int, generation: int) -> None:
    """A semaphore was garbage collected: its permits leave the capacity gauge, unless the
    gauges were reset since (fork, uninstrument) and never counted it."""
    if STATS.generation == generation:
        STATS.add("asyncio_semaphore_capacity", labels, -value)


class Semaphore(asyncio.Semaphore):
    """``asyncio.Semaphore`` that exports capacity, in use, waiters and wait time."""

    def __init__(self, value: int = 1, *, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Semaphore(name=...): expected a non-empty string, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Semaphore(value=...): expected a whole number >= 1, got {value!r}")
        super().__init__(value)
        self.name = name
        self._labels = LabeledStats.labels("asyncio_semaphore_in_use", INTERNAL.service, name)
        self._wait_labels = LabeledStats.labels("asyncio_semaphore_wait_seconds", INTERNAL.service, name)
        self._capacity = value
        STATS.add("asyncio_semaphore_capacity", self._labels, value)
        STATS.add("asyncio_semaphore_in_use", self._labels, 0)
        STATS.add("asyncio_semaphore_waiters", self._labels, 0)
        weakref.finalize(self, _release_capacity, self._labels, value, STATS.generation)

    async def acquire(self) -> Literal[True]:
        try:
            loop = asyncio.get_running_loop()
            if loop not in _monitored:
                watch_event_loop(loop)
        except Exception as exc:  # pragma: no cover - defensive
            hook_error("semaphore.monitor", exc)
        if not self.locked():
            await super().acquire()
            STATS.add("asyncio_semaphore_in_use", self._labels, 1)
            STATS.observe("asyncio_semaphore_wait_seconds", self._wait_labels, 0.0)
            return True
        STATS.add("asyncio_semaphore_waiters", self._labels, 1)
        t0 = _perf()
        try:
            await super().acquire()
        finally:
            STATS.add("asyncio_semaphore_waiters", self._labels, -1)
            STATS.observe("asyncio_semaphore_wait_seconds", self._wait_labels, _perf() - t0)
        STATS.add("asyncio_semaphore_in_use", self._labels, 1)
        return True

    def release(self) -> None:
        super().release()
        STATS.add("asyncio_semaphore_in_use", self._labels, -1)


class _LoopMonitor:
    __slots__ = ("loop", "thread_ident", "last_beat", "expected", "blocked_since", "handle",
                 "__weakref__")  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread_ident = threading.get_ident()
        self.last_beat = _perf()
        self.expected = self.last_beat + CONFIG.beat_interval
        self.blocked_since: float | None = None
        self.handle = loop.call_later(CONFIG.beat_interval, self.beat)

    def beat(self) -> None:
        now = _perf()
        try:
            STATS.observe("event_loop_lag_seconds", (("service", INTERNAL.service),),
                          max(0.0, now - self.expected))  # fmt: skip
            if self.blocked_since is not None:
                emit("warning", "event_loop_blocked", status="resumed",
                     blocked_seconds=round(now - self.blocked_since, 3))  # fmt: skip
                self.blocked_since = None
        except Exception as exc:
            hook_error("loop.beat", exc)
        self.last_beat = now
        self.expected = now + CONFIG.beat_interval
        if not self.loop.is_closed():
            self.handle = self.loop.call_later(CONFIG.beat_interval, self.beat)

    def check(self, now: float) -> None:
        """Watchdog side (another thread): report a loop stuck past the threshold, once."""
        if self.loop.is_closed() or not self.loop.is_running():
            return
        overdue = now - self.expected
        if overdue < CONFIG.blocked_threshold or self.blocked_since is not None:
            return
        self.blocked_since = self.expected
        STATS.inc("event_loop_blocked_total", (("service", INTERNAL.service),))
        task = asyncio.tasks._current_tasks.get(self.loop)  # type: ignore[attr-defined]
        frames = _stacks.holder_stack(self.thread_ident, None)
        emit(
            "warning", "event_loop_blocked", status="blocked",
            blocked_seconds=round(overdue, 3), threshold_seconds=CONFIG.blocked_threshold,
            call_site=_stacks.call_site(frames), frames=frames,
            task=task.get_name() if task is not None else None,
            **(TASK_TRACES.get(task, {}) if task is not None else {}),
        )  # fmt: skip


_monitored: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMonitor] = (
    weakref.WeakKeyDictionary()
)


def watch_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Measure lag and report blocking of ``loop`` (default: the running loop). Idempotent.
    Must be called from the loop's own thread."""
    loop = loop or asyncio.get_running_loop()
    if loop in _monitored:
        return
    _monitored[loop] = _LoopMonitor(loop)


def check_loops() -> None:
    now = _perf()
    for monitor in list(_monitored.values()):
        try:
            monitor.check(now)
        except Exception as exc:
            hook_error("loop.check", exc)


def request_trace(task: Any) -> None:
    """Remember the trace of the request a task serves (called by the ASGI middleware)."""
    ids = trace_ids()
    if ids and task is not None:
        TASK_TRACES[task] = ids


def reset() -> None:
    for monitor in list(_monitored.values()):
        try:
            monitor.handle.cancel()
        except Exception:  # pragma: no cover - loop already gone
            pass
    _monitored.clear()
    STATS.reset()
