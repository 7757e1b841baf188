"""Database server and pooler: what the services share. PostgreSQL's own view (connections by
application and state, wait events, oldest transactions, lock waits) and pgbouncer's (clients
waiting, server connections, who holds them), joined to the owners the package knows."""

from telemetry import thresholds as T
from telemetry.tools.deploy.dashboards import (
    OPS,
    SECONDS,
    SHORT,
    dashboard,
    series,
    stat,
    text,
)

dashboard = dashboard(
    "Database server and pooler", T.DASHBOARD_UID_SERVER,
    "The shared side: PostgreSQL and pgbouncer as the host's poller sees them (one query set per "
    "host per interval; series deduplicated across hosts with max).",
    panels=[
        stat("Server connections / usable", "server:db_server_connections:sum / server:db_server_connections_max:max",
             "percentunit", (0, 0, 6, 4), lines=(T.SERVER_CONNECTIONS_RATIO_WARNING,)),
        stat("Clients waiting in pgbouncer", "sum(database:pgbouncer_clients_waiting:max)", SHORT, (6, 0, 6, 4), lines=(1,)),
        stat("Longest lock wait", "server:db_server_lock_wait_longest_seconds:max", SECONDS, (12, 0, 6, 4),
             lines=(T.LOCK_WAIT_SECONDS_WARNING,)),
        stat("Views up (server, pooler)", "min(db_server_view_up) + min(pgbouncer_view_up)", SHORT, (18, 0, 6, 4),
             description="2: both views read fine; less: figures are stale (see the errors panel)."),
        series("Server connections by application and state", [
            ("max by (application, state) (db_server_connections)", "{{application}} {{state}}"),
            ("server:db_server_connections_max:max", "usable (max_connections - reserved)"),
        ], SHORT, (0, 4, 12, 8), stack=False),
        series("Server connections by owner (route, task, db_owner)", [
            ("max by (service, owner, state) (db_server_connections_by_owner)", "{{service}} {{owner}} {{state}}"),
        ], SHORT, (12, 4, 12, 8), "Joined through the backend pid (direct) or pgbouncer's client link (pooled)."),
        series("Waiting backends by wait event type", [
            ("max by (application, wait_event_type) (db_server_wait_events)", "{{application}} {{wait_event_type}}"),
        ], SHORT, (0, 12, 12, 8)),
        series("Oldest transaction and idle in transaction, by application", [
            ("max by (application) (db_server_oldest_transaction_seconds)", "xact {{application}}"),
            ("application:db_server_oldest_idle_in_transaction_seconds:max", "idle in xact {{application}}"),
        ], SECONDS, (12, 12, 12, 8), lines=(T.IDLE_IN_TRANSACTION_SECONDS_WARNING,)),
        series("Lock waits: who blocks whom", [
            ("max by (blocker_service, blocker_owner, blocked_service, blocked_owner) (db_server_lock_blocking)",
             "{{blocker_service}} {{blocker_owner}} -> {{blocked_service}} {{blocked_owner}}"),
            ("server:db_server_lock_wait_longest_seconds:max", "longest wait s"),
        ], SHORT, (0, 20, 12, 8), "db_lock_wait events carry the statements (no parameters) and trace ids."),
        series("pgbouncer: clients active / waiting, servers by state", [
            ("max by (database, state) (pgbouncer_clients)", "clients {{state}} {{database}}"),
            ("max by (database, state) (pgbouncer_servers)", "servers {{state}} {{database}}"),
            ("max by (database) (pgbouncer_pool_size)", "pool_size {{database}}"),
        ], SHORT, (12, 20, 12, 8)),
        series("pgbouncer: who holds the server connections, who waits", [
            ("max by (application) (pgbouncer_servers_by_application)", "held by {{application}}"),
            ('max by (application) (pgbouncer_clients_by_application{state="waiting"})', "waiting {{application}}"),
        ], SHORT, (0, 28, 12, 8)),
        series("pgbouncer: client wait (longest now, share of time)", [
            ("database:pgbouncer_client_maxwait_seconds:max", "longest now {{database}}"),
            ("max by (database) (rate(pgbouncer_client_wait_seconds_total[$__rate_interval]))",
             "clients waiting on average {{database}}"),
        ], SECONDS, (12, 28, 12, 8), lines=(T.POOLER_MAXWAIT_SECONDS_CRITICAL,)),
        series("View health: poll errors and age", [
            ("sum by (reason) (rate(db_server_view_errors_total[$__rate_interval]))", "server {{reason}}"),
            ("sum by (reason) (rate(pgbouncer_view_errors_total[$__rate_interval]))", "pgbouncer {{reason}}"),
        ], OPS, (0, 36, 12, 8)),
        text("Reading this dashboard", "A pool checkout that succeeds can still wait: in pgbouncer "
             "(clients waiting: every server connection is in someone's transaction) or on a lock. "
             "The owner panels name the route or task holding server connections; the "
             "`db_pooler_waiting`, `db_lock_wait` and `db_idle_in_transaction` events carry the same "
             "join with trace ids. Runbooks: PgbouncerClientsWaiting, DbLockWaitLong, "
             "DbIdleInTransactionLong, DbServerConnectionsNearMax.", (12, 36, 12, 8)),
        series("Waiting for a server connection (first statement of transactions), p95", [
            ("histogram_quantile(0.95, sum by (le, service, owner) "
             "(rate(db_server_wait_seconds_bucket{service=~\"$service\"}[$__rate_interval])))",
             "{{service}} {{owner}}"),
        ], SECONDS, (0, 44, 24, 8), "Measured by each client, no pooler console needed: behind a transaction "
           "pooler a server connection is assigned at a transaction's first statement (DbServerWaitHigh).",
           lines=(T.SERVER_WAIT_P95_SECONDS_WARNING,)),
    ],
    pool=False,
)  # fmt: skip
