"""Database and Redis pools: usage per service and process, pressure, wait, hold by owner,
budget."""

from telemetry import thresholds as T
from telemetry.tools.deploy.dashboards import (
    OPS,
    PERCENT,
    POOL,
    RATE,
    SECONDS,
    SHORT,
    SVC,
    dashboard,
    heatmap,
    series,
)

USAGE = f"db_pool_connections_in_use{{{POOL}}} / db_pool_connections_max{{{POOL}}}"
#: Redis pools are named host:port/db, not database pools: filtered by service only
REDIS_USAGE = f"redis_pool_connections_in_use{{{SVC}}} / redis_pool_connections_max{{{SVC}}}"

dashboard = dashboard(
    "Database pools", T.DASHBOARD_UID_POOLS,
    "Pool usage against pool_size + max_overflow, who holds connections and for how long.",
    panels=[
        series("Usage of the busiest process, by service", [(f"max by (service, pool) ({USAGE})", "{{service}} {{pool}}")],
               PERCENT, (0, 0, 12, 8), "The alert's view: one saturated process among idle ones shows here.",
               lines=(T.POOL_USAGE_WARNING, T.POOL_USAGE_CRITICAL)),
        series("Usage per process", [(USAGE, "{{service}} {{pool}} pid {{pid}}")], PERCENT, (12, 0, 12, 8),
               lines=(T.POOL_USAGE_WARNING, T.POOL_USAGE_CRITICAL)),
        series("In use / idle / overflow / pending (host)", [
            (f"sum by (service, pool) (db_pool_connections_in_use{{{POOL}}})", "in use {{service}}"),
            (f"sum by (service, pool) (db_pool_connections_idle{{{POOL}}})", "idle {{service}}"),
            (f"sum by (service, pool) (db_pool_overflow{{{POOL}}})", "overflow {{service}}"),
            (f"sum by (service, pool) (db_pool_pending_requests{{{POOL}}})", "pending {{service}}"),
        ], SHORT, (0, 8, 12, 8)),
        series("Checkout wait p50 / p95 / p99", [
            (f"histogram_quantile({q}, sum by (le, service, pool) (rate(db_pool_checkout_wait_seconds_bucket{{{POOL}}}[{RATE}])))",
             f"p{int(q * 100)} {{{{service}}}}") for q in (0.5, 0.95, 0.99)
        ], SECONDS, (12, 8, 12, 8), lines=(T.WAIT_P95_SECONDS_WARNING,)),
        series("Checkout timeouts and connect errors", [
            (f"sum by (service, pool) (rate(db_pool_timeouts_total{{{POOL}}}[{RATE}]))", "timeouts {{service}}"),
            (f"sum by (service, pool) (rate(db_pool_connect_errors_total{{{POOL}}}[{RATE}]))", "connect errors {{service}}"),
        ], OPS, (0, 16, 12, 8)),
        series("Hold time p95 by owner", [
            (f"histogram_quantile(0.95, sum by (le, service, owner) (rate(db_connection_hold_seconds_bucket{{{POOL}}}[{RATE}])))",
             "{{service}} {{owner}}"),
        ], SECONDS, (12, 16, 12, 8), "Owner: route template, task name or db_owner() block.",
               lines=(T.HOLD_SECONDS_WARNING,)),
        heatmap("Hold times", f"sum by (le) (increase(db_connection_hold_seconds_bucket{{{POOL}}}[{RATE}]))", (0, 24, 12, 8)),
        series("Top holders: connections held on average, by owner", [
            (f"topk(10, sum by (service, owner) (rate(db_connection_hold_seconds_sum{{{POOL}}}[{RATE}])))", "{{service}} {{owner}}"),
            (f"sum by (service, pool) (db_pool_connections_held_too_long{{{POOL}}})", "held past threshold now {{service}}"),
        ], SHORT, (12, 24, 12, 8), "Seconds held per second = average number of connections that owner keeps."),
        series("Connects and invalidations", [
            (f"sum by (service, pool) (rate(db_pool_connects_total{{{POOL}}}[{RATE}]))", "connects {{service}}"),
            (f"sum by (service, pool, kind) (rate(db_pool_invalidations_total{{{POOL}}}[{RATE}]))", "invalidations {{kind}} {{service}}"),
            (f"histogram_quantile(0.95, sum by (le, service) (rate(db_pool_connect_seconds_bucket{{{POOL}}}[{RATE}])))", "connect p95 s {{service}}"),
        ], OPS, (0, 32, 12, 8)),
        series("Connection budget: worst case against the server limit", [
            ('sum by (pool) (db_pool_connections_max{pool=~"$pool"})', "worst case {{pool}}"),
            ('sum by (pool) (db_pool_connections_in_use{pool=~"$pool"})', "in use {{pool}}"),
            ('max by (pool) (db_server_connection_limit{pool=~"$pool"})', "server limit {{pool}}"),
        ], SHORT, (12, 32, 12, 8), "All services and processes together (pools to one database share a name)."),
        series("Redis pool usage of the busiest process", [(f"max by (service, pool) ({REDIS_USAGE})", "{{service}} {{pool}}")],
               PERCENT, (0, 40, 12, 8), "redis-py pools (the app's, kombu's, the result backend's) against max_connections.",
               lines=(T.POOL_USAGE_WARNING, T.POOL_USAGE_CRITICAL)),
        series("Redis in use / waiting / held too long (host)", [
            (f"sum by (service, pool) (redis_pool_connections_in_use{{{SVC}}})", "in use {{service}} {{pool}}"),
            (f"sum by (service, pool) (redis_pool_pending_requests{{{SVC}}})", "waiting {{service}} {{pool}}"),
            (f"sum by (service, pool) (redis_pool_connections_held_too_long{{{SVC}}})", "held past threshold {{service}} {{pool}}"),
        ], SHORT, (12, 40, 12, 8)),
        series("Redis checkout failures and wait p95", [
            (f'sum by (service, pool, result) (rate(redis_pool_checkouts_total{{{SVC}, result!="ok"}}[{RATE}]))',
             "{{result}} {{service}} {{pool}}"),
            (f"histogram_quantile(0.95, sum by (le, service, pool) (rate(redis_pool_checkout_wait_seconds_bucket{{{SVC}}}[{RATE}])))",
             "wait p95 s {{service}} {{pool}}"),
        ], OPS, (0, 48, 12, 8), "timeout: BlockingConnectionPool waited its timeout; too_many: past max_connections."),
        series("Redis hold p95 and connections held on average, by owner", [
            (f"histogram_quantile(0.95, sum by (le, service, owner) (rate(redis_connection_hold_seconds_bucket{{{SVC}}}[{RATE}])))",
             "p95 s {{service}} {{owner}}"),
            (f"topk(10, sum by (service, owner) (rate(redis_connection_hold_seconds_sum{{{SVC}}}[{RATE}])))",
             "held on average {{service}} {{owner}}"),
        ], SECONDS, (12, 48, 12, 8), "A stream that keeps a subscription shows as a long hold by its route."),
        # the shared side (TELEMETRY_SERVER_VIEW_URL / TELEMETRY_PGBOUNCER_URL): where the wait
        # goes once a pool checkout has succeeded; details on the database server dashboard
        series("Pooler queue: clients waiting and who holds the server connections", [
            ('max by (database) (pgbouncer_clients{state="waiting"})', "waiting {{database}}"),
            ("max by (database, application) (pgbouncer_servers_by_application)", "held by {{application}}"),
            ("max by (database) (pgbouncer_pool_size)", "pool_size {{database}}"),
        ], SHORT, (0, 56, 12, 8), "A pool checkout that succeeds can still wait here, in pgbouncer."),
        series("Server connections by owner (joined) and lock waits", [
            ("max by (service, owner, state) (db_server_connections_by_owner)", "{{service}} {{owner}} {{state}}"),
            ("max by (blocker_owner, blocked_owner) (db_server_lock_blocking)", "{{blocker_owner}} blocks {{blocked_owner}}"),
        ], SHORT, (12, 56, 12, 8), "Which route or task holds each server backend right now, and who blocks whom."),
    ],
)  # fmt: skip
