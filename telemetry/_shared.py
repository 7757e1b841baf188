"""The shared side: PostgreSQL's own view and pgbouncer's, joined to the services and owners
that hold their connections.

What every process contributes: its PostgreSQL connections carry ``application_name =
service/pid@host`` (``_pool``), and its process file lists the connections it holds right now with
their server backend pid and local TCP port (``_pool.owner_table``).

What one process per host does (the *leader*: whoever holds a POSIX record lock on
``<multiproc_dir>/telemetry-shared-view.lock``; a lone process without a directory is its own
leader): every ``shared_view_interval_seconds`` it runs one query set against the server
(``pg_stat_activity``, ``pg_locks``/``pg_blocking_pids``, settings) and one against pgbouncer's
admin console (``SHOW POOLS/STATS/CLIENTS/SERVERS/DATABASES``), each through one connection of its
own outside every pool, with a statement timeout, in a thread of its own: a slow or dead server
never blocks a request, a task or a scrape. The figures go into the leader's snapshot (host-wide
gauges without a ``pid`` label), the last good ones kept and marked stale on failure.

The join to owners: a server backend is held by the client connection with the same backend pid
(a direct connection) or, through pgbouncer, by the client that ``SHOW SERVERS.link`` points at,
identified by its TCP port in ``SHOW CLIENTS``; both keys are in the owner tables of the host's
processes. Owners on other hosts are not known here: their application name still names the
service, process and host, and that host's leader names the owner (see docs/shared-view.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _bounds, _pooler_metrics, _sqltag
from ._integration import Integration
from ._log import emit, hook_error
from ._settings import ConfigError, mask_url
from ._stats import OWNER_SOURCES, REGISTRY, Sample, owner_rows

LOCK_FILE = "telemetry-shared-view.lock"
_APP_RE = re.compile(r"^(?P<service>.+)/(?P<pid>\d+)@(?P<host>.*)$")
#: a pooler-queue episode is re-reported this often while it lasts
POOLER_EVENT_REPEAT_SECONDS = 30.0

def parse_application(name: str) -> tuple[str, str, str]:
    """``service/pid@host`` -> (service, pid, host); another name -> (name, "", "")."""
    m = _APP_RE.match(name or "")
    if m is None:
        return (name or "unnamed")[:60], "", ""
    return m["service"], m["pid"], m["host"]


def app_label(name: str) -> str:
    """The ``application`` label of a client: the service of our ``service/pid@host`` names,
    else the foreign name itself, each kind capped (``_bounds``): a client that rotates its
    ``application_name`` does not churn series."""
    service, pid, _host = parse_application(name)
    return _bounds.SERVICES(service) if pid else _bounds.FOREIGN(service)


#: a literal's closing quote may be missing: PostgreSQL cuts ``query`` at
#: ``track_activity_query_size`` bytes, and what is left of the literal must not show
_LITERAL = re.compile(
    r"\$(?P<tag>[A-Za-z_]*)\$.*?(?:\$(?P=tag)\$|\Z)"  # dollar-quoted
    r"|[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z)"  # escape strings: E'it\'s'
    r"|[bBxXnN]?'(?:[^']|'')*(?:'|\Z)"  # string literals
    r"|(?<![\w$.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w$])",  # numbers
    re.S,
)


_LEADING_COMMENTS = re.compile(r"^\s*(?:/\*.*?\*/\s*)+", re.S)


def statement(text: str | None, limit: int = 300) -> str:
    """The statement without its parameters: literals (interpolated by client-side binding
    drivers such as psycopg2) become ``?``; ``$1`` placeholders stay; leading comments (our
    statement tag among them: its fields are reported on their own) go."""
    if not text:
        return ""
    text = _LEADING_COMMENTS.sub("", text)
    return " ".join(_LITERAL.sub("?", text).split())[:limit]


def _root(blockers: list[int], chain: dict[int, list[int]]) -> int:
    """The blocker that matters: the first one up the chain holding its lock without waiting
    itself (a row's second waiter waits for the first waiter, which waits for the holder)."""
    seen: set[int] = set()
    queue = list(blockers)
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        if pid not in chain:
            return pid
        queue.extend(chain[pid])
    return blockers[0]


# --------------------------------------------------------------------------- host leadership


class Leader:
    """Host-wide leadership for one job: a POSIX record lock on ``<directory>/<name>``, held for
    the process's life (released when it dies, never inherited by fork). Without a directory
    the process leads alone."""

    def __init__(self, directory: str | None, name: str = LOCK_FILE) -> None:
        self.directory = directory
        self.name = name
        self.fd: int | None = None

    def acquire(self) -> bool:
        if self.directory is None or self.fd is not None:
            return True
        fd = os.open(os.path.join(self.directory, self.name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


#: owner rows (``_pool.owner_table``): [backend pid, local port, service, owner, since,
#: trace id, local address]
PID, PORT, SERVICE, OWNER, SINCE, TRACE, ADDR = range(7)


class Owners:
    """The host's held connections, joined by the keys a server or pooler row carries: the
    backend pid (a direct connection) or the client's address *and* port (the pooler's
    ``SHOW CLIENTS addr/port``, the server's ``client_addr/client_port``). Never by port alone:
    another host, or a psql session on another address, can use the same port number."""

    def __init__(self, rows: list[list[Any]]) -> None:
        self.by_pid: dict[Any, list[Any]] = {}
        self.by_peer: dict[tuple[str, int], list[Any]] = {}
        for row in rows:
            if row[PID]:
                self.by_pid[row[PID]] = row
            if row[PORT] and len(row) > ADDR and row[ADDR]:
                self.by_peer[(str(row[ADDR]), int(row[PORT]))] = row

    def peer(self, addr: Any, port: Any) -> list[Any] | None:
        if not addr or not port:
            return None
        try:
            return self.by_peer.get((str(addr), int(port)))
        except (TypeError, ValueError):
            return None


def _host_owners(directory: str | None) -> list[list[Any]]:
    """This process's owner rows and those the host's other live processes last wrote."""
    rows = owner_rows()
    if not directory:
        return rows
    from . import _multiprocess

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


# --------------------------------------------------------------------------- the figures


class _Published:
    """The leader's latest figures (replaced whole at each poll) and the view's own counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.server: list[Sample] = []
        self.pooler: list[Sample] = []
        self.server_ok_at: float | None = None
        self.pooler_ok_at: float | None = None
        self.server_up: int | None = None
        self.pooler_up: int | None = None
        self.server_seconds = 0.0
        self.pooler_seconds = 0.0
        self.errors: dict[tuple[str, str], int] = {}
        self.events: dict[str, int] = {}
        self.polls: dict[str, int] = {}

    def samples(self) -> Iterable[Sample]:
        with self._lock:
            server, pooler = list(self.server), list(self.pooler)
            errors, events = dict(self.errors), dict(self.events)
        now = time.time()
        yield from server
        yield from pooler
        for target, up, ok_at, seconds in (
            ("db_server", self.server_up, self.server_ok_at, self.server_seconds),
            ("pgbouncer", self.pooler_up, self.pooler_ok_at, self.pooler_seconds),
        ):
            if up is None:
                continue
            yield f"{target}_view_up", (), up
            yield f"{target}_view_query_seconds", (), seconds
            if ok_at is not None:
                yield f"{target}_view_age_seconds", (), round(now - ok_at, 3)
        for (target, reason), n in errors.items():
            yield f"{target}_view_errors_total", (("reason", reason),), n
        for event, n in events.items():
            yield "db_server_events_total", (("event", event),), n
        for target, n in list(self.polls.items()):
            yield f"{target}_view_polls_total", (), n

    def stand_down(self) -> None:
        """Another host polls the server now: this one's figures go (they would only age)."""
        with self._lock:
            self.server, self.pooler = [], []
        self.server_up = self.pooler_up = None
        self.server_ok_at = self.pooler_ok_at = None

    def count_error(self, target: str, reason: str) -> None:
        with self._lock:
            self.errors[(target, reason)] = self.errors.get((target, reason), 0) + 1


PUBLISHED = _Published()
REGISTRY.add(PUBLISHED)


REASONS = ("timeout", "refused", "auth", "permission", "not_found", "missing_column", "error")
EVENTS = ("db_lock_wait", "db_idle_in_transaction", "db_pooler_waiting")


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    for needle, reason in (("timeout", "timeout"), ("canceling statement", "timeout"),
                           ("refused", "refused"), ("password", "auth"), ("authentication", "auth"),
                           ("401", "auth"), ("unauthorized", "auth"),
                           ("permission", "permission"), ("not allowed", "permission"),
                           ("does not exist", "not_found")):  # fmt: skip
        if needle in text:
            return reason
    return "error"


def _connect(url: str, timeout: float, *, admin: bool) -> Any:
    """One autocommit connection outside every pool (psycopg 3, else psycopg2)."""
    # named as ours (service/pid@host): other hosts' pollers then share one application label
    app = f"telemetry-shared-view/{os.getpid()}@{socket.gethostname()}"[:63]
    options: dict[str, Any] = {} if admin else {"options": f"-c statement_timeout={int(timeout * 1000)}"}
    try:
        import psycopg

        # prepare_threshold=None: never prepared statements (pgbouncer admin console, transaction mode)
        return psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout)), prepare_threshold=None,
                               application_name=app, **options)  # fmt: skip
    except ImportError:
        import psycopg2

        conn = psycopg2.connect(url, connect_timeout=max(1, round(timeout)), application_name=app,
                                **options)  # fmt: skip
        conn.autocommit = True
        return conn


