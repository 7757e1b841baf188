"""SQLAlchemy pool instrumentation: wait, hold, timeouts, connects, with exact in-use accounting.

How it hooks in, and why:

* ``Pool.connect`` (and ``SingletonThreadPool.connect``, which overrides it) is wrapped at class
  level. SQLAlchemy has no "checkout started" or "timed out" event, so the wrapper is the only
  place that sees the wait begin, the wait end and ``TimeoutError``. Wrapping the class covers
  every pool in the process, created before or after :func:`install`, and the pools that
  ``engine.dispose()`` recreates.
* ``checkin``, ``detach``, ``close``, ``invalidate``, ``soft_invalidate`` and ``connect`` are
  class-level :class:`~sqlalchemy.pool.PoolEvents`. Pool events leave no residue after removal
  (engine-level events would set ``Engine._has_events`` forever: about +30 us per statement).
* ``_ConnectionFairy.detach`` is wrapped too: SQLAlchemy hands the record back to the pool
  *before* the ``detach`` event fires, so another thread may already hold it by then; the wrapper
  releases while the record is still ours.
* The checkout side fills one :class:`Held` record into :data:`_held`; every way a connection stops being held
  (checkin, hard invalidation, detach, close) pops it. ``StaticPool`` shares one record between
  all its checkouts, so its holders are keyed by a token per checkout instead (a separate
  wrapper: other pools pay nothing for it). So per-connection state is bounded by the
  connections checked out right now, and ``in_use`` is exact without reading pool internals.
* Nothing on the hot path touches prometheus-client or the logger: it adds to plain ints and
  bucket lists, read by a scrape or the multiprocess flusher.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
import weakref
from bisect import bisect_left
from types import FrameType
from typing import Any

from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import Pool
from sqlalchemy.pool.base import _ConnectionFairy

from telemetry._core import loops as _loops
from telemetry._core import sqltag as _sqltag
from telemetry._core.catalogue import HOLD_BUCKETS, WAIT_BUCKETS
from telemetry._core.holds import SUSPECTS as _suspects
from telemetry._core.log import hook_error
from telemetry._core.otel_private import current_context_getter
from telemetry._core.owner import ACCOUNT, OWNER
from telemetry._core.sqltag import PINGS as _pings
from telemetry._core.sqltag import holder_key as _holder_key
from telemetry._core.stacks import checkout_site as _checkout_site
from telemetry._core.stats import REGISTRY

from .events import _critical_usage, _gc_returned, _on_failed, _released_after_long_hold
from .peers import _observe_server_wait, peer_of
from .state import (
    _ATTR,
    _SKIP,
    CONFIG,
    LOCKS,
    Held,
    PoolState,
    _explicit,
    _flagged,
    _held,
    _names_by_dialect,
    _no_loop,
    _seen_pools,
    _states,
)

#: OpenTelemetry's current context, captured at checkout for ~40 ns (one ContextVar.get)
_otel_context_get = current_context_getter()


_perf = time.perf_counter
_owner_get = OWNER.get
_account_get = ACCOUNT.get
_get_ident = threading.get_ident
_get_running_loop, _current_task = _loops.running_loop, _loops.task_of  # without 3.11's getpid() per call

_last_loop: Any = _no_loop  # weak reference to the loop of the last async checkout


# --------------------------------------------------------------------------- naming and states

def safe_url(engine: Engine) -> str:
    """The engine's URL with user, password and query removed: safe for labels and logs."""
    url = engine.url
    clean = URL.create(url.drivername, host=url.host, port=url.port, database=url.database)
    return clean.render_as_string(hide_password=True)


def _engine_name(engine: Engine) -> str:
    return engine.pool._orig_logging_name or safe_url(engine)


