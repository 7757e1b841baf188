"""``_holds``: the one hold table the SQLAlchemy and redis-py pools share. Pure logic, no pool:
the watchdog reports a hold once past the threshold, not before; a skipped holder never; the
release of a reported hold says "released" once; a release racing the report wins or loses
cleanly; a forked child starts empty with a fresh lock; the longest holders of a pool."""

from __future__ import annotations

import threading

from telemetry._core import holds as _holds
from telemetry._core import owner as _owner
from telemetry._core import stacks as _stacks
from telemetry.testing import capture_events


class _Pool:
    name = "main-db"
    role = ""


def _hold(table: _holds.HoldTable, key: object, since: float, owner: str, state: object) -> _holds.Held:
    h = _holds.Held()
    h.since, h.owner, h.state, h.serial = since, owner, state, 1
    h.thread, h.task, h.context, h.account = threading.get_ident(), None, None, None
    table.held[key] = h
    return h


def test_reports_once_past_the_threshold_and_releases_once():
    table, pool = _holds.HoldTable("db_connection_held_too_long", with_trace=False), _Pool()
    h = _hold(table, "conn", 100.0, "GET /stream", pool)
    with capture_events("db_connection_held_too_long") as events:
        assert table.scan(now=104.0, threshold=5.0) == 0  # not yet
        assert table.scan(now=106.0, threshold=5.0) == 1
        assert table.scan(now=107.0, threshold=5.0) == 0  # once per hold
        assert table.flagged_of(pool) == 1 and table.flagged_of(_Pool()) == 0
        del table.held["conn"]
        table.released_after_long_hold("conn", h, 8.0, 5.0)
        table.released_after_long_hold("conn", h, 8.0, 5.0)  # a second release says nothing
    assert [(e["status"], e["owner"]) for e in events] == [("held", "GET /stream"), ("released", "GET /stream")]
    assert events[0]["call_site"] and events[0]["held_seconds"] == 6.0
    assert not table.flagged


def test_a_skipped_holder_is_never_reported():
    table, pool = _holds.HoldTable("redis_connection_held_too_long", with_trace=False), _Pool()
    pool.role = "celery-broker"
    _hold(table, "conn", 0.0, "celery-broker", pool)
    assert table.scan(now=1000.0, threshold=5.0, skip=lambda h: bool(h.state.role)) == 0


def test_a_release_before_the_report_wins():
    """Released between the scan's listing and its check: withdrawn, never reported, no flag."""
    table, pool = _holds.HoldTable("db_connection_held_too_long", with_trace=False), _Pool()
    h = _hold(table, "conn", 0.0, "x", pool)

    class Racing(dict):
        def __contains__(self, key: object) -> bool:
            table.held.pop("conn", None)  # the holder releases now
            return super().__contains__(key)

    table.flagged = Racing()
    with capture_events("db_connection_held_too_long") as events:
        assert table.scan(now=100.0, threshold=5.0) == 0
        table.released_after_long_hold("conn", h, 100.0, 5.0)
    assert events == [] and not table.flagged


def test_after_fork_and_longest():
    table, pool = _holds.HoldTable("db_connection_held_too_long"), _Pool()
    for i, since in enumerate((10.0, 5.0, 8.0)):
        _hold(table, i, since, f"o{i}", pool)
    assert [r["owner"] for r in table.longest(pool, now=20.0, limit=2)] == ["o1", "o2"]
    lock = table.lock
    table.after_fork()
    assert table.lock is not lock and not table.held and not table.flagged


def test_owner_nesting_and_the_holder_stack():
    """``db_owner`` nests and restores; the holder's stack names the caller's own line."""
    with _owner.db_owner("outer"):
        with _owner.db_owner("inner"):
            assert _owner.current_owner() == "inner"
        assert _owner.current_owner() == "outer"
    assert _owner.current_owner() == _owner.DEFAULT_OWNER
    stack = _stacks.holder_stack(threading.get_ident(), None)
    assert "test_holds.py" in (_stacks.call_site(stack) or ""), stack