def driver_available() -> bool:
    for name in ("psycopg", "psycopg2"):
        with contextlib.suppress(ImportError):
            __import__(name)
            return True
    return False


def _rows(conn: Any, sql: str) -> list[dict[str, Any]]:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        cur.close()


_ACTIVITY_SQL = """
select a.pid, coalesce(a.application_name, '') as app, coalesce(a.state, '') as state,
       coalesce(a.wait_event_type, '') as wait_type, a.client_port,
       coalesce(host(a.client_addr), '') as client_addr,
       extract(epoch from a.xact_start)::float8 as xact_start,
       extract(epoch from now() - a.xact_start)::float8 as xact_age,
       extract(epoch from now() - a.state_change)::float8 as state_age,
       a.query, a.backend_type
from pg_stat_activity a
where a.pid <> pg_backend_pid() and a.backend_type = 'client backend'
"""
_LOCKS_SQL = """
select w.pid, pg_blocking_pids(w.pid) as blockers,
       extract(epoch from now() - coalesce(l.waitstart, w.query_start))::float8 as waited,
       extract(epoch from coalesce(l.waitstart, w.query_start))::float8 as wait_started,
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
_CLUSTER_SQL = f"select pg_try_advisory_lock({CLUSTER_LOCK[0]}, {CLUSTER_LOCK[1]}) as held"
_LIMIT_SQL = """
select current_setting('max_connections')::int
     - current_setting('superuser_reserved_connections')::int
     - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0) as usable
