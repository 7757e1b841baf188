"""One connection-pool accounting for every pool the package hooks (SQLAlchemy, redis-py, and
ready for psycopg's pool): the hold record of a checked-out connection, the table of connections
held right now, and the long-hold watchdog over it with its release race.

A pool integration keeps one :class:`HoldTable`: its hot path puts a :class:`Held` record in
``table.held`` at checkout and pops it at release (measuring the hold into its own figures), its
housekeeper tick calls :meth:`HoldTable.scan`, and a release of a connection the watchdog
reported calls :meth:`HoldTable.released_after_long_hold`. Reporting and releasing race: the
flag is set and checked under ``table.lock``, so "held" is always logged before "released" and a
connection released before the report is never reported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import stacks as _stacks
from .catalogue import HOLD_BUCKETS
from .log import emit, hook_error, trace_ids
from .stats import Histogram, owner_histogram


class Held:
    """One checked-out connection: who holds it, since when, for which pool and request.

    One instance per connection record, reused at every checkout of that record (allocating a
    fresh object per checkout costs about 0.15 us, ten times a tuple); ``serial`` tells one
    checkout from the next. A record cannot be checked out again before its release has run
    (SQLAlchemy fires ``checkin`` before returning the record; ``detach`` is released before
    SQLAlchemy hands it back), so a release always reads its own checkout's fields.
    """

    __slots__ = ("since", "owner", "state", "thread", "task", "context", "account", "serial", "site", "leaked")
    since: float  # perf_counter at checkout
    owner: str
    state: Any  # the pool's figures (a PoolState, a RedisPoolState)
    thread: int | None  # the holding thread (sync code) ...
    task: Any  # ... or the holding asyncio task
    context: Any  # the OpenTelemetry context at checkout (trace ids in events)
    account: Any  # the HTTP request's wait/hold totals (a RequestAccount), when in one
    serial: int
    site: str | None  # the line that checked it out, read only for owners that leaked before
    leaked: int  # the serial of the checkout found outliving its request (each reported once)

    def __init__(self) -> None:
        self.serial = 0
        self.leaked = -1
        self.site = None

    def copy(self) -> Held:
        other = Held()
        for name in Held.__slots__:
            setattr(other, name, getattr(self, name))
        return other


#: owners whose connections outlived their request or task: their checkouts note the line that
#: checked out (``stacks.checkout_site``, about 2 us, paid by nobody else) so that the next leak
#: names it. Bounded; the hot path reads the set, never rebinds it.
SUSPECTS: set[str] = set()
MAX_SUSPECTS = 32


def suspect(owner: str) -> None:
    if len(SUSPECTS) < MAX_SUSPECTS:
        SUSPECTS.add(owner)


def owner_hold(figures: Any, owner: str, limit: int) -> Histogram:
    """The hold histogram of ``owner`` in a pool's figures (``figures.hold``); past ``limit``
    owners a new one folds into ``other``, counted in ``figures.owner_overflow``."""
    hist, overflow = owner_histogram(figures.hold, owner, HOLD_BUCKETS, limit)
    if overflow:
        figures.owner_overflow += 1
    return hist


class OwnerRow(NamedTuple):
    """A connection held right now whose server identity is known: what a process publishes in
    its file (a JSON array) and the shared view joins server and pooler rows on."""

    backend_pid: int | None  # the server backend's pid (through a pooler: the pooler's)
    local_port: int | None  # the client side's TCP port
    service: str
    owner: str
    since: float  # epoch seconds the hold began
    trace_id: str
    local_address: str = ""  # the client side's address (rows of older versions lack it)
    cursor: str = ""  # the server-side cursor it has open: its FETCH and CLOSE carry no tag
    conn: str = ""  # its statement tags' token, ``service/pid@host#slot`` (they carry no owner)

    @classmethod
    def read(cls, row: Any) -> OwnerRow | None:
        """A row as a process file holds it (a list), or None when it is not one."""
        try:
            return row if isinstance(row, cls) else cls(*row[:9])
        except TypeError:
            return None


class HoldTable:
    """The connections of one kind of pool held right now, and the ones reported held too long."""

    def __init__(self, event: str, *, with_trace: bool = True) -> None:
        self.event = event  # "db_connection_held_too_long", "redis_connection_held_too_long"
        self.with_trace = with_trace  # events carry the holder's trace ids
        #: connection record (or a checkout token) -> the Held record of its holder
        self.held: dict[Any, Held] = {}
        #: records reported by the watchdog -> the serial of the checkout reported (still held);
        #: changed under :attr:`lock` only
        self.flagged: dict[Any, int] = {}
        self.lock = threading.Lock()

    def clear(self) -> None:
        self.held.clear()
        self.flagged.clear()
        SUSPECTS.clear()

    def after_fork(self) -> None:
        """A child: the parent's holders are not its own, and a parent thread may hold the lock."""
        self.lock = threading.Lock()
        self.clear()

    def _trace(self, h: Held) -> dict[str, str]:
        return trace_ids(h.context) if self.with_trace else {}

    def scan(self, now: float, threshold: float, skip: Callable[[Held], bool] | None = None) -> int:
        """Report connections held past ``threshold`` while still held; returns how many were
        new. The holder's stack is read only for those reported."""
        reported = 0
        for key, h in list(self.held.items()):
            serial, since = h.serial, h.since
            if now - since < threshold or key in self.flagged or (skip is not None and skip(h)):
                continue
            with self.lock:
                # flag first, then check it is still the same checkout: a release that popped it
                # before this check finds no report to follow up, one after it finds the flag (and
                # waits for the lock, so "released" is always logged after "held")
                self.flagged[key] = serial
                if self.held.get(key) is not h or h.serial != serial:
                    del self.flagged[key]
                    continue
                reported += 1
                try:
                    frames = _stacks.holder_stack(h.thread, h.task)
                    emit(
                        "warning", self.event,
                        status="held", pool=h.state.name, owner=h.owner,
                        held_seconds=round(now - since, 3), threshold_seconds=threshold,
                        call_site=_stacks.call_site(frames), frames=frames, **self._trace(h),
                    )  # fmt: skip
                except Exception as exc:
                    hook_error(f"{self.event}.scan", exc)
        return reported

    def scan_leaks(self, now: float, grace: float, found: Callable[[Held, float], None]) -> int:
        """Connections still checked out ``grace`` seconds after the request or task that took
        them ended (its account's ``ended``): ``found(held, seconds since that end)`` once per
        checkout. A checkout made after the end (a task the request spawned) is not one."""
        n = 0
        for h in list(self.held.values()):
            account = h.account
            ended = account.ended if account is not None else 0.0
            if not ended or now - ended < grace or h.leaked == h.serial or h.since > ended:
                continue
            h.leaked = h.serial
            n += 1
            try:
                suspect(h.owner)
                found(h, now - ended)
            except Exception as exc:
                hook_error(f"{self.event}.leak", exc)
        return n

    def released_after_long_hold(self, key: Any, h: Held, held: float, threshold: float) -> None:
        """The release of a connection the watchdog may have reported: "released", once."""
        with self.lock:
            if self.flagged.get(key) != h.serial:
                return  # the report lost the race: it saw the release and was withdrawn
            del self.flagged[key]
            emit(
                "warning", self.event,
                status="released", pool=h.state.name, owner=h.owner, held_seconds=round(held, 3),
                threshold_seconds=threshold, **self._trace(h),
            )  # fmt: skip

    def flagged_of(self, state: Any) -> int:
        """Connections of ``state``'s pool reported held too long and still held."""
        return sum(1 for key, serial in list(self.flagged.items())
                   if (h := self.held.get(key)) is not None and h.state is state and h.serial == serial)  # fmt: skip

    def held_by_owner(self, state: Any, limit: int) -> dict[str, int]:
        """Connections of ``state``'s pool held right now, by owner: who holds them now, ended
        or not (a stream holding its session shows here before its hold ends). Past ``limit``
        owners of the pool's hold histograms (``state.hold``) a new one counts as ``other``, as its
        hold will."""
        out: dict[str, int] = {}
        known = state.hold
        for h in list(self.held.values()):
            if h.state is state:
                owner = h.owner if h.owner in known or len(known) < limit else "other"
                out[owner] = out.get(owner, 0) + 1
        return out

    def longest(self, state: Any, now: float, limit: int = 5) -> list[dict[str, Any]]:
        """The ``limit`` longest holders of ``state``'s pool right now."""
        rows = [(now - h.since, h.owner) for h in list(self.held.values()) if h.state is state]
        rows.sort(reverse=True)
        return [{"owner": owner, "held_seconds": round(age, 3)} for age, owner in rows[:limit]]
