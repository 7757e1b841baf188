"""The SQLAlchemy pools' rare paths: a failed checkout, the critical-usage event, the long-hold
watchdog and the leaked connections (the housekeeper's tick over ``TABLE``; the garbage
collector's returns). The events themselves are every pool's (``_core.pools``)."""

from __future__ import annotations

import time
from typing import Any

from telemetry._core.log import emit, suppressed, trace_ids
from telemetry._core.owner import OWNER
from telemetry._core.pools import REFUSALS, count_leak, failed_checkout, leak_scanner, refusal

from .state import CONFIG, TABLE, Held, PoolState

_perf = time.perf_counter
_owner_get = OWNER.get

__all__ = ["REFUSALS", "refusal"]  # re-exported: where they were first defined


def _on_failed(st: PoolState, waited: float, result: str, exc: BaseException | None = None) -> None:
    failed_checkout(st, waited, result, TABLE, exc)


def longest_holders(st: PoolState, limit: int = 5) -> list[dict[str, Any]]:
    return TABLE.longest(st, _perf(), limit)


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


def _gc_returned(h: Held, held: float) -> None:
    """A checked-out connection that only the garbage collector returned."""
    count_leak(h, "gc_returned", CONFIG.max_owners, held_seconds=round(held, 3))


_scan_leaks = leak_scanner(TABLE, lambda: CONFIG.max_owners)


def scan_leaks(now: float | None = None) -> int:
    return _scan_leaks(_perf() if now is None else now)
