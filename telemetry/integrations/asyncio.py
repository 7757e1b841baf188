"""asyncio: a measured drop-in Semaphore and the event-loop lag monitor.

``Semaphore`` is the incident report's ``MAX_DB_CONCURRENT`` guard with capacity, in use, waiters and wait
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

from telemetry._core import stacks as _stacks
from telemetry._core.integration import Integration
from telemetry._core.log import INTERNAL, emit, hook_error
from telemetry._core.stats import REGISTRY, LabeledStats

_perf = time.perf_counter

STATS = LabeledStats()
REGISTRY.add(STATS)


class _Config:
    blocked_threshold = 0.5
    beat_interval = 0.1


CONFIG = _Config()

#: asyncio task -> the span of the request it serves (set by the ASGI middleware when tracing,
#: removed when the request ends), so a blocked loop can name the trace of the code that blocks
#: it; ids are formatted only then. A plain dict: a weak key costs a weakref per request.
TASK_SPANS: dict[Any, Any] = {}


def _release_capacity(labels: Any, value: int, generation: int) -> None:
    """A semaphore was garbage collected: its permits leave the capacity gauge, unless the
    gauges were reset since (fork, uninstrument) and never counted it."""
    if STATS.generation == generation:
        STATS.add("asyncio_semaphore_capacity", labels, -value)


_semaphores: weakref.WeakSet[Semaphore] = weakref.WeakSet()


class Semaphore(asyncio.Semaphore):
    """``asyncio.Semaphore`` that exports capacity, in use, waiters and wait time.

    Usually created at import time (``MAX_DB_CONCURRENT = telemetry.Semaphore(3, name=...)``),
    before ``instrument()`` names the service: :func:`relabel_semaphores` moves it then.
    """

    def __init__(self, value: int = 1, *, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Semaphore(name=...): expected a non-empty string, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Semaphore(value=...): expected a whole number >= 1, got {value!r}")
        super().__init__(value)
        self.name = name
        self._capacity = value
        self._held = 0  # permits taken through acquire() and not yet released
        self._register(INTERNAL.service)
        _semaphores.add(self)

    def _register(self, service: str) -> None:
        self._service = service
        self._labels = LabeledStats.labels("asyncio_semaphore_in_use", service, self.name)
        self._wait_labels = LabeledStats.labels("asyncio_semaphore_wait_seconds", service, self.name)
        STATS.add("asyncio_semaphore_capacity", self._labels, self._capacity)
        STATS.add("asyncio_semaphore_in_use", self._labels, self._held)
        STATS.add("asyncio_semaphore_waiters", self._labels, 0)
        self._generation = STATS.generation
        self._finalizer = weakref.finalize(
            self, _release_capacity, self._labels, self._capacity, self._generation
        )

    def _relabel(self, service: str) -> None:
        """Move this semaphore's gauges to ``service`` (its waiters, if any, stay counted where
        they started and leave from there)."""
        if service == self._service:
            return
        self._finalizer.detach()
        if STATS.generation == self._generation:
            STATS.add("asyncio_semaphore_capacity", self._labels, -self._capacity)
            STATS.add("asyncio_semaphore_in_use", self._labels, -self._held)
            STATS.drop_zero(self._labels)
        self._register(service)

    async def acquire(self) -> Literal[True]:
        try:
            watch_event_loop(asyncio.get_running_loop())
        except Exception as exc:  # pragma: no cover - defensive
            hook_error("semaphore.monitor", exc)
        labels = self._labels
        if not self.locked():
            await super().acquire()
            self._held += 1
            STATS.add("asyncio_semaphore_in_use", labels, 1)
            STATS.observe("asyncio_semaphore_wait_seconds", self._wait_labels, 0.0)
            return True
        STATS.add("asyncio_semaphore_waiters", labels, 1)
        t0 = _perf()
        try:
            await super().acquire()
        finally:
            STATS.add("asyncio_semaphore_waiters", labels, -1)
            STATS.observe("asyncio_semaphore_wait_seconds", self._wait_labels, _perf() - t0)
        self._held += 1
        STATS.add("asyncio_semaphore_in_use", self._labels, 1)
        return True

    def release(self) -> None:
        super().release()
        if self._held > 0:  # a release() without acquire() raises no permit count below zero
            self._held -= 1
            STATS.add("asyncio_semaphore_in_use", self._labels, -1)


def relabel_semaphores(service: str) -> None:
    """Semaphores created before ``instrument()`` (at import) take the service it names."""
    for sem in list(_semaphores):
        try:
            sem._relabel(service)
        except Exception as exc:
            hook_error("semaphore.relabel", exc)


#: one episode, one report: the watchdog and the late beat can both find it overdue
_episode_lock = threading.Lock()


class _LoopMonitor:
    """Beats on the loop it watches; holds only a weak reference to it, so a finished loop
    (``asyncio.run()`` per Celery task) is freed and its monitor pruned by the watchdog.

    The watchdog thread reports an episode while it lasts; a block that ends between two of its
    ticks (a 0.6 s call against a 0.5 s threshold overdue by at most 0.6 s minus the beat
    interval) is reported by the late beat itself, with what the watchdog sampled meanwhile."""

    __slots__ = ("loop_ref", "thread_ident", "last_beat", "expected", "blocked_since", "handle",
                 "samples", "reported", "frames", "where", "limiter", "__weakref__")  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)
        self.thread_ident = threading.get_ident()
        self.last_beat = _perf()
        self.expected = self.last_beat + CONFIG.beat_interval
        self.blocked_since: float | None = None
        self.samples: dict[str, int] = {}  # innermost user frame -> times seen this episode
        self.frames: list[str] = []  # the latest sampled stack of this episode
        self.where: dict[str, Any] = {"task": None}  # the task (and its trace) seen blocking, latest sample
        self.reported = False
        self.limiter: Any = None  # anyio's default thread limiter of this loop, once a request saw it
        self.handle = loop.call_later(CONFIG.beat_interval, self.beat)

    def alive(self) -> bool:
        loop = self.loop_ref()
        return loop is not None and not loop.is_closed()

    def beat(self) -> None:
        now = _perf()
        try:
            lag = max(0.0, now - self.expected)
            STATS.observe("event_loop_lag_seconds", (("service", INTERNAL.service),), lag)
            if not self.reported and lag >= CONFIG.blocked_threshold:  # ended between two watchdog ticks
                self.report(self.expected, lag, self.frames, self.where)
            if self.reported and self.blocked_since is not None:
                site, seen, total = self.summary()
                emit("warning", "event_loop_blocked", status="resumed",
                     blocked_seconds=round(now - self.blocked_since, 3),
                     call_site=site, call_site_samples=seen, samples=total)  # fmt: skip
        except Exception as exc:
            hook_error("loop.beat", exc)
        self.restart(now)
        loop = self.loop_ref()
        if loop is not None and not loop.is_closed():
            self.handle = loop.call_later(CONFIG.beat_interval, self.beat)

    def restart(self, now: float) -> None:
        """A new episode: after a beat, and when the loop runs again (``run_until_complete()``
        called once per task on one loop: the time it stood stopped is neither lag nor a block)."""
        with _episode_lock:  # a watchdog report in flight belongs to the episode that ends here
            self.thread_ident = threading.get_ident()  # called on the loop's thread
            self.blocked_since = None
            self.reported = False
            self.samples = {}
            self.frames = []
            self.where = {"task": None}
            self.last_beat = now
            self.expected = now + CONFIG.beat_interval

    def summary(self) -> tuple[str | None, int, int]:
        """The frame seen most in this episode's samples, how often, and of how many."""
        samples = dict(self.samples)
        if not samples:
            return None, 0, 0
        site = max(samples, key=lambda k: samples[k])
        return site, samples[site], sum(samples.values())

    def report(self, expected: float, overdue: float, frames: list[str], where: dict[str, Any]) -> None:
        """Count the episode (the one whose beat was due at ``expected``) and say where the loop is
        (or was) blocked: once, whichever of the watchdog and the late beat comes first."""
        with _episode_lock:
            if self.reported or self.expected != expected:
                return
            self.reported = True
            self.blocked_since = expected
        STATS.inc("event_loop_blocked_total", (("service", INTERNAL.service),))
        best, seen, total = self.summary()
        emit(
            "warning", "event_loop_blocked", status="blocked",
            blocked_seconds=round(overdue, 3), threshold_seconds=CONFIG.blocked_threshold,
            call_site=best, call_site_samples=seen, samples=total, frames=frames, **where,
        )  # fmt: skip

    def check(self, now: float) -> None:
        """Watchdog side (another thread). From half the threshold on, sample the loop thread's
        stack at every tick; at the threshold report the line seen most, once per episode. One
        sample alone can land on an innocent line when the machine is short of CPU."""
        loop = self.loop_ref()
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        expected = self.expected
        overdue = now - expected
        if overdue < CONFIG.blocked_threshold / 2:
            return
        frames = _stacks.holder_stack(self.thread_ident, None)
        site = _stacks.call_site(frames) or "unknown"
        self.samples[site] = self.samples.get(site, 0) + 1
        task = asyncio.tasks._current_tasks.get(loop)  # type: ignore[attr-defined]
        where = {"task": task.get_name() if task is not None else None, **_task_trace(task)}
        self.frames, self.where = frames, where
        if overdue >= CONFIG.blocked_threshold and not self.reported:
            self.report(expected, overdue, frames, where)


