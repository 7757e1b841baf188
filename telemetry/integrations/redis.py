"""redis-py connection pools: in use against the pool's limit, callers waiting, checkout wait,
timeouts and "too many connections", hold time by owner, and connections held too long.

``get_connection`` and ``release`` are wrapped at class level on ``ConnectionPool`` and
``BlockingConnectionPool``, sync (``redis.connection``) and asyncio (``redis.asyncio``), so every
pool in the process is covered, created before or after ``instrument()``: the app's own, and
those kombu (Celery's Redis broker) and Celery's Redis result backend create. A pub/sub
subscription takes its connection at the first ``subscribe`` and gives it back at ``close``: a
status stream that keeps one open shows up as a long hold by its route.

A pool is named ``host:port/db`` (``unix:path/db``), never with its password; a pool of
another class or limit on the same address is ``host:port/db#2`` (and so on), each with its own
limit; pools alike on one address share a series. ``BlockingConnectionPool`` raises ``ConnectionError("No connection
available.")`` after its timeout (counted as ``result="timeout"``); ``ConnectionPool`` raises
"Too many connections" past ``max_connections`` (``result="too_many"``).
"""

from __future__ import annotations

import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable
from types import FrameType
from typing import Any

from telemetry._core.catalogue import HOLD_BUCKETS, WAIT_BUCKETS
from telemetry._core.holds import Held, HoldTable, owner_hold
from telemetry._core.integration import Integration
from telemetry._core.log import hook_error
from telemetry._core.loops import holder as _holder
from telemetry._core.owner import OWNER
from telemetry._core.stats import REGISTRY, Histogram, Sample

_perf = time.perf_counter
_owner_get = OWNER.get
_get_ident = threading.get_ident
_ATTR = "_telemetry_redis"
#: a limit above this is redis-py's "no limit" default (2**31)
UNBOUNDED = 1_000_000


class _Config:
    service = "unknown"
    hold_threshold = 5.0
    max_owners = 100


CONFIG = _Config()


class RedisPoolState:
    """Everything measured for one named Redis pool in this process."""

    __slots__ = ("name", "role", "labels", "in_use", "pending", "ok", "timeouts", "too_many", "errors",
                 "wait", "hold", "max_connections", "owner_overflow")  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        #: "" for the app's pools; a role (``celery-broker``, ``celery-result-backend``) for the
        #: pools Celery keeps connections of by design: their connections are owned by the role
        #: and never reported as held too long
        self.role = ""
        self.labels = (("service", CONFIG.service), ("pool", name))
        self.max_connections: int | None = None
        self.reset()

    def reset(self) -> None:
        self.in_use = self.pending = 0
        self.ok = self.timeouts = self.too_many = self.errors = self.owner_overflow = 0
        self.wait = Histogram(WAIT_BUCKETS)
        self.hold: dict[str, Histogram] = {}

    def hold_histogram(self, owner: str) -> Histogram:
        return owner_hold(self, owner, CONFIG.max_owners)

    def samples(self) -> Iterable[Sample]:
        lb = self.labels
        yield "redis_pool_connections_in_use", lb, self.in_use
        yield "redis_pool_pending_requests", lb, self.pending
        yield "redis_pool_connections_held_too_long", lb, held_too_long(self)
        if self.max_connections is not None:
            yield "redis_pool_connections_max", lb, self.max_connections
        for result, n in (("ok", self.ok), ("timeout", self.timeouts), ("too_many", self.too_many),
                          ("error", self.errors)):  # fmt: skip
            yield "redis_pool_checkouts_total", lb + (("result", result),), n
        yield "redis_pool_checkout_wait_seconds", lb, self.wait
        for owner, hist in list(self.hold.items()):
            yield "redis_connection_hold_seconds", lb + (("owner", owner),), hist


_lock = threading.RLock()
_states: dict[str, RedisPoolState] = {}
#: (address, pool class, limit, role) -> series name (``_state``)
_kinds: dict[tuple[str, str, int | None, str], str] = {}
#: where the first checkout of a pool comes from -> the role of its connections: kombu's broker
#: channels keep theirs for the channel's life (the consumer's BRPOP, the producer's channel), the
#: result backend's pub/sub for the worker's life. Long by design, not a leak.
_ROLES = (("kombu/transport/redis", "celery-broker"), ("celery/backends/redis", "celery-result-backend"))


