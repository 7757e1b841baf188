"""The shared view's queries: one autocommit connection outside every pool, the SQL it runs on
PostgreSQL, the deadline that bounds a query set, and the reason a failure is counted under."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from telemetry._core import multiprocess as _multiprocess
from telemetry._core import urls as _urls
from telemetry._core.stats import owner_rows

REASONS = ("timeout", "refused", "auth", "permission", "not_found", "redirect", "leader_stale", "lease_lost",
           "missing_column", "error")


def failure_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    for needle, reason in (("another origin", "redirect"), ("idle-session timeout", "lease_lost"),
                           ("administrator command", "lease_lost"),
                           ("timeout", "timeout"), ("canceling statement", "timeout"),
                           ("refused", "refused"), ("password", "auth"), ("authentication", "auth"),
                           ("401", "auth"), ("unauthorized", "auth"),
                           ("permission", "permission"), ("not allowed", "permission"),
                           ("does not exist", "not_found")):  # fmt: skip
        if needle in text:
            return reason
    return "error"


def conninfo(url: str) -> dict[str, Any]:
    """libpq's keywords from a ``postgresql://`` URL, parsed by us (``telemetry/_core/urls.py``): a
    password holding ``/ ? # @ % :`` as typed reaches the server whole, and never passes through
    a parser whose error would quote it."""
    u = _urls.parse(url)
    kw: dict[str, Any] = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
    if u.host:
        kw["host"] = urllib.parse.unquote(u.host.strip("[]"))
    if u.port is not None:
        kw["port"] = u.port
    if u.user:
        kw["user"] = u.user
    if u.password is not None:
        kw["password"] = u.password
    database = urllib.parse.unquote(u.path.lstrip("/"))
    if database:
        kw["dbname"] = database
    return kw


def connect(url: str, timeout: float, *, admin: bool) -> Any:
    """One autocommit connection outside every pool (psycopg 3, else psycopg2)."""
    # named as ours (service/pid@host): other hosts' pollers then share one application label
    app = f"telemetry-shared-view/{os.getpid()}@{socket.gethostname()}"[:63]
    kw = conninfo(url)
    if not admin:  # pgbouncer's console takes no options
        kw["options"] = f"{kw.get('options', '')} -c statement_timeout={int(timeout * 1000)}".strip()
    kw.update(application_name=app, connect_timeout=max(1, round(timeout)))
    try:
        import psycopg

        # prepare_threshold=None: never prepared statements (pgbouncer admin console, transaction mode)
        return psycopg.connect(autocommit=True, prepare_threshold=None, **kw)
    except ImportError:
        import psycopg2

        conn = psycopg2.connect(**kw)
        conn.autocommit = True
        return conn


def listen(conn: Any, channel: str, handler: Callable[[str], None]) -> None:
    """``LISTEN channel`` on ``conn``. psycopg 3 calls ``handler`` with each payload of the
    channel as it reads a query's results; psycopg2 keeps them on the connection (see
    :func:`drain`)."""
    add = getattr(conn, "add_notify_handler", None)
    if add is not None:
        add(lambda n: handler(n.payload) if n.channel == channel else None)
    fetch_rows(conn, f"listen {channel}")


def drain(conn: Any) -> list[tuple[str, str]]:
    """(channel, payload) of what psycopg2 received with the last queries (psycopg 3 hands them
    over itself)."""
    notifies = getattr(conn, "notifies", None)
    if not isinstance(notifies, list) or not notifies:
        return []
    out = [(n.channel, n.payload) for n in notifies]
    del notifies[:]
    return out


def driver_available() -> bool:
    for name in ("psycopg", "psycopg2"):
        with contextlib.suppress(ImportError):
            __import__(name)
            return True
    return False


def fetch_rows(conn: Any, sql: str) -> list[dict[str, Any]]:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        if cur.description is None:  # begin / commit
            return []
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        cur.close()


ACTIVITY_SQL = """
select a.pid, coalesce(a.application_name, '') as app, coalesce(a.state, '') as state,
       coalesce(a.wait_event_type, '') as wait_type, a.client_port,
       coalesce(host(a.client_addr), '') as client_addr,
       extract(epoch from a.xact_start)::float8 as xact_start,
       extract(epoch from now() - a.xact_start)::float8 as xact_age,
       extract(epoch from now() - a.state_change)::float8 as state_age,
       extract(epoch from now() - a.query_start)::float8 as query_age,
       a.query, a.backend_type