"""


class _Deadline:
    """Bounds one query set on ``conn``: past ``seconds`` a timer shuts the connection's socket
    down, so a read blocked on a stopped pooler or server returns at once (pgbouncer's admin
    console has no ``statement_timeout``, and a process stopped by SIGSTOP still accepts TCP).
    The round then fails with reason ``timeout`` and the next one reconnects. Connecting is
    bounded by the driver's ``connect_timeout``, which libpq never sets below 2 s."""

    def __init__(self, conn: Any, seconds: float) -> None:
        self.conn, self.seconds, self.fired = conn, seconds, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def __enter__(self) -> _Deadline:
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


class _Columns:
    """Reads SHOW rows by column name. pgbouncer versions differ in their columns (1.18 has
    ``sv_tested`` and ``total_xact_count``; others add or drop some): a missing column is noted
    and its figures left out, never fatal to the rest of the view."""

    def __init__(self) -> None:
        self.missing: set[str] = set()

    def get(self, command: str, row: dict[str, Any], name: str) -> Any:
        if name in row:
            return row[name]
        self.missing.add(f"{command}.{name}")
        return None

    def num(self, command: str, row: dict[str, Any], name: str) -> float | None:
        value = self.get(command, row, name)
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            self.missing.add(f"{command}.{name}")
            return None


def _wait_seconds(cols: _Columns, command: str, row: dict[str, Any], seconds: str, micros: str) -> float | None:
    whole = cols.num(command, row, seconds)
    if whole is None:
        return None
    return whole + (float(row.get(micros) or 0) / 1e6)