def _role() -> str:
    """The role of a pool from the code taking its first connection (rare path: once a pool)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            break
        filename = frame.f_code.co_filename.replace("\\", "/")
        for needle, role in _ROLES:
            if needle in filename:
                return role
        frame = frame.f_back
    return ""
#: distinct pool names per process; further pools share OTHER (docs/reliability.md)
MAX_POOLS = 50
OTHER = "other"
#: the Redis connections held right now (``_holds``; Celery's role pools are never reported)
TABLE = HoldTable("redis_connection_held_too_long", with_trace=False)
_held: dict[Any, Held] = TABLE.held
_flagged: dict[Any, int] = TABLE.flagged
_HOLD_ATTR = "_telemetry_hold"


def _hold(connection: Any, since: float, owner: str, st: RedisPoolState) -> Held:
    """The connection's hold record, reused at each checkout (a new object costs ~0.15 us)."""
    try:
        h: Held = connection.__dict__[_HOLD_ATTR]
    except (KeyError, AttributeError):
        h = Held()
        try:
            connection.__dict__[_HOLD_ATTR] = h
        except AttributeError:  # a connection class with __slots__: a record per checkout
            pass
    h.since, h.owner, h.state, h.serial = since, owner, st, h.serial + 1
    h.context = h.account = None
    return h


def pool_name(pool: Any) -> str:
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}/{db}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def _state(pool: Any) -> RedisPoolState:
    """The series of ``pool``. Pools on one address with the same class and limit share a
    series (a pool per request, or kombu's pools, add nothing); one with another class or limit
    gets its own: the first such pool on an address is named ``host:port/db``, the next
    ``host:port/db#2`` and so on (an exhausted small pool is not hidden behind a large idle one).
    Past ``MAX_POOLS`` names, further pools share ``other`` (its limit unknown)."""
    st = pool.__dict__.get(_ATTR)
    if st is not None:
        return st
    with _lock:
        address = pool_name(pool)
        limit = getattr(pool, "max_connections", None)
        limit = limit if isinstance(limit, int) and limit < UNBOUNDED else None
        role = _role()
        kind = (address, type(pool).__name__, limit, role)
        name = _kinds.get(kind)
        if name is None:
            n = 1 + sum(1 for k in _kinds if k[0] == address)
            name = address if n == 1 else f"{address}#{n}"
            if len(_states) >= MAX_POOLS:
                name, limit = OTHER, None
            else:
                _kinds[kind] = name
        st = _states.get(name)
        if st is None:
            st = _states[name] = RedisPoolState(name)
            REGISTRY.add(st)
        st.max_connections = limit
        st.role = role if name != OTHER else ""
        pool.__dict__[_ATTR] = st
        return st


def _failure(st: RedisPoolState, waited: float, exc: BaseException) -> None:
    try:
        st.pending -= 1
        st.wait.observe(waited)
        text = str(exc)
        if "No connection available" in text:
            st.timeouts += 1
        elif "Too many connections" in text:
            st.too_many += 1
        else:
            st.errors += 1
    except Exception as err:
        hook_error("redis.checkout_failed", err)


def _account_release(connection: Any, h: Held) -> None:
    try:
        held = _perf() - h.since
        st = h.state
        st.in_use -= 1
        hist = st.hold.get(h.owner) or st.hold_histogram(h.owner)
        hist.counts[bisect_left(HOLD_BUCKETS, held)] += 1
        hist.total += held
        if _flagged and connection in _flagged:
            TABLE.released_after_long_hold(connection, h, held, CONFIG.hold_threshold)
    except Exception as exc:
        hook_error("redis.release", exc)


def _wrap_get(orig: Any) -> Any:
    def get_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.__dict__.get(_ATTR)
        if st is None:
            st = _state(self)
        st.pending += 1
        t0 = _perf()
        try:
            connection = orig(self, *args, **kwargs)
        except BaseException as exc:
            _failure(st, _perf() - t0, exc)
            raise
        t1 = _perf()
        st.pending -= 1
        try:
            waited = t1 - t0
            wait = st.wait
            wait.counts[bisect_left(WAIT_BUCKETS, waited)] += 1
            wait.total += waited
            st.ok += 1
            if connection not in _held:
                st.in_use += 1
            h = _hold(connection, t1, st.role or _owner_get(), st)
            h.thread, h.task = _get_ident(), None
            _held[connection] = h
        except Exception as exc:
            hook_error("redis.checkout", exc)
        return connection

    get_connection.__wrapped__ = orig  # type: ignore[attr-defined]
    return get_connection


