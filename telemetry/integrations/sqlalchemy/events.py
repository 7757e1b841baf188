"""The pools' rare paths: a failed checkout, the timeout and critical-usage events, the
long-hold watchdog and the leaked connections (the housekeeper's tick, ``_holds.HoldTable``;
the garbage collector's returns)."""

from __future__ import annotations

import time
from typing import Any

from telemetry._core.holds import suspect
from telemetry._core.log import emit, hook_error, suppressed, trace_ids
from telemetry._core.owner import ACCOUNT, OWNER

from .state import CONFIG, TABLE, Held, PoolState

_perf = time.perf_counter
_owner_get = OWNER.get
_account_get = ACCOUNT.get


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


def _on_failed(st: PoolState, waited: float, result: str, exc: BaseException | None = None) -> None:
    try:
        st.wait.observe(waited)
        account = _account_get()
        if account is not None:
            account.wait += waited
        if result == "timeout":
            st.timeouts += 1
            _timeout_event(st, waited)
        elif result == "error":
            st.errors += 1
            reason = refusal(exc)
            if reason is not None:
                st.refused[reason] = st.refused.get(reason, 0) + 1
        else:
            st.cancelled += 1
    except Exception as exc:
        hook_error("pool.checkout_failed", exc)


def longest_holders(st: PoolState, limit: int = 5) -> list[dict[str, Any]]:
    return TABLE.longest(st, _perf(), limit)


def _timeout_event(st: PoolState, waited: float) -> None:
    now = time.monotonic()
    if now - st.last_timeout_log < 1.0:
        suppressed("db_pool_timeout")
        return
    st.last_timeout_log = now
    emit(
        "error", "db_pool_timeout",
        pool=st.name, owner=_owner_get(), waited_seconds=round(waited, 3),
        checked_out=st.in_use, max_connections=st.max_connections, waiters=st.pending,
        longest_holders=longest_holders(st), **trace_ids(),
    )  # fmt: skip


def _critical_usage(st: PoolState, n: int) -> None:
    now = time.monotonic()
    if now - st.last_critical < CONFIG.critical_interval:
        suppressed("db_pool_critical_usage")
        return
    st.last_critical = now
    top = st.max_connections or n
    ratio = round(n / top * 100, 1)
    emit(
        "error", "db_pool_critical_usage",
        pool=st.name, owner=_owner_get(), checked_out=n, max_connections=top,
        usage_ratio=ratio, waiters=st.pending,
        message=f"pool usage {ratio}% ({n}/{top}): about to be exhausted",
        **trace_ids(),
    )  # fmt: skip


def scan_long_holds(now: float | None = None) -> int:
    """Report connections held past the threshold while still held. Returns how many were new.
    Runs on the housekeeper thread; the holder's stack is read only for those reported."""
    return TABLE.scan(_perf() if now is None else now, CONFIG.hold_threshold)


def _released_after_long_hold(rec: Any, h: Held, held: float) -> None:
    TABLE.released_after_long_hold(rec, h, held, CONFIG.hold_threshold)


#: seconds after its request or task ended before a connection still checked out counts as
#: leaked (a response's last bytes and SQLAlchemy's own clean-up come first)
LEAK_GRACE_SECONDS = 1.0
_last_leak_log: dict[str, float] = {}
#: distinct call sites per pool and kind in the leak counters (then "other")
MAX_LEAK_SITES = 20


def _count_leak(h: Held, table: str, event: str, **fields: Any) -> None:
    """One leaked connection of ``h``'s pool, by owner (folded like the hold's), and its event,
    at most one per kind a second (the rest counted in telemetry_events_suppressed_total)."""
    st = h.state
    counts = getattr(st, table)
    owner = h.owner if h.owner in st.hold or len(st.hold) < CONFIG.max_owners else "other"
    site = h.site or "unknown"
    if (owner, site) not in counts and len({s for _o, s in counts}) >= MAX_LEAK_SITES:
        site = "other"
    counts[(owner, site)] = counts.get((owner, site), 0) + 1
    now = time.monotonic()
    if now - _last_leak_log.get(event, -1e9) < 1.0:
        suppressed(event)
        return
    _last_leak_log[event] = now
    emit("warning", event, pool=st.name, owner=h.owner, call_site=h.site, **fields, **trace_ids(h.context))


def _leaked(h: Held, after: float) -> None:
    """A connection still checked out ``after`` seconds after its request or task ended."""
    _count_leak(h, "leaked", "db_connection_leaked", held_seconds=round(_perf() - h.since, 3),
                after_end_seconds=round(after, 3),
                message="a connection is still checked out after the request or task that took it ended: "
                        "close the session on every path (with Session() as s / async with)")  # fmt: skip


def _gc_returned(h: Held, held: float) -> None:
    """A checked-out connection that only the garbage collector returned."""
    suspect(h.owner)
    _count_leak(h, "gc_returned", "db_connection_gc_returned", held_seconds=round(held, 3),
                message="the garbage collector returned a connection that the code never closed")


def scan_leaks(now: float | None = None) -> int:
    return TABLE.scan_leaks(_perf() if now is None else now, LEAK_GRACE_SECONDS, _leaked)