#: id(loop) -> its monitor. Not a WeakKeyDictionary: its weakref callbacks can change it while
#: the watchdog thread iterates ("dictionary changed size during iteration"); dead and closed
#: loops are pruned by the watchdog instead.
_monitored: dict[int, _LoopMonitor] = {}
_monitored_lock = threading.Lock()


def is_watched(loop: asyncio.AbstractEventLoop) -> bool:
    monitor = _monitored.get(id(loop))
    return monitor is not None and monitor.loop_ref() is loop


#: whether the asyncio integration is installed: only then is a loop watched (its watchdog, the
#: housekeeper, is what lets go of finished loops; without it every loop would be kept)
_ACTIVE = [False]


def watch_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Measure lag and report blocking of ``loop`` (default: the running loop) while the
    process is instrumented (``instrument()``); a no-op otherwise. Idempotent. Must be called
    from the loop's own thread."""
    if not _ACTIVE[0]:
        return
    loop = loop or asyncio.get_running_loop()
    if is_watched(loop) or loop.is_closed():
        return
    with _monitored_lock:
        _monitored[id(loop)] = _LoopMonitor(loop)  # replaces a dead loop's monitor at that id


def note_thread_limiter(loop: asyncio.AbstractEventLoop) -> None:
    """Remember ``loop``'s anyio default thread limiter (where Starlette runs sync ``def`` routes
    and dependencies), once per loop; called from a task on it (the ASGI middleware)."""
    monitor = _monitored.get(id(loop))
    if monitor is None or monitor.limiter is not None:
        return
    try:
        from anyio.to_thread import current_default_thread_limiter

        monitor.limiter = current_default_thread_limiter()
    except Exception as exc:
        monitor.limiter = False
        hook_error("loop.thread_limiter", exc)


