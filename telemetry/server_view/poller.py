"""The shared side: PostgreSQL's own view and pgbouncer's, joined to the services and owners
that hold their connections.

What every process contributes: its PostgreSQL connections carry ``application_name =
service/pid@host``, its process file the connections it holds now (``peers.owner_table``).

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
processes. Behind a pooler that renames its clients, the statement tags name the owner; a tag
that carries a connection's token is joined through its process's owner rows, which the other
hosts tell over the server (``tokens``; docs/shared-view.md, docs/hosted-poolers.md).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from telemetry._core import bounds as _bounds
from telemetry._core import sqltag as _sqltag
from telemetry._core import urls as _urls
from telemetry._core.integration import Integration
from telemetry._core.leader import Leader
from telemetry._core.log import emit, hook_error
from telemetry._core.settings import ConfigError
from telemetry._core.stats import OWNER_SOURCES, Sample, owner_rows

from . import pooler_metrics as _pooler_metrics
from .cluster import ClusterMember
from .events import EVENT_CHANNEL, EventDetector
from .model import (
    Columns,
    Owners,
    app_label,
    chain_root,
    parse_application,
    statement,
    tag_verdict,
    wait_seconds,
)
from .published import EVENTS, PUBLISHED
from .queries import (
    ACTIVITY_SQL,
    HOST,
    LIMIT_SQL,
    LOCKS_SQL,
    REASONS,
    SNAPSHOT_BEGIN,
    SNAPSHOT_END,
    Deadline,
    alive,
    connect,
    drain,
    driver_available,
    failure_reason,
    fetch_rows,
    host_owners,
    listen,
)
from .tokens import TOKEN_CHANNEL, TokenTable


class _Poller(EventDetector, ClusterMember, TokenTable):
    """The leader's work, one round per interval (in the shared-view thread)."""

    def __init__(self, settings: Any) -> None:
        TokenTable.__init__(self)
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
        self.last_turn = time.monotonic()
        self.told: list[str] = []
        self.pending: list[tuple[str, dict[str, Any]]] = []

    def close(self) -> None:
        for conn in (self.server_conn, self.pooler_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self.server_conn = self.pooler_conn = None

    # ---------------------------------------------------------------- one round

    def poll(self) -> None:
        """One round. Each side fails on its own: a hung or odd pooler never stops the server
        view, and the reverse."""
        s = self.settings
        turn = self.cluster_turn()
        if turn == "wait":  # another host polls: it learns who holds this host's tokens
            self.tell_tokens(host_owners(s.multiproc_dir))
            return
        owners = Owners(host_owners(s.multiproc_dir) + self.told_rows(), lambda: host_owners(s.multiproc_dir))
        pooler = None
        if s.pooler_metrics_url and not s.pgbouncer_url:  # the pooler's own metrics: no console
            try:
                self._pooler_metrics()
            except Exception as exc:
                self._fail("pgbouncer", exc, s.pooler_metrics_url)
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

    def _fail(self, target: str, exc: BaseException, url: str | None) -> None:
        s = self.settings
        reason = failure_reason(exc)
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
            # the error without any form or piece of any configured password (a driver quotes
            # what it was given), and the URL with its password masked and its port kept
            error = _urls.redact(str(exc).splitlines()[0][:300], s.server_view_url, s.pgbouncer_url,
                                 s.pooler_metrics_url) if str(exc) else type(exc).__name__  # fmt: skip
            emit("warning", "telemetry_shared_view_failed", target=target, reason=reason,
                 url=_urls.shown(url), error=error,
                 message="the figures keep their last good values and are marked stale "
                 f"({target}_view_up 0, {target}_view_age_seconds grows)")  # fmt: skip

    def _query(self, target: str, url: str, sqls: list[str], *, admin: bool) -> list[list[dict[str, Any]]]:
        """Run ``sqls`` on the target's own connection (opened when needed), bounded in time."""
        timeout = self.settings.shared_view_timeout_seconds
        attr = "server_conn" if target == "db_server" else "pooler_conn"
        conn = getattr(self, attr)
        if conn is None:
            conn = connect(url, timeout, admin=admin)
            setattr(self, attr, conn)
            if target == "db_server":  # the lease, kept by the server itself (PostgreSQL 14+)
                with contextlib.suppress(Exception):
                    fetch_rows(conn, f"set idle_session_timeout = {int(self.lease() * 1000)}")
                with contextlib.suppress(Exception):  # the episodes other hosts' leaders report, their tokens
                    listen(conn, EVENT_CHANNEL, self.heard)
                    listen(conn, TOKEN_CHANNEL, self.heard_tokens)
        with Deadline(conn, timeout):
            out = [fetch_rows(conn, sql) for sql in sqls]
        for channel, payload in drain(conn):  # psycopg2 keeps them on the connection
            (self.heard if channel == EVENT_CHANNEL else self.heard_tokens)(payload)
        return out

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
        cols = Columns()
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

    def _publish_pooler(self, cols: Columns, pools: list[dict[str, Any]], stats: list[dict[str, Any]],
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
            maxwait = wait_seconds(cols, "POOLS", p, "maxwait", "maxwait_us")
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
                waited = wait_seconds(cols, "CLIENTS", c, "wait", "wait_us") or 0.0
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
        _begin, activity, locks, limit, _end = self._query(
            "db_server", s.server_view_url,
            [SNAPSHOT_BEGIN, ACTIVITY_SQL, LOCKS_SQL, LIMIT_SQL, SNAPSHOT_END], admin=False)  # fmt: skip
        usable = limit[0]["usable"]
        PUBLISHED.server_seconds = round(time.perf_counter() - t0, 6)
        self.logged_failure.discard("db_server")
        server_client = pooler["server_client"] if pooler else {}

        def joined(row: dict[str, Any]) -> Any:
            """The held connection of ours on this backend: by backend pid, through the pooler's
            client address and port, or by the server's client address and port."""
            known = owners.by_pid.get(row["pid"])
            if known is None and row["pid"] in server_client:  # through the pooler
                client = server_client[row["pid"]]
                known = owners.peer(client.get("addr"), client.get("port"))
            if known is None:
                known = owners.peer(row.get("client_addr"), row.get("client_port"))
            return known or owners.cursor(row.get("query"))

        def owner_of(row: dict[str, Any]) -> tuple[str, str, str, str]:
            """(service, owner, host, trace_id) of the client holding this backend: from the
            statement tag of its current transaction (it travels through any pooler, and wins),
            else the backend pid / client address and port join, else nobody of ours."""
            # an idle backend's last statement names a past client; with tags off none is read
            if row["state"] != "idle" and s.statement_tag:
                tag = _sqltag.parse(row.get("query"))
                if tag:
                    why = tag_verdict(row["app"], tag["application"], HOST, alive, joined(row) is not None)
                    if why is not None:  # not ours (psql running a copied statement): counted
                        PUBLISHED.count_rejected(why)
                        tag = {}
                if tag:
                    t_service, _tpid, t_host = parse_application(tag["application"])
                    trace = tag.get("traceparent", "").split("-")
                    t_service = _bounds.SERVICES(t_service)
                    if "conn" in tag and "owner" not in tag:  # a token: its process says who holds it
                        held = owners.token(tag)
                        return (t_service, _bounds.SERVER_OWNERS(t_service, str(held.owner)) if held else "",
                                t_host, str(held.trace_id or "") if held else "")  # fmt: skip
                    return (t_service, _bounds.SERVER_OWNERS(t_service, tag.get("owner", "")), t_host,
                            trace[1] if len(trace) == 4 else "")  # fmt: skip
            _name, _pid, host = parse_application(row["app"])
            service = app_label(row["app"])
            known = joined(row)
            if known is None:
                return service, "", host, ""
            return (str(known.service), _bounds.SERVER_OWNERS(str(known.service), str(known.owner)), host,
                    str(known.trace_id or ""))  # fmt: skip

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
                if state == "active" and row.get("query_age") is not None:  # what it runs, for how long
                    text = (("service", service), ("owner", owner),
                            ("statement", _bounds.STATEMENTS(statement(row.get("query"), 160))))  # fmt: skip
                    add("db_server_statements_active", text)
                    add("db_server_statement_running_seconds", text, row["query_age"], max)
        longest = 0.0
        chain = {lk["pid"]: list(lk["blockers"] or []) for lk in locks}
        for lk in locks:
            waiting = by_pid_row.get(lk["pid"])
            app = app_label(waiting["app"]) if waiting else "unknown"
            add("db_server_lock_waiting", (("application", app),))
            longest = max(longest, lk["waited"] or 0.0)
            blockers = list(lk["blockers"] or [])
            blocker = by_pid_row.get(chain_root(blockers, chain)) if blockers else None
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
        tell = self.tell_sql()
        if tell:  # a host that takes over will not report these again
            with contextlib.suppress(Exception):
                self._query("db_server", s.server_view_url, [tell], admin=False)
        self.emit_pending()
        if pooler is not None:
            self._pooler_events(pooler, owners)

    # ---------------------------------------------------------------- events

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
        _bounds.SERVER_OWNERS.cap = s.max_owners  # the owners it names: capped as a pool's are
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
        leading = False
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    if leader.acquire():
                        if not leading:  # the host's leader from now on: what the last one reported
                            poller.recall()
                        leading = True
                        poller.poll()
                    else:
                        leading = False
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
