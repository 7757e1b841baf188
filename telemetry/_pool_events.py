"""The pools' rare paths: a failed checkout, the timeout and critical-usage events, and the
long-hold watchdog (the housekeeper's tick) with its release race settled under ``LOCKS.flag``."""

from __future__ import annotations

import time
from typing import Any

from . import _stacks
from ._log import emit, hook_error, suppressed, trace_ids
from ._owner import ACCOUNT, OWNER
from ._pool_state import CONFIG, LOCKS, Held, PoolState, _flagged, _held

_perf = time.perf_counter
_owner_get = OWNER.get
_account_get = ACCOUNT.get


def _on_failed(st: PoolState, waited: float, result: str) -> None:
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
        else:
            st.cancelled += 1
    except Exception as exc:
        hook_error("pool.checkout_failed", exc)


def longest_holders(st: PoolState, limit: int = 5) -> list[dict[str, Any]]:
    now = _perf()
    rows = [(now - h.since, h.owner) for h in list(_held.values()) if h.state is st]
    rows.sort(reverse=True)
    return [{"owner": owner, "held_seconds": round(age, 3)} for age, owner in rows[:limit]]


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
    now = _perf() if now is None else now
    threshold = CONFIG.hold_threshold
    reported = 0
    for rec, h in list(_held.items()):
        serial, since = h.serial, h.since
        if now - since < threshold or rec in _flagged:
            continue
        with LOCKS.flag:
            # flag first, then check it is still the same checkout: a release that popped it
            # before this check finds no report to follow up, one after it finds the flag (and
            # waits for the lock, so "released" is always logged after "held")
            _flagged[rec] = serial
            if _held.get(rec) is not h or h.serial != serial:
                del _flagged[rec]
                continue
            reported += 1
            try:
                frames = _stacks.holder_stack(h.thread, h.task)
                emit(
                    "warning", "db_connection_held_too_long",
                    status="held", pool=h.state.name, owner=h.owner,
                    held_seconds=round(now - since, 3), threshold_seconds=threshold,
                    call_site=_stacks.call_site(frames), frames=frames,
                    **trace_ids(h.context),
                )  # fmt: skip
            except Exception as exc:
                hook_error("pool.long_hold", exc)
    return reported


def _released_after_long_hold(rec: Any, h: Held, held: float) -> None:
    with LOCKS.flag:
        if _flagged.get(rec) != h.serial:
            return  # the report lost the race: it saw the release and was withdrawn
        del _flagged[rec]
        emit(
            "warning", "db_connection_held_too_long",
            status="released", pool=h.state.name, owner=h.owner, held_seconds=round(held, 3),
            threshold_seconds=CONFIG.hold_threshold, **trace_ids(h.context),
        )  # fmt: skip