class _ThreadLimiters:
    """The thread limiters of the watched loops, read at collection: tokens, borrowed, waiting."""

    def samples(self) -> Any:
        tokens = borrowed = waiting = 0.0
        seen = False
        for monitor in list(_monitored.values()):
            limiter = monitor.limiter
            if not limiter or not monitor.alive():
                continue
            try:
                stats = limiter.statistics()
                tokens, borrowed = tokens + stats.total_tokens, borrowed + stats.borrowed_tokens
                waiting += stats.tasks_waiting
                seen = True
            except Exception as exc:
                hook_error("loop.thread_limiter", exc)
        if seen:
            lb = (("service", INTERNAL.service),)
            yield "asyncio_thread_limiter_tokens", lb, tokens
            yield "asyncio_thread_limiter_borrowed", lb, borrowed
            yield "asyncio_thread_limiter_waiting", lb, waiting

    def reset(self) -> None:
        pass


REGISTRY.add(_ThreadLimiters())


def check_loops() -> None:
    now = _perf()
    with _monitored_lock:
        monitors = list(_monitored.items())
    dead = []
    for key, monitor in monitors:
        if not monitor.alive():
            dead.append((key, monitor))
            continue
        try:
            monitor.check(now)
        except Exception as exc:
            hook_error("loop.check", exc)
    if dead:
        with _monitored_lock:
            for key, monitor in dead:
                if _monitored.get(key) is monitor:
                    del _monitored[key]


