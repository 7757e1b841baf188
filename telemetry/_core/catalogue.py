"""Every metric the package exports, defined exactly once.

Names, types, labels and units here are the public contract: ``docs/metrics.md`` is checked
against this table by a test, rule files and dashboards may only name metrics listed here, and the
exposition refuses a sample whose name is not here.

Gauges describe one process and carry a ``pid`` label, so that ``max by (service, pool)`` finds one
saturated process among idle ones while ``sum by (service, pool)`` gives the host total. Counters
and histograms are summed over the processes of a host (dead ones included) and carry no ``pid``.
"""

from __future__ import annotations

import dataclasses

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

#: Checkout wait: sub-millisecond when a connection is idle, up to ``pool_timeout`` (often 30-60 s).
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
#: Connection hold: 5 s is an edge so the hold alert's threshold is exact, not interpolated.
HOLD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)  # fmt: skip
CONNECT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Task runtime and queue wait: from milliseconds to the tens of minutes a content task can take.
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # fmt: skip
#: HTTP request durations and their pool-wait share.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
#: Event-loop lag: healthy loops stay under a few ms; the blocked threshold defaults to 0.5 s.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

POOL = ("service", "pool")
POOL_PID = ("service", "pool", "pid")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    labels: tuple[str, ...]
    unit: str
    help: str
    otel: str = ""
    buckets: tuple[float, ...] = ()
    #: one figure for the whole host or deployment (the shared view, the broker's queues), published
    #: by one poller without a ``pid`` label and merged with max across hosts, never summed
    host_wide: bool = False


#: "how many right now" gauges: when the last process reporting a series is gone (a recycled
#: Celery child, a replaced uvicorn worker), the host view shows it at 0 instead of dropping it,
#: so a dashboard can tell "idle" from "not reporting"
ZERO_WHEN_GONE = frozenset({
    "db_pool_connections_in_use", "db_pool_pending_requests", "celery_tasks_in_progress",
    "redis_pool_connections_in_use", "redis_pool_pending_requests",
    "http_server_requests_in_flight", "asyncio_semaphore_in_use", "asyncio_semaphore_waiters",
})  # fmt: skip


#: counters read from another system (pgbouncer's own totals), published by the host's one
#: shared-view process: taken as they are (the largest reading of the live processes), never summed
#: over processes nor archived, so a change of the polling process neither doubles nor loses them
EXTERNAL = frozenset({"pgbouncer_client_wait_seconds_total", "pgbouncer_transactions_total"})