def _find_engine(pool: Pool) -> Engine | None:
    """The engine whose first connect is on the stack (only at a pool's first checkout)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        for key in ("self", "engine"):
            obj = frame.f_locals.get(key)
            if isinstance(obj, Engine) and obj.pool is pool:
                return obj
        frame = frame.f_back
    return None


def _identity_key(pool: Pool) -> Any:
    """The dialect object: one per engine, shared by a pool and the pools ``dispose()`` recreates."""
    return getattr(pool, "_dialect", None)


def _state_for(pool: Pool, engine: Engine | None = None, *, discovered: bool = False) -> Any:
    """Resolve (once per pool instance) the state a pool reports into, or ``_SKIP``. A pool
    found by discovery (it existed before ``instrument()``) does not take the gauges over from
    a pool of the same name already in use."""
    try:
        with LOCKS.registry:
            cached = pool.__dict__.get(_ATTR)
            if cached is not None:
                return cached
            if pool._orig_logging_name == "telemetry-internal":  # the package's own (backlog poller)
                setattr(pool, _ATTR, _SKIP)
                _seen_pools.add(pool)
                return _SKIP
            key = _identity_key(pool)
            name = _explicit.get(key) if key is not None else None
            if name is None:
                if not CONFIG.auto:
                    setattr(pool, _ATTR, _SKIP)
                    _seen_pools.add(pool)
                    return _SKIP
                name = _names_by_dialect.get(key) if key is not None else None
            if name is None:
                engine = engine or _find_engine(pool)
                if engine is not None:
                    name = _engine_name(engine)
                else:
                    name = pool._orig_logging_name or type(pool).__name__

            state = _states.get(name)
            if state is None:
                state = _states[name] = PoolState(name)
                REGISTRY.add(state)
            if key is not None:
                _names_by_dialect[key] = name
            current = state.pool_ref() if state.pool_ref is not None else None
            if not discovered or current is None:
                state.attach(pool)
            setattr(pool, _ATTR, state)
            _seen_pools.add(pool)
            if key is not None:  # the engine's dialect: statements name their owner, first ones timed
                _sqltag.tag_dialect(key)
            return state
    except Exception as exc:
        hook_error("pool.register", exc)
        return _SKIP


def _record_pool(rec: Any) -> Pool | None:
    return getattr(rec, "_ConnectionRecord__pool", None)


# --------------------------------------------------------------------------- the hot path


def _wrap_connect(orig: Any) -> Any:
    def connect(self: Pool) -> Any:
        st = self._telemetry_state  # type: ignore[attr-defined]
        if st is None:
            st = _state_for(self)
        if st is _SKIP:
            return orig(self)
        st.pending += 1
        t0 = _perf()
        try:
            fairy = orig(self)
        except PoolTimeoutError:
            st.pending -= 1
            _on_failed(st, _perf() - t0, "timeout")
            raise
        except Exception as exc:
            st.pending -= 1
            _on_failed(st, _perf() - t0, "error", exc)
            raise
        except BaseException:
            st.pending -= 1
            _on_failed(st, _perf() - t0, "cancelled")
            raise
        t1 = _perf()
        st.pending -= 1
        try:
            waited = t1 - t0
            rec = fairy._connection_record
            if rec.__dict__.pop(_FRESH, False):  # connected during this checkout (rare path)
                waited = _connected(st, rec, waited)
            pinged = _pings.pop(_holder_key(), None) if _pings else None  # pool_pre_ping's round trip
            if pinged is not None:
                waited -= min(pinged, waited)
            wait = st.wait
            wait.counts[bisect_left(WAIT_BUCKETS, waited)] += 1
            wait.total += waited
            st.ok += 1
            account = _account_get()
            if account is not None:
                account.wait += waited
            if fairy._counter == 1:  # not a re-entrant checkout of the same fairy
                try:
                    h = rec._telemetry_held
                except AttributeError:
                    h = rec._telemetry_held = Held()
                h.since = t1
                h.owner = _owner_get()
                h.state = st
                h.context = _otel_context_get()
                h.account = account
                h.site = _checkout_site() if _suspects and h.owner in _suspects else None
                h.serial += 1
                loop = _get_running_loop()
                if loop is None:
                    h.thread = _get_ident()
                    h.task = None
                else:
                    h.thread = None
                    h.task = _current_task(loop)
                    if loop is not _last_loop():
                        _new_loop(loop)
                _held[rec] = h
                if pinged is not None:  # a server connection's wait, as a transaction's first statement's
                    _observe_server_wait(rec, pinged)
                n = st.in_use = st.in_use + 1
                if n >= st.critical_at:
                    _critical_usage(st, n)
        except Exception as exc:
            hook_error("pool.checkout", exc)
        return fairy

    connect.__wrapped__ = orig  # type: ignore[attr-defined]
    return connect


def _wrap_shared(connect: Any) -> Any:
    """StaticPool: every checkout gets the one shared record, and SQLAlchemy fires ``checkin``
    for that record once, at the first close. So each checkout is held under a token of its own
    and released by its own connection's ``_checkin`` (or when it is garbage collected)."""

    def shared_connect(self: Pool) -> Any:
        fairy = connect(self)
        try:
            entry = _held.pop(fairy._connection_record, None)
            if entry is not None:
                token = object()
                _held[token] = entry.copy()  # the record's own Held is reused by the next one
                fairy._checkin = functools.partial(_shared_checkin, fairy, token)
                weakref.finalize(fairy, _release, None, token)
        except Exception as exc:
            hook_error("pool.checkout", exc)
        return fairy

    shared_connect.__wrapped__ = connect  # type: ignore[attr-defined]
    return shared_connect


def _shared_checkin(fairy: Any, token: object, transaction_was_reset: bool = False) -> None:
    _release(None, token)
    _ConnectionFairy._checkin(fairy, transaction_was_reset)