def watched_loops() -> int:
    return len(_monitored)


# --------------------------------------------------------------------------- every loop

_original_run_forever: Any = None


def install_loop_hook() -> None:
    """Watch every asyncio loop from the moment it runs (``asyncio.run``, uvicorn, Celery
    tasks), not only those that touch the database or serve a request first."""
    global _original_run_forever
    if _original_run_forever is not None:
        return
    from asyncio import base_events

    original = base_events.BaseEventLoop.run_forever

    def run_forever(self: Any) -> None:
        try:
            monitor = _monitored.get(id(self))
            if monitor is not None and monitor.loop_ref() is self:
                monitor.restart(_perf())  # it runs again after standing stopped
            else:
                watch_event_loop(self)
        except Exception as exc:
            hook_error("loop.watch", exc)
        original(self)

    run_forever.__wrapped__ = original  # type: ignore[attr-defined]
    _original_run_forever = original
    base_events.BaseEventLoop.run_forever = run_forever  # type: ignore[method-assign]


def uninstall_loop_hook() -> None:
    global _original_run_forever
    if _original_run_forever is None:
        return
    from asyncio import base_events

    base_events.BaseEventLoop.run_forever = _original_run_forever  # type: ignore[method-assign]
    _original_run_forever = None


def remember_request_span(task: Any, span: Any) -> tuple[Any, Any] | None:
    """The ASGI middleware: ``task`` serves the request of ``span`` until
    :func:`forget_request_span` is given what this returns (None: nothing remembered)."""
    if task is None or span is None:
        return None
    previous = TASK_SPANS.get(task)  # a request served inside another one, in the same task
    TASK_SPANS[task] = span
    return task, previous


def forget_request_span(remembered: tuple[Any, Any]) -> None:
    task, previous = remembered
    if previous is None:
        TASK_SPANS.pop(task, None)
    else:
        TASK_SPANS[task] = previous


def _task_trace(task: Any) -> dict[str, str]:
    span = TASK_SPANS.get(task) if task is not None else None
    if span is None:
        return {}
    ctx = span.get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def after_fork_in_child() -> None:
    """The parent's loops do not run in the child."""
    global _monitored_lock, _episode_lock
    _monitored_lock = threading.Lock()
    _episode_lock = threading.Lock()
    _monitored.clear()
    TASK_SPANS.clear()


def reset() -> None:
    uninstall_loop_hook()
    TASK_SPANS.clear()
    for monitor in list(_monitored.values()):
        try:
            monitor.handle.cancel()
        except Exception:  # pragma: no cover - loop already gone
            pass
    _monitored.clear()
    STATS.reset()


class AsyncioIntegration(Integration):
    """Loop lag and blocked-loop reports for every loop, and the semaphores' service label."""

    name = "asyncio"

    def install(self, runtime: Any) -> None:
        CONFIG.blocked_threshold = runtime.settings.loop_blocked_seconds
        relabel_semaphores(runtime.settings.service)
        install_loop_hook()
        _ACTIVE[0] = True

    def uninstall(self) -> None:
        _ACTIVE[0] = False
        reset()

    def after_fork(self) -> None:
        after_fork_in_child()

    def tick(self, now: float) -> None:
        check_loops()