from pg_stat_activity a
where a.pid <> pg_backend_pid() and a.backend_type = 'client backend'
"""
LOCKS_SQL = """
select w.pid, pg_blocking_pids(w.pid) as blockers,
       extract(epoch from now() - coalesce(l.waitstart, w.query_start))::float8 as waited,
       extract(epoch from coalesce(l.waitstart, w.query_start))::float8 as wait_started,
       extract(epoch from w.query_start)::float8 as statement_started,
       l.locktype, l.mode,
       coalesce(l.relation::regclass::text,
                (select t.relation::regclass::text from pg_locks t   -- a row lock's first waiter
                 where t.pid = w.pid and t.locktype = 'tuple' limit 1), '') as relation
from pg_stat_activity w
join pg_locks l on l.pid = w.pid and not l.granted
where w.wait_event_type = 'Lock'
"""
#: the deployment's one poller holds this advisory lock (two keys: ``pg_locks.classid/objid``)
CLUSTER_LOCK = (1952804205, 1)
CLUSTER_SQL = f"select pg_try_advisory_lock({CLUSTER_LOCK[0]}, {CLUSTER_LOCK[1]}) as held"
#: the lock's holder as the other hosts see it: its backend, and how long that backend has
#: been idle (a leader polls every interval: idle past the lease, it is stopped or frozen)
HOLDER_SQL = f"""
select a.pid, coalesce(a.state, '') as state,
       extract(epoch from now() - a.state_change)::float8 as idle_seconds
from pg_locks l join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'advisory' and l.granted and l.classid = {CLUSTER_LOCK[0]} and l.objid = {CLUSTER_LOCK[1]}
"""
#: the server's query set runs in one read-only transaction: ``pg_stat_activity`` is then one
#: snapshot for every statement of the set, so a backend that started waiting on a lock between
#: the activity read and the locks read is never a waiter without its row (it was named
#: "unknown" on a loaded machine); the next round sees it whole
SNAPSHOT_BEGIN, SNAPSHOT_END = "begin transaction read only", "commit"
LIMIT_SQL = """
select current_setting('max_connections')::int
     - current_setting('superuser_reserved_connections')::int
     - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0) as usable
"""


class Deadline:
    """Bounds one query set on ``conn``: past ``seconds`` a timer shuts the connection's socket
    down, so a read blocked on a stopped pooler or server returns at once (pgbouncer's admin
    console has no ``statement_timeout``, and a process stopped by SIGSTOP still accepts TCP).
    The round then fails with reason ``timeout`` and the next one reconnects. Connecting is
    bounded by the driver's ``connect_timeout``, which libpq never sets below 2 s."""

    def __init__(self, conn: Any, seconds: float) -> None:
        self.conn, self.seconds, self.fired = conn, seconds, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def __enter__(self) -> Deadline:
        self.timer.start()
        return self

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(Exception):
            pgconn = getattr(self.conn, "pgconn", None)  # psycopg 3, else psycopg2
            fd = pgconn.socket if pgconn is not None else self.conn.fileno()
            sock = socket.socket(fileno=os.dup(fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self.timer.cancel()
        self.timer.join()
        if self.fired:  # the connection is shut: whatever came back, this round timed out
            raise TimeoutError(f"no answer within {self.seconds:g} s (query timeout)") from exc


HOST = socket.gethostname()


def alive(pid: int) -> bool:
    """A process of this host, still running (its start time readable)."""
    return pid == os.getpid() or _multiprocess.proc_start(pid) is not None


def host_owners(directory: str | None) -> list[Any]:
    """This process's owner rows and those the host's other live processes last wrote."""
    rows = owner_rows()
    if not directory:
        return rows
    own = os.getpid()
    for path in glob.glob(os.path.join(directory, f"{_multiprocess.PREFIX}*-*.json")):
        base = os.path.basename(path)
        try:
            pid_text, start = base[len(_multiprocess.PREFIX) : -len(".json")].split("-", 1)
            pid = int(pid_text)
        except ValueError:
            continue
        if pid == own or _multiprocess.proc_start(pid) != start:
            continue
        try:
            with open(path) as fh:
                rows.extend(json.load(fh).get("owners") or [])
        except (OSError, ValueError):
            continue
    return rows
