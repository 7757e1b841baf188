"""The calls a request or task awaited, as its trace's CLIENT spans show them (an HTTP call to a
model, another service): kept for a short while per trace, so that a transaction that sat idle
between its statements can name what it waited for.

Fed by the tracing integration (a span processor on the process's TracerProvider calls
:func:`noted` for every ended span); read when a transaction ends. Bounded: the last
``MAX_TRACES`` traces, ``PER_TRACE`` spans each.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

MAX_TRACES = 1000
PER_TRACE = 8


class RecentCalls:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: trace id -> [(end, duration, name)], ns since the epoch
        self._calls: OrderedDict[int, list[tuple[int, int, str]]] = OrderedDict()
        self.enabled = False

    def note(self, trace_id: int, end_ns: int, duration_ns: int, name: str) -> None:
        with self._lock:
            calls = self._calls.pop(trace_id, None) or []
            calls.append((end_ns, duration_ns, name))
            self._calls[trace_id] = calls[-PER_TRACE:]
            while len(self._calls) > MAX_TRACES:
                self._calls.popitem(last=False)

    def awaited(self, trace_id: int, since_ns: int) -> tuple[str, float] | None:
        """The longest call of the trace that ended after ``since_ns``: (its span name, seconds)."""
        with self._lock:
            calls = [c for c in self._calls.get(trace_id, ()) if c[0] >= since_ns]
        if not calls:
            return None
        _end, duration, name = max(calls, key=lambda c: c[1])
        return name, duration / 1e9

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()


RECENT = RecentCalls()


def noted(span: object) -> None:
    """An ended span (the tracing integration's processor calls this): a CLIENT span that is not a
    database call is noted in :data:`RECENT`."""
    try:
        if not RECENT.enabled or getattr(getattr(span, "kind", None), "name", "") != "CLIENT":
            return
        attributes = getattr(span, "attributes", None) or {}
        if "db.system" in attributes or "db.system.name" in attributes:
            return
        context, start, end = getattr(span, "context", None), getattr(span, "start_time", None), getattr(span, "end_time", None)
        if context is not None and start and end:
            RECENT.note(context.trace_id, end, end - start, str(getattr(span, "name", ""))[:120])
    except Exception:  # noqa: S110 - a processor must never break the app's span
        pass
