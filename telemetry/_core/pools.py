"""What every database connection pool reports, whichever library runs it (SQLAlchemy's pools,
psycopg_pool, asyncpg's): the figures behind the ``db_pool_*`` series, a failed checkout, the
timeout and leak events, and the owner rows the server view joins on.

A pool integration keeps one :class:`PoolFigures` (or a subclass) per named pool and one
``holds.HoldTable`` for its checked-out connections; its hot path adds to the figures' plain
ints and histograms, and ``common_samples`` turns them into the same series for every library.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from . import peers as _peers
from . import sqltag as _sqltag
from .catalogue import CONNECT_BUCKETS, HOLD_BUCKETS, WAIT_BUCKETS
from .holds import SUSPECTS, Held, HoldTable, OwnerRow, owner_hold, suspect
from .integration import Integration
from .log import emit, hook_error, suppressed, trace_ids
from .loops import running_loop, task_of
from .otel_private import current_context_getter
from .owner import ACCOUNT, OWNER
from .peers import peer_of as _peer_of
from .stacks import checkout_site
from .stats import OWNER_SOURCES, REGISTRY, Histogram, Sample

_perf = time.perf_counter

#: what a server or pooler says when it refuses a connection for its limit -> the reason label
REFUSALS = (
    ("too many clients", "too_many_clients"),  # PostgreSQL: max_connections reached
    ("remaining connection slots are reserved", "reserved_slots"),  # the reserved slots left
    ("no more connections allowed", "pooler_max_client_conn"),  # pgbouncer: max_client_conn
)


def refusal(exc: BaseException | None) -> str | None:
    """The reason label of a connect refused for a connection limit, else None."""
    text = str(exc).lower() if exc is not None else ""
    return next((reason for words, reason in REFUSALS if words in text), None)


class PoolFigures:
    """The figures of one named pool in this process, common to every pool library (shared by
    the pools recreated under the same name, so counters never go backwards)."""

    __slots__ = ("name", "labels", "in_use", "pending", "ok", "timeouts", "errors", "refused", "cancelled",
                 "connects", "owner_overflow", "wait", "connect_time", "hold", "leaked", "gc_returned",
                 "max_connections", "last_timeout_log", "__weakref__")  # fmt: skip

    def __init__(self, name: str, service: str) -> None:
        self.name = name
        self.labels: tuple[tuple[str, str], ...] = (("service", service), ("pool", name))
        self.max_connections: int | None = None
        self.reset()

    def reset(self) -> None:
        self.in_use = self.pending = 0
        self.ok = self.timeouts = self.errors = self.cancelled = 0
        self.refused: dict[str, int] = {}  # connects refused for a connection limit, by reason
        self.connects = self.owner_overflow = 0
        self.wait = Histogram(WAIT_BUCKETS)
        self.connect_time = Histogram(CONNECT_BUCKETS)
        self.hold: dict[str, Histogram] = {}
        #: connections that outlived their request or task / that only the garbage collector
        #: returned, by (owner, the line that checked them out)
        self.leaked: dict[tuple[str, str], int] = {}
        self.gc_returned: dict[tuple[str, str], int] = {}
        self.last_timeout_log = -float("inf")

    def hold_histogram(self, owner: str, limit: int) -> Histogram:
        return owner_hold(self, owner, limit)

    def common_samples(self, table: HoldTable, max_owners: int) -> Iterable[Sample]:
        """The series every pool library reports (the library adds its gauges of the pool)."""
        lb = self.labels
        yield "db_pool_connections_in_use", lb, self.in_use
        yield "db_pool_pending_requests", lb, self.pending
        yield "db_pool_connections_held_too_long", lb, table.flagged_of(self)
        for owner, n in table.held_by_owner(self, max_owners).items():
            yield "db_pool_connections_in_use_by_owner", lb + (("owner", owner),), n
        for result, n in (("ok", self.ok), ("timeout", self.timeouts), ("error", self.errors),
                          ("cancelled", self.cancelled)):  # fmt: skip
            yield "db_pool_checkouts_total", lb + (("result", result),), n
        yield "db_pool_timeouts_total", lb, self.timeouts
        yield "db_pool_connect_errors_total", lb, self.errors
        for reason, n in list(self.refused.items()):
            yield "db_pool_connects_refused_total", lb + (("reason", reason),), n
        yield "db_pool_connects_total", lb, self.connects
        yield "telemetry_owner_overflow_total", lb, self.owner_overflow
        for (owner, site), n in list(self.leaked.items()):
            yield "db_pool_connections_leaked_total", lb + (("owner", owner), ("call_site", site)), n
        for (owner, site), n in list(self.gc_returned.items()):
            yield "db_pool_connections_gc_returned_total", lb + (("owner", owner), ("call_site", site)), n
        yield "db_pool_checkout_wait_seconds", lb, self.wait
        yield "db_pool_connect_seconds", lb, self.connect_time
        for owner, hist in list(self.hold.items()):
            yield "db_connection_hold_seconds", lb + (("owner", owner),), hist


def critical_at(most: int | None, ratio: float) -> float:
    """The number of connections in use from which the critical-usage event fires: the first
    count whose share of ``most`` is above ``ratio`` (never, without a bound)."""
    if not most:
        return math.inf
    n = max(1, math.floor(ratio * most))
    while n / most <= ratio:
        n += 1
    return n


def failed_checkout(st: PoolFigures, waited: float, result: str, table: HoldTable,
                    exc: BaseException | None = None) -> None:  # fmt: skip
    """A checkout that ended without a connection: ``timeout`` (with its event), ``error`` (a
    refused connect counted by reason) or ``cancelled``; its wait is observed either way."""
    try:
        st.wait.observe(waited)
        account = ACCOUNT.get()
        if account is not None:
            account.wait += waited
        if result == "timeout":
            st.timeouts += 1
            _timeout_event(st, waited, table)
        elif result == "error":
            st.errors += 1
            reason = refusal(exc)
            if reason is not None:
                st.refused[reason] = st.refused.get(reason, 0) + 1
        else:
            st.cancelled += 1
    except Exception as err:
        hook_error("pool.checkout_failed", err)


def _timeout_event(st: PoolFigures, waited: float, table: HoldTable) -> None:
    now = time.monotonic()
    if now - st.last_timeout_log < 1.0:
        suppressed("db_pool_timeout")
        return
    st.last_timeout_log = now
    emit(
        "error", "db_pool_timeout",
        pool=st.name, owner=OWNER.get(), waited_seconds=round(waited, 3),
        checked_out=st.in_use, max_connections=st.max_connections, waiters=st.pending,
        longest_holders=table.longest(st, _perf()), **trace_ids(),
    )  # fmt: skip


#: seconds after its request or task ended before a connection still checked out counts as
#: leaked (a response's last bytes and the library's own clean-up come first)
LEAK_GRACE_SECONDS = 1.0
#: distinct call sites per pool and kind in the leak counters (then "other")
MAX_LEAK_SITES = 20
_last_leak_log: dict[str, float] = {}


def count_leak(h: Held, kind: str, max_owners: int, **fields: Any) -> None:
    """One leaked connection of ``h``'s pool: ``kind`` "leaked" (it outlived its request or
    task) or "gc_returned" (the garbage collector returned it), by owner (folded like the hold's)
    and line, and its event, at most one per kind a second (the rest counted as suppressed)."""
    st = h.state
    counts = st.leaked if kind == "leaked" else st.gc_returned
    owner = h.owner if h.owner in st.hold or len(st.hold) < max_owners else "other"
    site = h.site or "unknown"
    if (owner, site) not in counts and len({s for _o, s in counts}) >= MAX_LEAK_SITES:
        site = "other"
    counts[(owner, site)] = counts.get((owner, site), 0) + 1
    suspect(h.owner)
    event = "db_connection_leaked" if kind == "leaked" else "db_connection_gc_returned"
    now = time.monotonic()
    if now - _last_leak_log.get(event, -1e9) < 1.0:
        suppressed(event)
        return
    _last_leak_log[event] = now
    message = ("a connection is still checked out after the request or task that took it ended: close it on "
               "every path (with / async with)") if kind == "leaked" else (
              "the garbage collector returned a connection that the code never closed")  # fmt: skip
    emit("warning", event, pool=st.name, owner=h.owner, call_site=h.site, message=message, **fields,
         **trace_ids(h.context))  # fmt: skip


def leak_scanner(table: HoldTable, max_owners: Callable[[], int]) -> Callable[[float], int]:
    """The housekeeper's leak scan of ``table``: connections still held a grace after their
    request or task ended."""

    def found(h: Held, after: float) -> None:
        count_leak(h, "leaked", max_owners(), held_seconds=round(_perf() - h.since, 3),
                   after_end_seconds=round(after, 3))  # fmt: skip

    return lambda now: table.scan_leaks(now, LEAK_GRACE_SECONDS, found)


def owner_rows(table: HoldTable, service: str, peer: Callable[[Any], Any],
               cursor: Callable[[Any], str] | None = None,
               token: Callable[[Any], str] | None = None) -> list[OwnerRow]:  # fmt: skip
    """The connections of ``table`` held right now whose server identity ``peer(key)`` knows
    (``(backend pid, local port, local address)``) or whose statement tags carry a token, as the
    rows the shared view joins on; ``cursor(key)``: the server-side cursor open on it (joins its
    untagged FETCH and CLOSE); ``token(key)``: its tags' ``service/pid@host#slot``."""
    out: list[OwnerRow] = []
    now_wall, now = time.time(), _perf()
    for key, h in list(table.held.items()):
        try:
            found = peer(key)
            conn = token(key) if token else ""
        except Exception:  # a connection closed meanwhile: not joined this time
            found, conn = None, ""
        if not found and not conn:
            continue
        found = found or (None, None, "")
        trace_id = trace_ids(h.context).get("trace_id", "") if h.context is not None else ""
        out.append(OwnerRow(found[0], found[1], service, h.owner, round(now_wall - (now - h.since), 3), trace_id,
                            found[2] if len(found) > 2 else "", cursor(key) if cursor else "", conn))  # fmt: skip
    return out


# --------------------------------------------------------------------------- a library pool's hot path

class PoolConfig:
    """The settings a library pool's hot path reads, copied once at install."""

    service = "unknown"
    hold_threshold = 5.0
    max_owners = 100
    application_name = True

    def load(self, settings: Any) -> None:
        self.service = settings.service
        self.hold_threshold = settings.hold_threshold_seconds
        self.max_owners = settings.max_owners
        self.application_name = settings.application_name


_otel_context_get = current_context_getter()
_owner_get, _account_get = OWNER.get, ACCOUNT.get
_ident = threading.get_ident
#: released hold records, reused by the next checkout (a new one costs about 0.1 us); bounded
_free: list[Held] = []
_MAX_FREE = 256


def checked_out(st: PoolFigures, table: HoldTable, key: Any, waited: float, since: float, loop: Any = None,
                _bisect: Any = bisect_left, _buckets: tuple[float, ...] = WAIT_BUCKETS,
                _first: float = WAIT_BUCKETS[0], _pop: Any = _free.pop,
                _account: Any = _account_get, _owner: Any = _owner_get, _context: Any = _otel_context_get,
                _running_loop: Any = running_loop, _task_of: Any = task_of, _ident: Any = _ident, _suspects: set[str] = SUSPECTS) -> None:  # fmt: skip
    """A checkout of ``key`` (the connection handed out) that waited ``waited`` seconds: its wait
    observed, its holder noted in ``table`` (owner, thread or task, trace context, request).
    ``loop``: the event loop the checkout runs on, where the library keeps it (asyncpg's pool):
    its current task is the holder, found without asking which loop runs (about 0.2 us less per
    checkout, cold in a busy loop). The keyword defaults bind what it calls as locals."""
    wait = st.wait
    wait.counts[0 if waited <= _first else _bisect(_buckets, waited)] += 1  # most checkouts wait for nothing
    wait.total += waited
    st.ok += 1
    account = _account()
    if account is not None:
        account.wait += waited
    try:
        h = _pop()
    except IndexError:
        h = Held()
    h.serial += 1  # a reused record is a new checkout: the watchdog's race checks the serial
    h.since = since
    h.state = st
    h.account = account
    h.context = _context()
    h.owner = owner = _owner()
    h.site = checkout_site() if _suspects and owner in _suspects else None
    task = _task_of(loop) if loop is not None else None  # the pool's own loop, while it runs
    if task is None:
        loop = _running_loop()
        h.thread, h.task = (_ident(), None) if loop is None else (None, _task_of(loop))
    else:
        h.thread, h.task = None, task
    table.held[key] = h
    st.in_use += 1


def released(table: HoldTable, key: Any, config: PoolConfig, _perf: Any = _perf, _bisect: Any = bisect_left,
             _buckets: tuple[float, ...] = HOLD_BUCKETS, _free: list[Held] = _free) -> None:  # fmt: skip
    """``key``'s connection is back: its hold observed by owner, and "released" after a long
    hold that was reported."""
    h = table.held.pop(key, None)
    if h is None:
        return
    held = _perf() - h.since
    st = h.state
    st.in_use -= 1
    hist = st.hold.get(h.owner) or st.hold_histogram(h.owner, config.max_owners)
    hist.counts[_bisect(_buckets, held)] += 1
    hist.total += held
    if h.account is not None:
        h.account.hold += held
    if table.flagged and key in table.flagged:
        table.released_after_long_hold(key, h, held, config.hold_threshold)
    if len(_free) < _MAX_FREE:
        h.account = h.context = h.task = None  # keep nothing of the request alive
        _free.append(h)


class LibraryPoolIntegration(Integration):
    """The lifecycle of a library's pools (psycopg_pool's, asyncpg's): its settings copy, its
    ``HoldTable``, its figures by pool name, the class-level patches ``(class, attribute,
    wrapper factory)``, its owner rows for the server view; ``forget()`` drops what the library
    module keeps of the pools it has seen (at uninstall and in a forked child)."""

    config: PoolConfig
    table: HoldTable
    figures: dict[str, PoolFigures]
    patches: tuple[tuple[type, str, Callable[[Any], Any]], ...] = ()
    tags = False  # its patches tag statements: the tags' settings and this process's name are loaded

    def __init__(self) -> None:
        self.patched: list[tuple[type, str, Any]] = []
        self.scan_leaks = leak_scanner(self.table, lambda: self.config.max_owners)

    def token(self, key: Any) -> str:
        """The token the statements of ``key``'s connection carry (where the library tags them)."""
        return ""

    def cursor(self, key: Any) -> str:
        """The server-side cursor ``key``'s connection has open (joins its untagged FETCH)."""
        return ""

    def owner_table(self) -> list[OwnerRow]:
        return owner_rows(self.table, self.config.service, _peer_of, self.cursor, self.token)

    def forget(self) -> None:
        """Drop the library module's own memory of pools (overridden where it keeps one)."""

    def install(self, runtime: Any) -> None:
        self.config.load(runtime.settings)
        if self.tags:
            _sqltag.load(runtime.settings, _peers.application_name(runtime.settings.service))
        for st in self.figures.values():
            st.labels = (("service", self.config.service), ("pool", st.name))
        if not self.patched:
            for cls, attr, wrap in self.patches:
                orig = cls.__dict__[attr]
                self.patched.append((cls, attr, orig))
                setattr(cls, attr, wrap(orig))
        if self.owner_table not in OWNER_SOURCES:
            OWNER_SOURCES.append(self.owner_table)

    def uninstall(self) -> None:
        while self.patched:
            cls, attr, orig = self.patched.pop()
            setattr(cls, attr, orig)
        if self.owner_table in OWNER_SOURCES:
            OWNER_SOURCES.remove(self.owner_table)
        mine = tuple(type(st) for st in self.figures.values())
        REGISTRY.discard(lambda source: isinstance(source, mine) and source in self.figures.values())
        self.figures.clear()
        self.table.clear()
        self.forget()

    def after_fork(self) -> None:
        self.table.after_fork()
        self.forget()
        if self.tags:  # the child's own pid in its tags
            _sqltag.CONFIG.application = _peers.application_name(self.config.service)
            _sqltag.reset()

    def tick(self, now: float) -> None:
        self.table.scan(now, self.config.hold_threshold)
        self.scan_leaks(now)