def _wrap_engine_init(orig: Any) -> Any:
    """A new engine's pool reports from creation: its gauges read 0, not absent, until used."""

    def __init__(self: Engine, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        try:
            if CONFIG.auto:
                _state_for(self.pool, self)
        except Exception as exc:
            hook_error("pool.engine_init", exc)

    __init__.__wrapped__ = orig  # type: ignore[attr-defined]
    return __init__


def _wrap_detach(orig: Any) -> Any:
    """Release before SQLAlchemy returns the record to the pool (see the module docstring)."""

    def detach(self: Any) -> None:
        rec = self._connection_record
        if rec is not None and rec in _held:
            _release(None, rec)
        orig(self)

    detach.__wrapped__ = orig  # type: ignore[attr-defined]
    return detach


def _wrap_finalize(orig: Any) -> Any:
    """SQLAlchemy's ``_finalize_fairy`` (a module function: the checkin path and the garbage
    collector's callback both call it). Called with no DBAPI connection for a checked-out
    connection that nobody returned and that is being collected (SQLAlchemy 2.1 passes
    ``is_gc_cleanup=True``, 2.0 the weak reference): it is counted by owner before SQLAlchemy
    returns it. The checkin path pays one call with the same arguments (about 0.1 us)."""
    if "is_gc_cleanup" in inspect.signature(orig).parameters:

        def finalize_fairy(dbapi_connection: Any, connection_record: Any, pool: Any, echo: Any,
                           transaction_was_reset: bool = False, fairy: Any = None,
                           is_gc_cleanup: bool = False) -> Any:  # fmt: skip
            if is_gc_cleanup and getattr(connection_record, "needs_gc", True):
                _collected(connection_record)
            return orig(dbapi_connection, connection_record, pool, echo, transaction_was_reset, fairy, is_gc_cleanup)

    else:  # SQLAlchemy 2.0

        def finalize_fairy(dbapi_connection: Any, connection_record: Any, pool: Any, ref: Any, echo: Any,  # type: ignore[misc]
                           transaction_was_reset: bool = False, fairy: Any = None) -> Any:  # fmt: skip
            if ref is not None and getattr(connection_record, "fairy_ref", None) is ref:
                _collected(connection_record)
            return orig(dbapi_connection, connection_record, pool, ref, echo, transaction_was_reset, fairy)

    finalize_fairy.__wrapped__ = orig  # type: ignore[attr-defined]
    return finalize_fairy


def _collected(rec: Any) -> None:
    """The garbage collector is returning ``rec``'s connection, still checked out."""
    try:
        h = _held.get(rec)
        if h is not None:
            _gc_returned(h, _perf() - h.since)
    except Exception as exc:
        hook_error("pool.gc_returned", exc)


def _release(dbapi_connection: Any, rec: Any, *rest: Any) -> None:
    """checkin / detach / close / invalidate: the connection is no longer held."""
    h = _held.pop(rec, None)
    if h is None:
        return
    try:
        held = _perf() - h.since
        st = h.state
        st.in_use -= 1
        hist = st.hold.get(h.owner) or st.hold_histogram(h.owner)
        hist.counts[bisect_left(HOLD_BUCKETS, held)] += 1
        hist.total += held
        if h.account is not None:
            h.account.hold += held
        if _flagged and rec in _flagged:
            _released_after_long_hold(rec, h, held)
    except Exception as exc:
        hook_error("pool.checkin", exc)


def _on_invalidate(dbapi_connection: Any, rec: Any, exc: Any) -> None:
    try:
        h = _held.get(rec)
        st = h.state if h else _state_of_record(rec)
        if st is not None:
            st.invalid_hard += 1
    except Exception as err:
        hook_error("pool.invalidate", err)
    _release(dbapi_connection, rec)


def _on_soft_invalidate(dbapi_connection: Any, rec: Any, exc: Any) -> None:
    try:
        h = _held.get(rec)
        st = h.state if h else _state_of_record(rec)
        if st is not None:
            st.invalid_soft += 1
    except Exception as err:
        hook_error("pool.soft_invalidate", err)


def _on_connect(dbapi_connection: Any, rec: Any) -> None:
    try:
        rec._telemetry_peer = peer_of(dbapi_connection)
    except Exception as exc:
        rec._telemetry_peer = None
        hook_error("pool.peer", exc)
    try:
        st = _state_of_record(rec)
        if st is not None:
            st.connects += 1
            rec.__dict__[_FRESH] = True  # the checkout that asked for it measures how long it took
    except Exception as exc:
        hook_error("pool.connect", exc)


#: set on a connection record by the ``connect`` event, taken by the checkout that connected it
_FRESH = "_telemetry_fresh"


def _connected(st: PoolState, rec: Any, waited: float) -> float:
    """A checkout that opened a new connection: the connect (from the record's start to now: the
    driver's connect, the dialect's set-up queries, and any wait in a pooler's queue on the way)
    is connect time, not time waiting for the pool. Returns the wait without it."""
    connect = max(0.0, time.time() - (getattr(rec, "starttime", 0) or time.time()))
    connect = min(connect, waited)
    st.connect_time.observe(connect)
    return waited - connect


def _state_of_record(rec: Any) -> PoolState | None:
    pool = _record_pool(rec)
    if pool is None:
        return None
    st = pool.__dict__.get(_ATTR) or _state_for(pool)
    return None if st is _SKIP else st


def _new_loop(loop: Any) -> None:
    """First checkout seen on this event loop: start measuring its lag (once per loop)."""
    global _last_loop
    _last_loop = weakref.ref(loop)
    try:
        from telemetry.integrations.asyncio import watch_event_loop

        watch_event_loop(loop)
    except Exception as exc:
        hook_error("pool.watch_loop", exc)