def _wrap_get_async(orig: Any) -> Any:
    async def get_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.__dict__.get(_ATTR)
        if st is None:
            st = _state(self)
        st.pending += 1
        t0 = _perf()
        try:
            connection = await orig(self, *args, **kwargs)
        except BaseException as exc:
            _failure(st, _perf() - t0, exc)
            raise
        t1 = _perf()
        st.pending -= 1
        try:
            waited = t1 - t0
            wait = st.wait
            wait.counts[bisect_left(WAIT_BUCKETS, waited)] += 1
            wait.total += waited
            st.ok += 1
            if connection not in _held:
                st.in_use += 1
            h = _hold(connection, t1, st.role or _owner_get(), st)
            h.thread, h.task = _holder()
            _held[connection] = h
        except Exception as exc:
            hook_error("redis.checkout", exc)
        return connection

    get_connection.__wrapped__ = orig  # type: ignore[attr-defined]
    return get_connection


def _wrap_release(orig: Any) -> Any:
    def release(self: Any, connection: Any, *args: Any, **kwargs: Any) -> Any:
        entry = _held.pop(connection, None)  # idempotent: a subclass's release may call the base's
        if entry is not None:
            _account_release(connection, entry)
        return orig(self, connection, *args, **kwargs)

    release.__wrapped__ = orig  # type: ignore[attr-defined]
    return release


def _wrap_release_async(orig: Any) -> Any:
    async def release(self: Any, connection: Any, *args: Any, **kwargs: Any) -> Any:
        entry = _held.pop(connection, None)
        if entry is not None:
            _account_release(connection, entry)
        return await orig(self, connection, *args, **kwargs)

    release.__wrapped__ = orig  # type: ignore[attr-defined]
    return release


# --------------------------------------------------------------------------- long holds


def scan_long_holds(now: float | None = None) -> int:
    """Report connections held past the threshold while still held (a subscription kept open
    by a stream); returns how many were new. Celery's role pools hold by design: never."""
    return TABLE.scan(_perf() if now is None else now, CONFIG.hold_threshold,
                      skip=lambda h: bool(h.state.role) or h.state.name == INTERNAL)  # fmt: skip


def held_too_long(st: RedisPoolState) -> int:
    return TABLE.flagged_of(st)


# --------------------------------------------------------------------------- lifecycle

_patched: list[tuple[type, str, Any]] = []


def _classes() -> list[tuple[type, bool]]:
    import redis.connection as sync
    from redis.asyncio import connection as aio

    return [(sync.ConnectionPool, False), (sync.BlockingConnectionPool, False),
            (aio.ConnectionPool, True), (aio.BlockingConnectionPool, True)]  # fmt: skip


def install() -> None:
    with _lock:
        if _patched:
            return
        for cls, is_async in _classes():
            for method, wrap in (("get_connection", _wrap_get_async if is_async else _wrap_get),
                                 ("release", _wrap_release_async if is_async else _wrap_release)):  # fmt: skip
                orig = cls.__dict__.get(method)
                if orig is None:
                    continue
                _patched.append((cls, method, orig))
                setattr(cls, method, wrap(orig))


def uninstall() -> None:
    with _lock:
        for cls, method, orig in reversed(_patched):
            setattr(cls, method, orig)
        _patched.clear()
        TABLE.clear()
        _states.clear()
        _kinds.clear()
        REGISTRY.discard(lambda source: isinstance(source, RedisPoolState))


def after_fork_in_child() -> None:
    """redis-py pools reset themselves in a child (pid check); so does what they held."""
    global _lock
    _lock = threading.RLock()
    TABLE.after_fork()


class RedisIntegration(Integration):
    """Every redis-py pool in the process, sync and asyncio."""

    name = "redis"

    def install(self, runtime: Any) -> None:
        CONFIG.service = runtime.settings.service
        CONFIG.hold_threshold = runtime.settings.hold_threshold_seconds
        CONFIG.max_owners = runtime.settings.max_owners
        install()

    def uninstall(self) -> None:
        uninstall()

    def after_fork(self) -> None:
        after_fork_in_child()

    def tick(self, now: float) -> None:
        scan_long_holds()


def states() -> dict[str, RedisPoolState]:
    return dict(_states)



#: the state of the package's own pools: nobody exports it, and its holds are never reported
INTERNAL = "telemetry-internal"


def exclude(pool: Any) -> None:
    """The package's own pool (the Celery backlog poller's): measured into a state nobody exports,
    its connections never reported as held too long (a scan that met the poller mid-command did)."""
    pool.__dict__[_ATTR] = RedisPoolState(INTERNAL)
