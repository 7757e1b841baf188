"""The deployment's one server-view poller among the hosts: PostgreSQL's advisory lock
``CLUSTER_LOCK`` held on the leader's monitoring session, under a lease. The leader polls every
interval, so its session is never idle longer than an interval; idle past the lease, it is
stopped or frozen (SIGSTOP, a debugger, a VM paused). The server ends such a session itself
(``idle_session_timeout``, PostgreSQL 14+), the other hosts end it too (they see the holder's
backend idle in ``pg_stat_activity``), and the next election hands the lock over. A leader back
from longer than its lease asks the server again before it polls anything, and stands down
when its session was ended. (docs/reliability.md, docs/shared-view.md)"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from telemetry._core.log import emit

from .published import PUBLISHED
from .queries import CLUSTER_SQL, HOLDER_SQL, failure_reason


class ClusterMember:
    """The election, as a part of the poller (which provides ``settings``, ``cluster``,
    ``last_turn``, ``server_conn``, ``logged_failure``, ``_query`` and ``_fail``)."""

    settings: Any
    cluster: str
    last_turn: float
    server_conn: Any
    logged_failure: set[str]

    def _query(self, target: str, url: str, sqls: list[str], *, admin: bool) -> list[list[dict[str, Any]]]:
        raise NotImplementedError

    def _fail(self, target: str, exc: BaseException, url: str | None) -> None:
        raise NotImplementedError

    def cluster_turn(self) -> str:
        """Whether this host's poller is the deployment's: it holds PostgreSQL's advisory lock
        ``CLUSTER_LOCK`` on its monitoring connection (held for the connection's life, released
        by the server when the process or its connection dies; the other hosts' pollers, which
        try again every interval, take over). Where the lock cannot be taken (the server
        unreachable, a role without the right), this host polls for itself, as before.

        Returns "lead" (poll everything), "wait" (another host polls) or "fallback" (the server
        failed just now, counted: poll the pooler only)."""
        s = self.settings
        if not s.server_view_url or self.cluster == "off":
            return "lead"
        now = time.monotonic()
        last, self.last_turn = self.last_turn, now
        # a leader that was away longer than its lease (stopped, frozen) asks the server again
        # before it polls anything: its session may have been ended and the lock taken over
        if self.cluster == "held" and self.server_conn is not None and now - last < self.lease():
            return "lead"
        try:
            (row,) = self._query("db_server", s.server_view_url, [CLUSTER_SQL], admin=False)[0]
            held = bool(row["held"])
        except Exception as exc:
            lost = self.cluster == "held" and failure_reason(exc) == "lease_lost"
            self._fail("db_server", exc, s.server_view_url)
            self.cluster = ""
            if lost:  # another host leads now: stand down until the next election
                PUBLISHED.stand_down()
                return "wait"
            return "fallback"
        if held:
            self.cluster = "held"
            return "lead"
        if self.cluster == "held" or PUBLISHED.server_up is not None:  # another host polls now
            PUBLISHED.stand_down()
        self.cluster = "waiting"
        self.logged_failure.discard("db_server")
        self._check_holder()
        return "wait"

    def lease(self) -> float:
        """How long the leader's monitoring session may stay idle: two intervals and a query
        set's timeout, and a second. The server ends a session idle that long
        (``idle_session_timeout``, PostgreSQL 14+), and the other hosts end it too (they see its
        backend idle in ``pg_stat_activity``): a frozen leader loses the lock within the lease."""
        s = self.settings
        return 2 * s.shared_view_interval_seconds + s.shared_view_timeout_seconds + 1.0

    def _check_holder(self) -> None:
        """A follower's look at the lock's holder: idle past the lease, it is stopped or frozen.
        The view is then not current anywhere: this host exports ``db_server_view_up 0``
        (reason ``leader_stale``) and ends the holder's session, so that the next election
        takes the lock over."""
        s = self.settings
        try:
            rows = self._query("db_server", s.server_view_url, [HOLDER_SQL], admin=False)[0]
        except Exception as exc:
            self._fail("db_server", exc, s.server_view_url)
            return
        stale = [r for r in rows if r["state"] == "idle" and (r["idle_seconds"] or 0) > self.lease()]
        if not stale:
            return
        PUBLISHED.count_error("db_server", "leader_stale")
        PUBLISHED.server_up = 0
        if "leader_stale" not in self.logged_failure:
            self.logged_failure.add("leader_stale")
            emit("warning", "telemetry_shared_view_leader_stale", pid=stale[0]["pid"],
                 idle_seconds=round(stale[0]["idle_seconds"], 1), lease_seconds=self.lease(),
                 message="the host polling the server view for the deployment stopped answering; "
                 "its session is ended and another host takes over")  # fmt: skip
        for row in stale:
            with contextlib.suppress(Exception):
                self._query("db_server", s.server_view_url, [f"select pg_terminate_backend({int(row['pid'])})"],
                            admin=False)  # fmt: skip