_SPECS: list[MetricSpec] = [
    MetricSpec(
        "db_pool_connections_in_use", GAUGE, POOL_PID, "connections",
        "Connections checked out of the pool right now (the incident report's metric).",
        "db.client.connection.count{state=used}",
    ),
    MetricSpec(
        "db_pool_connections_idle", GAUGE, POOL_PID, "connections",
        "Open connections waiting in the pool.",
        "db.client.connection.count{state=idle}",
    ),
    MetricSpec(
        "db_pool_size", GAUGE, POOL_PID, "connections",
        "Connections the pool keeps open: SQLAlchemy's pool_size, psycopg_pool's and asyncpg's min_size (usage is NOT measured against it).",
        "db.client.connection.idle.max",
    ),
    MetricSpec(
        "db_pool_connections_max", GAUGE, POOL_PID, "connections",
        "Most connections the pool can open: pool_size + max_overflow (psycopg_pool, asyncpg: max_size). Usage is in_use / this.",
        "db.client.connection.max",
    ),
    MetricSpec(
        "db_server_connection_limit", GAUGE, POOL_PID, "connections",
        "Connections the database server or pooler allows this deployment "
        "(TELEMETRY_DB_CONNECTION_LIMIT); the budget alert compares the host sum of max to it.",
    ),
    MetricSpec(
        "db_pool_overflow", GAUGE, POOL_PID, "connections",
        "Connections open beyond pool_size (min_size) right now (negative while the pool is still filling).",
    ),
    MetricSpec(
        "db_pool_pending_requests", GAUGE, POOL_PID, "requests",
        "Callers waiting for a checkout right now.",
        "db.client.connection.pending_requests",
    ),
    MetricSpec("db_pool_connections_held_too_long", GAUGE, POOL_PID, "connections",
               "Connections held longer than the hold threshold right now."),
    MetricSpec(
        "db_pool_connections_in_use_by_owner", GAUGE, POOL + ("owner", "pid"), "connections",
        "Connections checked out right now, by the owner holding them (capped like the hold's owner).",
    ),
    MetricSpec(
        "db_pool_checkout_wait_seconds", HISTOGRAM, POOL, "seconds",
        "Time from asking the pool for a connection to getting it, or to the timeout, without "
        "the time spent opening a new connection (that is db_pool_connect_seconds).",
        "db.client.connection.wait_time", WAIT_BUCKETS,
    ),
    MetricSpec(
        "db_pool_checkouts_total", COUNTER, POOL + ("result",), "checkouts",
        "Checkout requests by result: ok, timeout, error.",
    ),
    MetricSpec(
        "db_pool_timeouts_total", COUNTER, POOL, "checkouts",
        "Checkouts that ended in the pool timeout (SQLAlchemy TimeoutError).",
        "db.client.connection.timeouts",
    ),
    MetricSpec(
        "db_connection_hold_seconds", HISTOGRAM, POOL + ("owner",), "seconds",
        "Time from checkout to checkin (or invalidation/detach), by who checked it out.",
        "db.client.connection.use_time", HOLD_BUCKETS,
    ),
    MetricSpec("db_pool_connects_total", COUNTER, POOL, "connections", "New DBAPI connections opened."),
    MetricSpec("db_pool_connect_seconds", HISTOGRAM, POOL, "seconds",
               "Time to open a new connection during a checkout: the driver's connect and the dialect's set-up queries, including any wait in a transaction pooler's queue on the way.",
               "db.client.connection.create_time", CONNECT_BUCKETS),
    MetricSpec(
        "db_server_wait_seconds", HISTOGRAM, ("service", "pool", "owner"), "seconds",
        "Per transaction: the round trip of its first statement, measured by the client. A "
        "transaction pooler assigns a server connection then, and a full server queues then: "
        "the wait for a server connection outside the pool, read without the pooler's console "
        "(an upper bound: it includes that statement's own run time). PostgreSQL engines.",
        "", WAIT_BUCKETS,
    ),
    MetricSpec("db_transaction_idle_seconds", HISTOGRAM, ("service", "pool", "owner"), "seconds",
               "Per transaction: the time it sat open between its statements, measured by the client (an awaited call inside it). PostgreSQL engines.", "", WAIT_BUCKETS),
    MetricSpec("db_transaction_idle_calls_total", COUNTER, POOL + ("owner", "call"), "transactions",
               "Transactions idle 0.1 s or more between statements, by the call their trace's CLIENT spans show they awaited (50 names)."),
    MetricSpec(
        "db_transaction_end_seconds", HISTOGRAM, POOL, "seconds",
        "Commit or rollback round trips, measured by the client: a plain round trip on the "
        "server connection the transaction already holds, the baseline db_server_wait_seconds is "
        "read against (a first statement much slower than this waited for a server connection).",
        "", WAIT_BUCKETS,
    ),
    MetricSpec("db_pool_connect_errors_total", COUNTER, POOL, "errors",
               "Checkouts that failed with an error other than the pool timeout (connect failures)."),
    MetricSpec("db_pool_connects_refused_total", COUNTER, POOL + ("reason",), "connections",
               "Connects refused for a connection limit: too_many_clients, reserved_slots, pooler_max_client_conn."),
    MetricSpec("db_pool_connections_leaked_total", COUNTER, POOL + ("owner", "call_site"), "connections",
               "Connections still checked out 1 s after the request or task that took them ended, by the line that checked them out (an owner's first leak: unknown)."),
    MetricSpec("db_pool_connections_gc_returned_total", COUNTER, POOL + ("owner", "call_site"), "connections",
               "Checked-out connections that only SQLAlchemy's garbage collection returned (never closed), by the line that checked them out."),
    MetricSpec(
        "db_pool_invalidations_total", COUNTER, POOL + ("kind",), "connections",
        "Connections invalidated, kind hard (closed) or soft (recycled at next checkout).",
    ),
    MetricSpec(
        "telemetry_owner_overflow_total", COUNTER, ("service", "pool"), "checkouts",
        "Checkouts whose owner was folded into owner=\"other\" because the per-pool cap was hit.",
    ),
    MetricSpec(
        "telemetry_label_values_folded_total", COUNTER, ("service", "label"), "values",
        "Label values from outside the process (route, task, queue, application) folded into "
        "\"other\" because the label's cap was reached (docs/reliability.md lists the caps).",
    ),
    MetricSpec(
        "telemetry_hook_errors_total", COUNTER, ("service", "hook"), "errors",
        "Exceptions raised inside the package's hooks, caught so the host never sees them.",
    ),
    MetricSpec(
        "telemetry_log_events_suppressed_total", COUNTER, ("service", "event"), "events",
        "Structured events not emitted because of per-pool rate limiting.",
    ),
    # ---------------------------------------------------------------- Celery
    MetricSpec(
        "celery_task_runtime_seconds", HISTOGRAM, ("service", "task", "queue"), "seconds",
        "Task run time in the worker, prerun to postrun.", "", TASK_BUCKETS,
    ),
    MetricSpec(
        "redis_pool_connections_in_use", GAUGE, POOL_PID, "connections",
        "Redis connections checked out of the pool right now (a pub/sub subscription holds one).",
        "db.client.connection.count{state=used}",
    ),
    MetricSpec(
        "redis_pool_connections_max", GAUGE, POOL_PID, "connections",
        "The pool's max_connections, when it has a limit. Usage is in_use / this.",
        "db.client.connection.max",
    ),
    MetricSpec(
        "redis_pool_pending_requests", GAUGE, POOL_PID, "requests",
        "Callers waiting for a connection (BlockingConnectionPool) right now.",
        "db.client.connection.pending_requests",
    ),
    MetricSpec(
        "redis_pool_connections_held_too_long", GAUGE, POOL_PID, "connections",
        "Connections held past the hold threshold and still held (redis_connection_held_too_long).",
    ),
    MetricSpec(
        "redis_pool_checkouts_total", COUNTER, ("service", "pool", "result"), "checkouts",
        "Connection checkouts by result: ok, timeout (BlockingConnectionPool waited its timeout), "
        "too_many (ConnectionPool past max_connections), error.",
    ),
    MetricSpec(
        "redis_pool_checkout_wait_seconds", HISTOGRAM, POOL, "seconds",
        "Time to get a connection from the pool, including failed attempts.",
        "db.client.connection.wait_time", WAIT_BUCKETS,
    ),
    MetricSpec(
        "redis_connection_hold_seconds", HISTOGRAM, ("service", "pool", "owner"), "seconds",
        "Checkout to release of a Redis connection, by owner (route template, task, db_owner).",
        "db.client.connection.use_time", HOLD_BUCKETS,
    ),
    MetricSpec(
        "celery_task_queue_wait_seconds", HISTOGRAM, ("service", "task", "queue"), "seconds",
        "Publish (or ETA/countdown, when later) to start of the task in a worker.", "", TASK_BUCKETS,
    ),
    MetricSpec(
        "celery_tasks_without_publish_time_total", COUNTER, ("service", "task", "queue"), "tasks",
        "Tasks started whose message carries no publish time (sent by a producer without the "
        "package): their queue wait is unknown and not in celery_task_queue_wait_seconds.",
    ),
    MetricSpec(
        "celery_tasks_in_progress", GAUGE, ("service", "task", "queue", "pid"), "tasks",
        "Tasks running in this worker process right now.",
    ),
    MetricSpec(
        "celery_tasks_total", COUNTER, ("service", "task", "queue", "outcome"), "tasks",
        "Finished tasks by outcome: succeeded, failed, retried, rejected, revoked.",
    ),
    MetricSpec(
        "celery_task_failures_total", COUNTER, ("service", "task", "queue", "exception"), "tasks",
        "Failed tasks by exception type (class name; capped, then \"other\").",
    ),
    # ---------------------------------------------------------------- HTTP
    MetricSpec(
        "http_server_request_duration_seconds", HISTOGRAM, ("service", "method", "route", "status"),
        "seconds", "Request duration by route template (never the raw path) and status.",
        "http.server.request.duration", HTTP_BUCKETS,
    ),
    MetricSpec(
        "http_server_requests_in_flight", GAUGE, ("service", "method", "route", "pid"), "requests",
        "Requests (and open streams / WebSockets) being served right now.",
        "http.server.active_requests",
    ),
    MetricSpec(
        "http_server_pool_wait_seconds", HISTOGRAM, ("service", "method", "route"), "seconds",
        "Per request: total time spent waiting for pool checkouts.", "", HTTP_BUCKETS,
    ),
    MetricSpec(
        "http_server_pool_hold_seconds", HISTOGRAM, ("service", "method", "route"), "seconds",
        "Per request: total time connections were held (overlaps add up).", "", HTTP_BUCKETS,
    ),
    MetricSpec(
        "http_server_db_server_wait_seconds", HISTOGRAM, ("service", "method", "route"), "seconds",
        "Per request: total time the first statements of its transactions took (waiting for a "
        "server connection behind a transaction pooler or a full server; see "
        "db_server_wait_seconds). A request's time splits into pool wait, this, and the rest.",
        "", HTTP_BUCKETS,
    ),
    # ---------------------------------------------------------------- asyncio
    MetricSpec(
        "asyncio_semaphore_capacity", GAUGE, ("service", "semaphore", "pid"), "permits",
        "Permits of the telemetry.Semaphore instances of this name alive in the process.",
    ),
    MetricSpec(
        "asyncio_semaphore_in_use", GAUGE, ("service", "semaphore", "pid"), "permits",
        "Permits held right now.",
    ),
    MetricSpec(
        "asyncio_semaphore_waiters", GAUGE, ("service", "semaphore", "pid"), "tasks",
        "Tasks waiting for a permit right now.",
    ),
    MetricSpec(
        "asyncio_semaphore_wait_seconds", HISTOGRAM, ("service", "semaphore"), "seconds",
        "Time from acquire() to getting the permit (0 when one was free).", "", WAIT_BUCKETS,
    ),
    MetricSpec(
        "asyncio_thread_limiter_tokens", GAUGE, ("service", "pid"), "threads",
        "Sync calls anyio runs at once (its default thread limiter: Starlette's sync def routes, dependencies).",
    ),
    MetricSpec("asyncio_thread_limiter_borrowed", GAUGE, ("service", "pid"), "threads",
               "Threads of anyio's default limiter busy now."),
    MetricSpec("asyncio_thread_limiter_waiting", GAUGE, ("service", "pid"), "tasks",
               "Tasks waiting for a thread of anyio's default limiter now."),
    MetricSpec(
        "event_loop_lag_seconds", HISTOGRAM, ("service",), "seconds",
        "How late the loop ran a callback scheduled every 0.1 s: time it was busy elsewhere.",
        "", LAG_BUCKETS,
    ),
    MetricSpec(
        "event_loop_blocked_total", COUNTER, ("service",), "episodes",
        "Times the loop was blocked longer than the threshold (each logged as event_loop_blocked).",
    ),
    # ---------------------------------------------------------------- Celery capacity
    MetricSpec(
        "celery_queue_length", GAUGE, ("broker", "queue"), "messages",
        "Messages waiting in the queue at the broker (Redis: the list and kombu's priority lists; "
        "SQLAlchemy transport: visible rows), polled once per interval per host.", host_wide=True,
    ),
    MetricSpec(
        "celery_queue_oldest_message_seconds", GAUGE, ("broker", "queue"), "seconds",
        "Age of the oldest waiting message, 0 when none waits (the publish time the package stamps, "
        "read from the tail of each Redis list or the oldest row of the SQLAlchemy transport).", host_wide=True,
    ),
    MetricSpec(
        "celery_backlog_view_up", GAUGE, (), "boolean",
        "1 when the last backlog poll succeeded; 0: celery_queue_length is stale.", host_wide=True,
    ),
    MetricSpec(
        "celery_backlog_errors_total", COUNTER, ("reason",), "errors",
        "Backlog polls that failed: timeout, refused, auth, error.", host_wide=True,
    ),
    MetricSpec(
        "celery_worker_pool_size", GAUGE, ("service", "worker", "pid"), "processes",
        "Slots of the worker (its pool's concurrency), read in the worker's parent.",
    ),
    MetricSpec(
        "celery_worker_busy", GAUGE, ("service", "worker", "queue", "pid"), "tasks",
        "Tasks executing now (busy slots), by the queue they came from.",
    ),
    MetricSpec(
        "celery_worker_reserved", GAUGE, ("service", "worker", "queue", "pid"), "tasks",
        "Tasks received and not started (prefetched, waiting for a free slot), by queue.",
    ),
    MetricSpec(
        "celery_worker_children_replaced_total", COUNTER, ("service", "worker"), "processes",
        "Pool children started after the first ones (max_tasks_per_child, crashes, OOM kills).",
    ),
    # ---------------------------------------------------------------- PostgreSQL server view
    # host-wide: published by one process per host (no pid label); see docs/shared-view.md
    MetricSpec(
        "db_server_connections", GAUGE, ("application", "state"), "connections",
        "Server client backends (pg_stat_activity) by application (the service part of "
        "application_name service/pid@host) and state: active, idle, idle in transaction, "
        "idle in transaction (aborted).", host_wide=True,
    ),
    MetricSpec(
        "db_server_wait_events", GAUGE, ("application", "wait_event_type"), "connections",
        "Active server backends waiting, by wait event type (Lock, LWLock, IO, Client, ...).", host_wide=True,
    ),
    MetricSpec(
        "db_server_connections_max", GAUGE, (), "connections",
        "Connections the server accepts from ordinary roles: max_connections minus "
        "superuser_reserved_connections (and reserved_connections on PostgreSQL 16+).", host_wide=True,
    ),
    MetricSpec(
        "db_server_oldest_transaction_seconds", GAUGE, ("application",), "seconds",
        "Age of the oldest open transaction of the application's backends.", host_wide=True,
    ),
    MetricSpec(
        "db_server_oldest_idle_in_transaction_seconds", GAUGE, ("application",), "seconds",
        "Longest time one of the application's backends has sat idle inside a transaction.", host_wide=True,
    ),
    MetricSpec("db_server_connections_by_owner", GAUGE, ("service", "owner", "state"), "connections",
               "Server backends joined to the owner (route template, task, db_owner) whose client connection holds them right now, by backend state: what no server-side exporter can know.", host_wide=True),
    MetricSpec("db_server_statements_active", GAUGE, ("service", "owner", "statement"), "connections",
               "Backends of an owner active on a statement right now, by its text without literals (160 characters, 50 texts).", host_wide=True),
    MetricSpec("db_server_statement_running_seconds", GAUGE, ("service", "owner", "statement"), "seconds",
               "How long the longest of those statements has run (now - query_start).", host_wide=True),
    MetricSpec("db_server_lock_waiting", GAUGE, ("application",), "connections",
               "Backends of the application waiting for a lock (pg_locks not granted).", host_wide=True),
    MetricSpec(
        "db_server_lock_wait_longest_seconds", GAUGE, (), "seconds",
        "The longest current lock wait on the server (pg_locks.waitstart).", host_wide=True,
    ),
    MetricSpec(
        "db_server_lock_blocking", GAUGE,
        ("blocker_service", "blocker_owner", "blocked_service", "blocked_owner"), "connections",
        "Backends waiting for a lock, by who blocks them (pg_blocking_pids: the blocker not itself waiting) and who "
        "waits, each joined to its service and owner (unknown: not on this host or not ours).", host_wide=True,
    ),
    MetricSpec(
        "db_server_view_up", GAUGE, (), "boolean",
        "1 when the last server-view poll succeeded; 0: the db_server_ figures are stale.", host_wide=True,
    ),
    MetricSpec(
        "db_server_view_age_seconds", GAUGE, (), "seconds",
        "Seconds since the db_server_ figures were last read successfully.", host_wide=True,
    ),
    MetricSpec(
        "db_server_view_query_seconds", GAUGE, (), "seconds",
        "Duration of the last server-view query set (pg_stat_activity, pg_locks, settings).", host_wide=True,
    ),
    MetricSpec(
        "db_server_view_errors_total", COUNTER, ("reason",), "errors",
        "Server-view polls that failed: timeout (no answer within shared_view_timeout_seconds), "
        "refused, auth, permission, not_found, error.", host_wide=True,
    ),
    MetricSpec(
        "db_server_view_polls_total", COUNTER, (), "polls",
        "Server-view query sets run (summed over the host's processes: one per interval per host).", host_wide=True,
    ),
    MetricSpec(
        "db_server_events_total", COUNTER, ("event",), "events",
        "Shared-view events emitted: db_lock_wait, db_idle_in_transaction, db_pooler_waiting.", host_wide=True,
    ),
    # ---------------------------------------------------------------- pgbouncer view
    MetricSpec(
        "pgbouncer_clients", GAUGE, ("database", "user", "state"), "connections",
        "Client connections of the pool (SHOW POOLS cl_active, cl_waiting): waiting = queued "
        "for a server connection.", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_servers", GAUGE, ("database", "user", "state"), "connections",
        "Server connections of the pool by state (SHOW POOLS sv_active, sv_idle, sv_used, "
        "sv_tested, sv_login).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_pool_size", GAUGE, ("database",), "connections",
        "Server connections pgbouncer opens per user/database pair (SHOW DATABASES pool_size, else "
        "SHOW CONFIG default_pool_size).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_max_client_connections", GAUGE, (), "connections",
        "Client connections pgbouncer accepts in all (SHOW CONFIG max_client_conn).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_client_maxwait_seconds", GAUGE, ("database", "user"), "seconds",
        "How long the oldest waiting client of the pool has waited (SHOW POOLS maxwait).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_client_wait_seconds_total", COUNTER, ("database",), "seconds",
        "Time clients spent waiting for a server connection since pgbouncer started "
        "(SHOW STATS total_wait_time); rate() of it is the pooler's share of request time.", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_transactions_total", COUNTER, ("database",), "transactions",
        "Transactions pooled since pgbouncer started (SHOW STATS total_xact_count).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_clients_by_application", GAUGE, ("application", "state"), "connections",
        "Client connections by application (SHOW CLIENTS application_name, service part) and "
        "state: active (linked to a server connection), waiting, idle.", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_client_wait_longest_seconds", GAUGE, ("application",), "seconds",
        "The longest current wait of the application's waiting clients (SHOW CLIENTS wait).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_servers_by_application", GAUGE, ("database", "application"), "connections",
        "Server connections held right now, by the application of the client they are linked "
        "to (SHOW SERVERS link -> SHOW CLIENTS): who holds the pooler's connections.", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_view_up", GAUGE, (), "boolean",
        "1 when the last pgbouncer poll succeeded; 0: the pgbouncer_ figures are stale.", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_view_age_seconds", GAUGE, (), "seconds",
        "Seconds since the pgbouncer_ figures were last read successfully.", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_view_query_seconds", GAUGE, (), "seconds",
        "Duration of the last pgbouncer admin query set (SHOW POOLS/STATS/CLIENTS/SERVERS/DATABASES/CONFIG).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_view_polls_total", COUNTER, (), "polls",
        "pgbouncer query sets run (summed over the host's processes: one per interval per host).", host_wide=True,
    ),
    MetricSpec(
        "pgbouncer_view_errors_total", COUNTER, ("reason",), "errors",
        "pgbouncer polls that failed: timeout, refused, auth, permission, not_found, redirect (to another origin: not followed), error; "
        "missing_column: a poll whose SHOW rows lacked columns this version does not have (the rest "
        "was published).", host_wide=True,
    ),
    MetricSpec("db_server_statement_tags_rejected_total", COUNTER, ("reason",), "tags",
               "Statement tags read on the server but not believed (the backend counted as not ours): foreign_session "
               "(another client's session, e.g. psql running a copied statement), dead_process (it names a process of "
               "this host that is gone), malformed. Per backend and poll.", host_wide=True),
    # ---------------------------------------------------------------- tracing
    MetricSpec("telemetry_spans_total", COUNTER, ("service", "result"), "spans",
               "Finished spans by fate: exported, failed (export error), dropped (queue full)."),
    MetricSpec("telemetry_otlp_metric_exports_total", COUNTER, ("service", "result"), "exports",
               "OTLP metric exports of this process (OTEL_METRICS_EXPORTER=otlp) by result: ok, failed."),
    MetricSpec("telemetry_exit_flush_timeouts_total", COUNTER, ("service",), "exits",
               "Process exits whose last export (spans, OTLP metrics) did not finish within the exit bound "
               "(0.3 s): what it carried was dropped rather than hold the exit up."),
]  # fmt: skip

#: host-wide figures published by one polling process per host (the shared view, the Celery
#: backlog): no ``pid`` label, no ``service`` of their own
HOST_WIDE = frozenset(s.name for s in _SPECS if s.host_wide)

CATALOGUE: dict[str, MetricSpec] = {}
for _spec in _SPECS:
    if _spec.name in CATALOGUE:  # pragma: no cover - guarded by a test
        raise RuntimeError(f"metric {_spec.name} defined twice")
    CATALOGUE[_spec.name] = _spec


def spec(name: str) -> MetricSpec:
    return CATALOGUE[name]
