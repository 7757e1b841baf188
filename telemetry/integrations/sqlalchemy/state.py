"""The SQLAlchemy pools' state in this process: who holds each checked-out connection
(:class:`Held`, keyed in :data:`_held`), the settings the hot path reads (:data:`CONFIG`), each
named pool's figures (:class:`PoolState`) and the registries that name pools. No SQLAlchemy hook
lives here: ``_pool`` (the hot path), ``_pool_peers``, ``_pool_events`` and ``_sqlalchemy`` (the
lifecycle) work on it."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from sqlalchemy.pool import Pool, QueuePool

from telemetry._core.catalogue import WAIT_BUCKETS
from telemetry._core.holds import Held, HoldTable, owner_hold
from telemetry._core.pools import PoolFigures, critical_at
from telemetry._core.stats import Histogram, Sample

_ATTR = "_telemetry_state"
_SKIP = object()  # cached on pools that are not instrumented (explicit-only mode)

_HELD_ATTR = "_telemetry_held"
#: the SQLAlchemy pools' connections held right now (``_holds``): the hot path reads ``_held`` and
#: ``_flagged``, the same dicts (never rebound: cleared)
TABLE = HoldTable("db_connection_held_too_long")
_held: dict[Any, Held] = TABLE.held
_flagged: dict[Any, int] = TABLE.flagged


def _no_loop() -> None:
    return None


class _Locks:
    """The pool registration lock, as an attribute: a forked child replaces it (a parent thread
    may have held it at fork time), and every module reads it here at call time. (The long-hold
    flags have their own, ``TABLE.lock``.)"""

    registry = threading.RLock()  # pool registration (first checkout of a pool, install)


LOCKS = _Locks()


class _Config:
    """The settings the hot path reads, copied once at install (attribute reads stay cheap)."""

    service = "unknown"
    hold_threshold = 5.0
    critical_ratio = 0.9
    critical_interval = 10.0
    max_owners = 100
    connection_limit: int | None = None
    application_name = True
    statement_tag = True
    auto = True

    def load(self, settings: Any) -> None:
        self.service = settings.service
        self.application_name = settings.application_name
        self.statement_tag = settings.statement_tag
        self.hold_threshold = settings.hold_threshold_seconds
        self.critical_ratio = settings.critical_usage_ratio
        self.critical_interval = settings.critical_log_interval_seconds
        self.max_owners = settings.max_owners
        self.connection_limit = settings.connection_limit
        # a pool registered before (``instrument_sqlalchemy()`` ahead of ``instrument(service=...)``)
        # reports under this service from now on, not the one it was first seen with
        for state in list(_states.values()):
            state.labels = (("service", self.service), ("pool", state.name))


CONFIG = _Config()


class PoolState(PoolFigures):
    """Everything measured for one named SQLAlchemy pool in this process: the figures every
    pool reports (``_core.pools``), and SQLAlchemy's own (invalidations, the first statements,
    the transactions' ends and idle time, the pool's gauges)."""

    __slots__ = ("invalid_hard", "invalid_soft", "server_wait", "transaction_end", "transaction_idle", "idle_calls",
                 "pool_ref", "critical_at", "last_critical")  # fmt: skip

    def __init__(self, name: str) -> None:
        self.pool_ref: Any = None
        self.critical_at: float = math.inf
        super().__init__(name, CONFIG.service)

    def reset(self) -> None:
        super().reset()
        self.invalid_hard = self.invalid_soft = 0
        self.server_wait: dict[str, Histogram] = {}
        self.transaction_end = Histogram(WAIT_BUCKETS)
        self.transaction_idle: dict[str, Histogram] = {}  # per transaction: idle between its statements
        self.idle_calls: dict[tuple[str, str], int] = {}  # (owner, the call it awaited): transactions
        self.last_critical = -math.inf

    def attach(self, pool: Pool) -> None:
        """Point the gauges at the newest pool of this name and size the critical threshold."""
        self.pool_ref = weakref.ref(pool)
        self.max_connections = None
        if isinstance(pool, QueuePool) and pool._max_overflow >= 0 and pool.size() + pool._max_overflow > 0:
            self.max_connections = pool.size() + pool._max_overflow
        elif type(pool).__name__ == "AssertionPool":  # StaticPool shares one connection: no bound
            self.max_connections = 1
        self.critical_at = critical_at(self.max_connections, CONFIG.critical_ratio)

    def hold_histogram(self, owner: str, limit: int | None = None) -> Histogram:
        return owner_hold(self, owner, CONFIG.max_owners if limit is None else limit)

    def samples(self) -> Iterable[Sample]:
        lb = self.labels
        pool = self.pool_ref() if self.pool_ref is not None else None
        yield from self.common_samples(TABLE, CONFIG.max_owners)
        if isinstance(pool, QueuePool):
            yield "db_pool_connections_idle", lb, pool.checkedin()
            yield "db_pool_size", lb, pool.size()
            yield "db_pool_overflow", lb, pool.overflow()
        if self.max_connections is not None and pool is not None:  # a pool gone can open nothing
            yield "db_pool_connections_max", lb, self.max_connections
        if CONFIG.connection_limit is not None:
            yield "db_server_connection_limit", lb, CONFIG.connection_limit
        yield "db_pool_invalidations_total", lb + (("kind", "hard"),), self.invalid_hard
        yield "db_pool_invalidations_total", lb + (("kind", "soft"),), self.invalid_soft
        for owner, hist in list(self.server_wait.items()):
            yield "db_server_wait_seconds", lb + (("owner", owner),), hist
        for owner, hist in list(self.transaction_idle.items()):
            yield "db_transaction_idle_seconds", lb + (("owner", owner),), hist
        for (owner, call), n in list(self.idle_calls.items()):
            yield "db_transaction_idle_calls_total", lb + (("owner", owner), ("call", call)), n
        if self.transaction_end.count:
            yield "db_transaction_end_seconds", lb, self.transaction_end


_lock = threading.RLock()
_states: dict[str, PoolState] = {}
#: pool identity that survives ``dispose()``: ``recreate()`` hands the engine's own dialect object to
#: the new pool (the ``creator`` function would not do: engines may share one)
_names_by_dialect: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_explicit: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_seen_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