class _Poller:
    """The leader's work, one round per interval (in the shared-view thread)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.server_conn: Any = None
        self.pooler_conn: Any = None
        self.locks_reported: dict[tuple[int, float], float] = {}
        self.idle_reported: dict[tuple[int, float], float] = {}
        self.pooler_episodes: dict[str, float] = {}  # database -> last report
        self.logged_failure: set[str] = set()
        self.logged_missing: set[str] = set()
        #: the cluster election: "" (not tried on this connection), "held", "waiting", "off"
        self.cluster = "" if getattr(settings, "shared_view_cluster", True) else "off"

    def close(self) -> None:
        for conn in (self.server_conn, self.pooler_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self.server_conn = self.pooler_conn = None

    # ---------------------------------------------------------------- one round

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
        if self.cluster == "held" and self.server_conn is not None:
            return "lead"
        try:
            (row,) = self._query("db_server", s.server_view_url, [_CLUSTER_SQL], admin=False)[0]
            held = bool(row["held"])
        except Exception as exc:
            self._fail("db_server", exc, s.server_view_url)
            self.cluster = ""
            return "fallback"
        if held:
            self.cluster = "held"
            return "lead"
        if self.cluster == "held" or PUBLISHED.server_up is not None:  # another host polls now
            PUBLISHED.stand_down()
        self.cluster = "waiting"
        self.logged_failure.discard("db_server")
        return "wait"

    def poll(self) -> None:
        """One round. Each side fails on its own: a hung or odd pooler never stops the server
        view, and the reverse."""
        s = self.settings
        turn = self.cluster_turn()
        if turn == "wait":
            return
        owners = Owners(_host_owners(s.multiproc_dir))
        pooler = None
        if s.pooler_metrics_url and not s.pgbouncer_url:  # the pooler's own metrics: no console
            try:
                self._pooler_metrics()
            except Exception as exc:
                self._fail("pgbouncer", exc, _pooler_metrics.describe(s.pooler_metrics_url)["url"])
            PUBLISHED.polls["pgbouncer"] = PUBLISHED.polls.get("pgbouncer", 0) + 1
        if s.pgbouncer_url:
            try:
                pooler = self._pooler(owners)
            except Exception as exc:
                self._fail("pgbouncer", exc, s.pgbouncer_url)
            PUBLISHED.polls["pgbouncer"] = PUBLISHED.polls.get("pgbouncer", 0) + 1
        if s.server_view_url:
            try:
                if turn == "lead":
                    self._server(owners, pooler)
            except Exception as exc:
                self._fail("db_server", exc, s.server_view_url)
            PUBLISHED.polls["db_server"] = PUBLISHED.polls.get("db_server", 0) + 1

    def _fail(self, target: str, exc: BaseException, url: str) -> None:
        reason = _reason(exc)
        PUBLISHED.count_error(target, reason)
        if target == "db_server":
            PUBLISHED.server_up = 0
            conn, self.server_conn = self.server_conn, None
            if self.cluster != "off":
                self.cluster = ""  # a new connection holds no lock: elect again
        else:
            PUBLISHED.pooler_up = 0
            conn, self.pooler_conn = self.pooler_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if target not in self.logged_failure:  # once per outage
            self.logged_failure.add(target)
            error = mask_url(str(exc).splitlines()[0][:200]) if str(exc) else type(exc).__name__
            emit("warning", "telemetry_shared_view_failed", target=target, reason=reason,
                 url=mask_url(url), error=error,
                 message="the figures keep their last good values and are marked stale "
                 f"({target}_view_up 0, {target}_view_age_seconds grows)")  # fmt: skip

    def _query(self, target: str, url: str, sqls: list[str], *, admin: bool) -> list[list[dict[str, Any]]]:
        """Run ``sqls`` on the target's own connection (opened when needed), bounded in time."""
        timeout = self.settings.shared_view_timeout_seconds
        attr = "server_conn" if target == "db_server" else "pooler_conn"
        conn = getattr(self, attr)
        if conn is None:
            conn = _connect(url, timeout, admin=admin)
            setattr(self, attr, conn)
        with _Deadline(conn, timeout):
            return [_rows(conn, sql) for sql in sqls]

    # ---------------------------------------------------------------- the pooler's metrics

    def _pooler_metrics(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        text = _pooler_metrics.fetch(s.pooler_metrics_url, s.shared_view_timeout_seconds)
        out, understood = _pooler_metrics.samples(text)
        if not understood:
            raise LookupError(f"no pooler metric family found at {_pooler_metrics.describe(s.pooler_metrics_url)['url']}"
                              " (does not exist: pgbouncer_exporter, Supavisor, PgCat or Neon families expected)")
        PUBLISHED.pooler_seconds = round(time.perf_counter() - t0, 6)
        self.logged_failure.discard("pgbouncer")
        with PUBLISHED._lock:
            PUBLISHED.pooler = out
        PUBLISHED.pooler_up = 1
        PUBLISHED.pooler_ok_at = time.time()

    # ---------------------------------------------------------------- pgbouncer

    def _pooler(self, owners: Owners) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        pools, stats, clients, servers, databases, config_rows = self._query(
            "pgbouncer", s.pgbouncer_url,
            ["SHOW POOLS", "SHOW STATS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW DATABASES", "SHOW CONFIG"],
            admin=True,
        )  # fmt: skip
        PUBLISHED.pooler_seconds = round(time.perf_counter() - t0, 6)
        self.logged_failure.discard("pgbouncer")
        config = {str(r.get("key")): r.get("value") for r in config_rows}
        cols = _Columns()
        view = self._publish_pooler(cols, pools, stats, clients, servers, databases, config)
        if cols.missing:
            PUBLISHED.count_error("pgbouncer", "missing_column")
            missing = ",".join(sorted(cols.missing))
            if missing not in self.logged_missing:
                self.logged_missing.add(missing)
                emit("warning", "telemetry_pgbouncer_columns_missing", columns=sorted(cols.missing),
                     message="this pgbouncer version lacks these columns: their figures are left out, "
                     "the rest of the view is published (pgbouncer_view_errors_total{reason=\"missing_column\"})")  # fmt: skip
        view["owners"] = owners
        view["cols"] = cols
        return view

    def _publish_pooler(self, cols: _Columns, pools: list[dict[str, Any]], stats: list[dict[str, Any]],
                        clients: list[dict[str, Any]], servers: list[dict[str, Any]],
                        databases: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        out: list[Sample] = []
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out.append(("pgbouncer_max_client_connections", (), int(config["max_client_conn"])))
        for p in pools:  # every row is read, the console's own too: a missing column shows at once
            database = cols.get("POOLS", p, "database")
            lb = (("database", str(database)), ("user", str(cols.get("POOLS", p, "user"))))
            clients_n = {state: cols.num("POOLS", p, f"cl_{state}") for state in ("active", "waiting")}
            servers_n = {state: cols.num("POOLS", p, f"sv_{state}") for state in ("active", "idle", "used", "tested", "login")}
            maxwait = _wait_seconds(cols, "POOLS", p, "maxwait", "maxwait_us")
            if database is None or database == "pgbouncer":
                continue
            for state, n in clients_n.items():
                if n is not None:
                    out.append(("pgbouncer_clients", lb + (("state", state),), int(n)))
            for state, n in servers_n.items():
                if n is not None:
                    out.append(("pgbouncer_servers", lb + (("state", state),), int(n)))
            if maxwait is not None:
                out.append(("pgbouncer_client_maxwait_seconds", lb, maxwait))
        default_size = config.get("default_pool_size")
        for d in databases:
            size = d.get("pool_size") if d.get("pool_size") is not None else default_size
            name = cols.get("DATABASES", d, "name")
            if name is not None and name != "pgbouncer" and size is not None:
                with contextlib.suppress(TypeError, ValueError):
                    out.append(("pgbouncer_pool_size", (("database", str(name)),), int(size)))
        for st in stats:
            database = cols.get("STATS", st, "database")
            wait = cols.num("STATS", st, "total_wait_time")
            xacts = cols.num("STATS", st, "total_xact_count")
            if database is None or database == "pgbouncer":
                continue
            db = (("database", str(database)),)
            if wait is not None:
                out.append(("pgbouncer_client_wait_seconds_total", db, wait / 1e6))
            if xacts is not None:
                out.append(("pgbouncer_transactions_total", db, xacts))
        by_ptr = {c["ptr"]: c for c in clients if c.get("ptr")}
        per_app: dict[tuple[str, str], int] = {}
        longest: dict[str, float] = {}
        for c in clients:
            if c.get("database") == "pgbouncer":
                continue
            app = app_label(c.get("application_name") or "")
            state = "waiting" if c.get("state") == "waiting" else ("active" if c.get("link") else "idle")
            per_app[(app, state)] = per_app.get((app, state), 0) + 1
            if state == "waiting":
                waited = _wait_seconds(cols, "CLIENTS", c, "wait", "wait_us") or 0.0
                longest[app] = max(longest.get(app, 0.0), waited)
        for (app, state), n in per_app.items():
            out.append(("pgbouncer_clients_by_application", (("application", app), ("state", state)), n))
        for app, waited in longest.items():
            out.append(("pgbouncer_client_wait_longest_seconds", (("application", app),), waited))
        holders: dict[tuple[str, str], int] = {}
        server_client: dict[int, dict[str, Any]] = {}  # server backend pid -> linked client row
        for sv in servers:
            link = cols.get("SERVERS", sv, "link")
            client = by_ptr.get(link) if link else None
            if client is None:
                continue
            if sv.get("remote_pid"):
                server_client[int(sv["remote_pid"])] = client
            app = app_label(client.get("application_name") or "")
            key = (str(sv.get("database")), app)
            holders[key] = holders.get(key, 0) + 1
        for (database, app), n in holders.items():
            out.append(("pgbouncer_servers_by_application",
                        (("database", database), ("application", app)), n))  # fmt: skip
        with PUBLISHED._lock:
            PUBLISHED.pooler = out
        PUBLISHED.pooler_up = 1
        PUBLISHED.pooler_ok_at = time.time()
        return {"pools": pools, "clients": clients, "servers": servers, "by_ptr": by_ptr,
                "server_client": server_client, "holders": holders}  # fmt: skip

    # ---------------------------------------------------------------- the server

    def _server(self, owners: Owners, pooler: dict[str, Any] | None) -> None:
        s = self.settings
        t0 = time.perf_counter()
        activity, locks, limit = self._query("db_server", s.server_view_url,
                                             [_ACTIVITY_SQL, _LOCKS_SQL, _LIMIT_SQL], admin=False)  # fmt: skip
        usable = limit[0]["usable"]
        PUBLISHED.server_seconds = round(time.perf_counter() - t0, 6)
        self.logged_failure.discard("db_server")
        server_client = pooler["server_client"] if pooler else {}

        def owner_of(row: dict[str, Any]) -> tuple[str, str, str, str]:
            """(service, owner, host, trace_id) of the client holding this backend: from the
            statement tag of its current transaction (it travels through any pooler, and wins),
            else the backend pid / client address and port join, else nobody of ours."""
            if row["state"] != "idle":  # an idle backend's last statement names a past client
                tag = _sqltag.parse(row.get("query"))
                if tag:
                    t_service, _tpid, t_host = parse_application(tag["application"])
                    trace = tag.get("traceparent", "").split("-")
                    return (_bounds.SERVICES(t_service), tag.get("owner", ""), t_host,
                            trace[1] if len(trace) == 4 else "")  # fmt: skip
            _name, _pid, host = parse_application(row["app"])
            service = app_label(row["app"])
            known = owners.by_pid.get(row["pid"])
            if known is None and row["pid"] in server_client:  # through the pooler
                client = server_client[row["pid"]]
                known = owners.peer(client.get("addr"), client.get("port"))
            if known is None:
                known = owners.peer(row.get("client_addr"), row.get("client_port"))
            if known is None:
                return service, "", host, ""
            return str(known[SERVICE]), str(known[OWNER]), host, str(known[TRACE] or "")

        out: list[Sample] = [("db_server_connections_max", (), int(usable))]
        count: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def add(name: str, labels: tuple[tuple[str, str], ...], value: float = 1.0,
                agg: Callable[[float, float], float] = lambda a, b: a + b) -> None:  # fmt: skip
            key = (name, labels)
            count[key] = agg(count[key], value) if key in count else value

        by_pid_row = {}
        for row in activity:
            by_pid_row[row["pid"]] = row
            app = app_label(row["app"])
            state = row["state"] or "unknown"
            add("db_server_connections", (("application", app), ("state", state)))
            if row["wait_type"] and state == "active":
                add("db_server_wait_events", (("application", app), ("wait_event_type", row["wait_type"])))
            if row["xact_age"] is not None:
                add("db_server_oldest_transaction_seconds", (("application", app),), row["xact_age"], max)
            if state.startswith("idle in transaction") and row["state_age"] is not None:
                add("db_server_oldest_idle_in_transaction_seconds", (("application", app),),
                    row["state_age"], max)  # fmt: skip
            service, owner, _host, _trace = owner_of(row)
            if owner:
                add("db_server_connections_by_owner",
                    (("service", service), ("owner", owner), ("state", state)))  # fmt: skip
        longest = 0.0
        chain = {lk["pid"]: list(lk["blockers"] or []) for lk in locks}
        for lk in locks:
            waiting = by_pid_row.get(lk["pid"])
            app = app_label(waiting["app"]) if waiting else "unknown"
            add("db_server_lock_waiting", (("application", app),))
            longest = max(longest, lk["waited"] or 0.0)
            blockers = list(lk["blockers"] or [])
            blocker = by_pid_row.get(_root(blockers, chain)) if blockers else None
            b_service, b_owner, _h, _t = owner_of(blocker) if blocker else ("unknown", "", "", "")
            w_service, w_owner, _h2, _t2 = owner_of(waiting) if waiting else ("unknown", "", "", "")
            add("db_server_lock_blocking",
                (("blocker_service", b_service), ("blocker_owner", b_owner or "unknown"),
                 ("blocked_service", w_service), ("blocked_owner", w_owner or "unknown")))  # fmt: skip
        out.append(("db_server_lock_wait_longest_seconds", (), longest))
        out.extend((name, labels, value) for (name, labels), value in count.items())
        with PUBLISHED._lock:
            PUBLISHED.server = out
        PUBLISHED.server_up = 1
        PUBLISHED.server_ok_at = time.time()
        self._lock_events(locks, by_pid_row, owner_of)
        self._idle_events(activity, owner_of)
        if pooler is not None:
            self._pooler_events(pooler, owners)

    # ---------------------------------------------------------------- events

    def _count_event(self, event: str) -> None:
        with PUBLISHED._lock:
            PUBLISHED.events[event] = PUBLISHED.events.get(event, 0) + 1

    def _lock_events(self, locks: list[dict[str, Any]], rows: dict[int, dict[str, Any]],
                     owner_of: Callable[[dict[str, Any]], tuple[str, str, str, str]]) -> None:
        threshold = self.settings.lock_wait_event_seconds
        chain = {lk["pid"]: list(lk["blockers"] or []) for lk in locks}
        seen = set()
        for lk in locks:
            key = (lk["pid"], round(lk["wait_started"] or 0.0, 3))
            seen.add(key)
            if key in self.locks_reported or (lk["waited"] or 0.0) < threshold:
                continue
            waiting = rows.get(lk["pid"])
            blockers = list(lk["blockers"] or [])
            blocker = rows.get(_root(blockers, chain)) if blockers else None
            if waiting is None:
                continue
            w_service, w_owner, w_host, w_trace = owner_of(waiting)
            fields: dict[str, Any] = {
                "blocked_service": w_service, "blocked_owner": w_owner or "unknown",
                "blocked_pid": lk["pid"], "blocked_host": w_host,
                "blocked_wait_seconds": round(lk["waited"] or 0.0, 3),
                "blocked_statement": statement(waiting["query"]),
                "relation": lk["relation"] or "", "lock_type": lk["locktype"], "mode": lk["mode"],
                "blocker_pids": blockers, "lock_key": f"{key[0]}:{key[1]}",
            }  # fmt: skip
            if blocker is not None:
                b_service, b_owner, b_host, b_trace = owner_of(blocker)
                fields.update(
                    blocker_service=b_service, blocker_owner=b_owner or "unknown",
                    blocker_pid=blocker["pid"], blocker_host=b_host,
                    blocker_state=blocker["state"],
                    blocker_xact_seconds=round(blocker["xact_age"] or 0.0, 3),
                    blocker_statement=statement(blocker["query"]),
                )  # fmt: skip
                if b_trace:
                    fields["blocker_trace_id"] = b_trace
            if w_trace:
                fields["trace_id"] = w_trace
            self.locks_reported[key] = time.monotonic()
            self._count_event("db_lock_wait")
            emit("warning", "db_lock_wait", **fields)
        for key in [k for k in self.locks_reported if k not in seen]:
            del self.locks_reported[key]

    def _idle_events(self, activity: list[dict[str, Any]],
                     owner_of: Callable[[dict[str, Any]], tuple[str, str, str, str]]) -> None:
        threshold = self.settings.idle_in_transaction_event_seconds
        seen = set()
        for row in activity:
            if not row["state"].startswith("idle in transaction") or row["xact_age"] is None:
                continue
            # the server's own xact_start: one key per transaction, whatever this process's
            # clock or load (a key from our clock minus xact_age drifted and re-reported)
            key = (row["pid"], round(row.get("xact_start") or 0.0, 6))
            seen.add(key)
            if key in self.idle_reported or (row["state_age"] or 0.0) < threshold:
                continue
            service, owner, host, trace = owner_of(row)
            fields: dict[str, Any] = {
                "idle_service": service, "idle_owner": owner or "unknown", "pid": row["pid"],
                "host": host, "state": row["state"],
                "idle_seconds": round(row["state_age"] or 0.0, 3),
                "xact_seconds": round(row["xact_age"] or 0.0, 3),
                "last_statement": statement(row["query"]),
            }  # fmt: skip
            if trace:
                fields["trace_id"] = trace
            self.idle_reported[key] = time.monotonic()
            self._count_event("db_idle_in_transaction")
            emit("warning", "db_idle_in_transaction", **fields)
        for key in [k for k in self.idle_reported if k not in seen]:
            del self.idle_reported[key]

    def _pooler_events(self, pooler: dict[str, Any], owners: Owners) -> None:
        now = time.monotonic()
        cols: _Columns = pooler["cols"]
        for p in pooler["pools"]:
            database = str(p.get("database"))
            if database == "pgbouncer":
                continue
            if (cols.num("POOLS", p, "cl_waiting") or 0) <= 0:
                self.pooler_episodes.pop(database, None)
                continue
            maxwait = _wait_seconds(cols, "POOLS", p, "maxwait", "maxwait_us") or 0.0
            if maxwait < self.settings.pooler_wait_event_seconds:
                continue
            last = self.pooler_episodes.get(database)
            if last is not None and now - last < POOLER_EVENT_REPEAT_SECONDS:
                continue
            self.pooler_episodes[database] = now
            holders: dict[tuple[str, str], int] = {}
            for sv in pooler["servers"]:
                client = pooler["by_ptr"].get(sv.get("link")) if sv.get("link") else None
                if client is None or str(sv.get("database")) != database:
                    continue
                service = app_label(client.get("application_name") or "")
                known = owners.peer(client.get("addr"), client.get("port"))
                owner = str(known[OWNER]) if known else ""
                holders[(service, owner)] = holders.get((service, owner), 0) + 1
            waiting: dict[str, int] = {}
            for c in pooler["clients"]:
                if str(c.get("database")) == database and c.get("state") == "waiting":
                    app = app_label(c.get("application_name") or "")
                    waiting[app] = waiting.get(app, 0) + 1
            self._count_event("db_pooler_waiting")
            emit(
                "warning", "db_pooler_waiting", database=database, user=str(p.get("user")),
                clients_waiting=int(cols.num("POOLS", p, "cl_waiting") or 0),
                longest_wait_seconds=round(maxwait, 3),
                server_connections_active=int(cols.num("POOLS", p, "sv_active") or 0),
                holders=[{"service": sv, "owner": ow or "unknown", "server_connections": n}
                         for (sv, ow), n in sorted(holders.items(), key=lambda kv: -kv[1])],
                waiting_applications=waiting,
            )  # fmt: skip


class SharedViewIntegration(Integration):
    """The server and pooler view (on when ``server_view_url`` or ``pgbouncer_url`` is set)."""

    name = "shared_view"

    def __init__(self) -> None:
        self.settings: Any = None
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.leader: Leader | None = None
        self.poller: _Poller | None = None

    def install(self, runtime: Any) -> None:
        s = self.settings = runtime.settings
        if (s.server_view_url or s.pgbouncer_url) and not driver_available():
            raise ConfigError(
                "invalid TELEMETRY_SERVER_VIEW_URL / TELEMETRY_PGBOUNCER_URL: the server and pooler "
                "view need the psycopg (3) or psycopg2 driver installed (pip install psycopg)"
            )
        self.leader = Leader(s.multiproc_dir)
        self._start()

    def _start(self) -> None:
        # every failure reason and event exists at 0 from the start (absent is not zero)
        targets = [t for t, url in (("db_server", self.settings.server_view_url),
                                    ("pgbouncer", self.settings.pgbouncer_url or self.settings.pooler_metrics_url))
                   if url]  # fmt: skip
        with PUBLISHED._lock:
            for target in targets:
                for reason in REASONS:
                    PUBLISHED.errors.setdefault((target, reason), 0)
            for event in EVENTS:
                PUBLISHED.events.setdefault(event, 0)
            for target in targets:
                PUBLISHED.polls.setdefault(target, 0)
        self.stop_event = threading.Event()
        self.poller = _Poller(self.settings)
        self.thread = threading.Thread(target=self._run, name="telemetry-shared-view", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        interval = self.settings.shared_view_interval_seconds
        stop, poller, leader = self.stop_event, self.poller, self.leader
        assert poller is not None and leader is not None
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    if leader.acquire():
                        poller.poll()
                except Exception as exc:
                    hook_error("shared_view.poll", exc)
                stop.wait(max(0.0, interval - (time.monotonic() - t0)))
        finally:
            poller.close()

    def uninstall(self) -> None:
        self.stop_event.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout=self.settings.shared_view_timeout_seconds + 5)
        if self.leader is not None:
            self.leader.release()
        PUBLISHED.reset()

    def after_fork(self) -> None:
        # the parent's thread and connections are not ours; a child polls only if it becomes leader
        if self.leader is not None:
            self.leader.release()  # record locks are not inherited: close the copied fd
        if self.poller is not None:
            self.poller.server_conn = self.poller.pooler_conn = None  # the parent's sockets
        PUBLISHED.reset()
        self._start()


__all__ = ["OWNER_SOURCES", "SharedViewIntegration", "owner_rows", "parse_application", "statement"]
