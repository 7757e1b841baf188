"""The shared view's figures as the leader last published them, and the view's own counters: a
source of the process registry (host-wide gauges without a ``pid`` label)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from telemetry._core.stats import REGISTRY, Sample


class _Published:
    """The leader's latest figures (replaced whole at each poll) and the view's own counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.server: list[Sample] = []
        self.pooler: list[Sample] = []
        self.server_ok_at: float | None = None
        self.pooler_ok_at: float | None = None
        self.server_up: int | None = None
        self.pooler_up: int | None = None
        self.server_seconds = 0.0
        self.pooler_seconds = 0.0
        self.errors: dict[tuple[str, str], int] = {}
        self.events: dict[str, int] = {}
        self.polls: dict[str, int] = {}
        self.rejected: dict[str, int] = {}

    def samples(self) -> Iterable[Sample]:
        with self._lock:
            server, pooler = list(self.server), list(self.pooler)
            errors, events = dict(self.errors), dict(self.events)
        now = time.time()
        yield from server
        yield from pooler
        for target, up, ok_at, seconds in (
            ("db_server", self.server_up, self.server_ok_at, self.server_seconds),
            ("pgbouncer", self.pooler_up, self.pooler_ok_at, self.pooler_seconds),
        ):
            if up is None:
                continue
            yield f"{target}_view_up", (), up
            yield f"{target}_view_query_seconds", (), seconds
            if ok_at is not None:
                yield f"{target}_view_age_seconds", (), round(now - ok_at, 3)
        for (target, reason), n in errors.items():
            yield f"{target}_view_errors_total", (("reason", reason),), n
        for event, n in events.items():
            yield "db_server_events_total", (("event", event),), n
        for target, n in list(self.polls.items()):
            yield f"{target}_view_polls_total", (), n
        for reason, n in list(self.rejected.items()):
            yield "db_server_statement_tags_rejected_total", (("reason", reason),), n

    def stand_down(self) -> None:
        """Another host polls the server now: this one's figures go (they would only age)."""
        with self._lock:
            self.server, self.pooler = [], []
        self.server_up = self.pooler_up = None
        self.server_ok_at = self.pooler_ok_at = None

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_error(self, target: str, reason: str) -> None:
        with self._lock:
            self.errors[(target, reason)] = self.errors.get((target, reason), 0) + 1


PUBLISHED = _Published()
REGISTRY.add(PUBLISHED)


EVENTS = ("db_lock_wait", "db_idle_in_transaction", "db_pooler_waiting")
