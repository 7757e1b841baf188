"""The shipped rule file, run by the real promtool: syntax, every alert just before and just
after its ``for`` boundary with full labels and annotations, and the cases where it must stay
silent (one idle + one saturated process fires; many processes at 50% do not)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
import yaml

from telemetry._core.catalogue import CATALOGUE
from telemetry.tools.deploy import rules as _rules
from tests import ROOT

from ... import services

RULES = os.path.join(ROOT, "alerts", "telemetry.rules.yml")
POOL = 'service="api",pool="main-db"'


def _promtool() -> str:
    return services.binary("promtool", "prometheus")


def _annotations(
    alert: str, labels: dict[str, str], summary: str, description: str
) -> dict[str, str]:
    """Expected annotations, links expanded as Prometheus' ``urlquery`` (Go's QueryEscape) does:
    a Redis pool named ``127.0.0.1:6379/0`` is escaped, ``main-db`` has nothing to escape."""
    from urllib.parse import quote_plus

    spec = next(a for a in _rules.ALERTS if a.name == alert)
    service, pool = quote_plus(labels.get("service", "")), quote_plus(labels.get("pool", ""))
    out = {
        "summary": summary,
        "description": description,
        "runbook_url": _rules.runbook_url(alert),
        "dashboard_url": _rules.dashboard_url(spec.dashboard_uid)
        .replace("{{ $labels.service | urlquery }}", service)
        .replace("{{ $labels.pool | urlquery }}", pool),
    }
    if spec.log_event:
        out["logs_url"] = (
            _rules.logs_url(spec.log_event)
            .replace("{{ $labels.service | urlquery }}", service)
            .replace("{{ $labels.pool | urlquery }}", pool)
        )
    return out


def _case(alert: str, series: list[dict[str, str]], before: str, after: str,
          labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:  # fmt: skip
    spec = next(a for a in _rules.ALERTS if a.name == alert)
    return {
        "name": f"{alert} fires after its for ({spec.for_}) and not before",
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": before, "alertname": alert, "exp_alerts": []},
            {"eval_time": after, "alertname": alert, "exp_alerts": [{
                "exp_labels": {"severity": spec.severity, **labels},
                "exp_annotations": _annotations(alert, labels, summary, description),
            }]},
        ],
    }  # fmt: skip


def _silent(name: str, series: list[dict[str, str]], at: str, alerts: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [{"eval_time": at, "alertname": a, "exp_alerts": []} for a in alerts],
    }


def _hist(name: str, rates: dict[str, int]) -> list[dict[str, str]]:
    return [{"series": f'{name}_bucket{{{POOL},le="{le}"}}', "values": f"0+{n}x30"}
            for le, n in rates.items()]  # fmt: skip


ONE_HOT_ONE_IDLE = [
    {"series": f'db_pool_connections_in_use{{{POOL},pid="1"}}', "values": "4x30"},
    {"series": f'db_pool_connections_max{{{POOL},pid="1"}}', "values": "4x30"},
    {"series": f'db_pool_connections_in_use{{{POOL},pid="2"}}', "values": "0x30"},
    {"series": f'db_pool_connections_max{{{POOL},pid="2"}}', "values": "4x30"},
]
MANY_AT_HALF = [
    s for pid in range(1, 22) for s in (
        {"series": f'db_pool_connections_in_use{{{POOL},pid="{pid}"}}', "values": "2x30"},
        {"series": f'db_pool_connections_max{{{POOL},pid="{pid}"}}', "values": "4x30"},
    )
]  # fmt: skip
REDIS_POOL = 'service="api",pool="127.0.0.1:6379/0"'
REDIS_ONE_HOT_ONE_IDLE = [
    {"series": f'redis_pool_connections_in_use{{{REDIS_POOL},pid="1"}}', "values": "3x30"},
    {"series": f'redis_pool_connections_max{{{REDIS_POOL},pid="1"}}', "values": "3x30"},
    {"series": f'redis_pool_connections_in_use{{{REDIS_POOL},pid="2"}}', "values": "0x30"},
    {"series": f'redis_pool_connections_max{{{REDIS_POOL},pid="2"}}', "values": "3x30"},
]
BUDGET = [
    {"series": 'db_pool_connections_max{service="api",pool="main-db",pid="1"}', "values": "4x30"},
    {"series": 'db_pool_connections_max{service="api",pool="main-db",pid="2"}', "values": "4x30"},
    {
        "series": 'db_pool_connections_max{service="worker",pool="main-db",pid="3"}',
        "values": "4x30",
    },
]


#: the server view as two hosts' pollers report it (the same server: deduplicated, 34 of 37)
SERVER = [
    s for h in ("h1:9000", "h2:9000") for s in (
        {"series": f'db_server_connections{{application="api",state="idle",instance="{h}"}}', "values": "20x30"},
        {"series": f'db_server_connections{{application="worker",state="active",instance="{h}"}}', "values": "14x30"},
        {"series": f'db_server_connections_max{{instance="{h}"}}', "values": "37x30"},
    )
]  # fmt: skip


def _limit(n: int) -> list[dict[str, str]]:
    return [{"series": 'db_server_connection_limit{service="api",pool="main-db",pid="1"}',
             "values": f"{n}x30"}]  # fmt: skip


CASES = [
    _case("DbPoolUsageWarning", ONE_HOT_ONE_IDLE, "4m", "5m", {"service": "api", "pool": "main-db"},
          "Pool main-db of api is above 80% usage",
          "The busiest api process uses 100% of pool_size + max_overflow on main-db."),
    _case("DbPoolUsageCritical", ONE_HOT_ONE_IDLE, "1m", "2m", {"service": "api", "pool": "main-db"},
          "Pool main-db of api is exhausted",
          "The busiest api process uses 100% of pool_size + max_overflow on main-db: new checkouts "
          "wait or time out."),
    # all observations in (5, 10]: p95 = 5 + 0.95 * 5 = 9.75 s; rate() has data from 1m
    _case("DbConnectionHoldTooLong", _hist("db_connection_hold_seconds", {"1.0": 0, "5.0": 0, "10.0": 10, "+Inf": 10}),
          "10m", "11m", {"service": "api", "pool": "main-db"},
          "Connections of api are held too long on main-db",
          "95% of connection holds on main-db (api) last up to 9.75s (threshold 5s), or connections are "
          "held past it right now (db_pool_connections_held_too_long; the value is then their count)."),
    # a session held for the life of a stream: no hold has ended (the p95 has nothing), the
    # watchdog counts 2 connections held past the threshold in one process
    {**_case("DbConnectionHoldTooLong", [{"series": f'db_pool_connections_held_too_long{{{POOL},pid="7"}}', "values": "2x30"},
                                         {"series": f'db_pool_connections_held_too_long{{{POOL},pid="8"}}', "values": "0x30"}],
             "9m", "10m", {"service": "api", "pool": "main-db"},
             "Connections of api are held too long on main-db",
             "95% of connection holds on main-db (api) last up to 2s (threshold 5s), or connections are "
             "held past it right now (db_pool_connections_held_too_long; the value is then their count)."),
     "name": "DbConnectionHoldTooLong fires on connections held now, before any hold ends"},
    # all in (1, 2.5]: p95 = 1 + 0.95 * 1.5 = 2.425 s
    _case("DbPoolCheckoutWaitHigh", _hist("db_pool_checkout_wait_seconds", {"0.5": 0, "1.0": 0, "2.5": 10, "+Inf": 10}),
          "5m", "6m", {"service": "api", "pool": "main-db"},
          "Checkouts of api wait for connections on main-db",
          "p95 checkout wait on main-db (api) is 2.425s: requests spend that long before their "
          "first query."),
    # behind a pooler that renames its clients (the server sees "Supavisor"): slow first statements
    _case("DbServerWaitHigh", _hist("db_server_wait_seconds", {"0.5": 0, "1.0": 0, "2.5": 10, "+Inf": 10})
          + [{"series": 'db_server_connections{application="Supavisor",state="active"}', "values": "4x30"}],
          "5m", "6m", {"service": "api", "pool": "main-db"},
          "First statements of api's transactions are slow behind the pooler on main-db",
          "p95 of the first statement of api's transactions on main-db is 2.425s behind a transaction "
          "pooler: a queue for a server connection or slow statements, not the pool. `telemetry diagnose` "
          "tells which (the pooler's queue, the server's active backends)."),
    # 6 timeouts a minute from t=0; at 2m rate()[5m] over 3 samples extrapolates to 0.04/s
    _case("DbPoolCheckoutTimeouts", [{"series": f"db_pool_timeouts_total{{{POOL}}}", "values": "0+6x30"}],
          "1m", "2m", {"service": "api", "pool": "main-db"},
          "Checkouts of api time out on main-db",
          "0.04 checkouts per second hit pool_timeout on main-db (api): callers get errors."),
    _case("DbPoolPendingRequests", [{"series": f'db_pool_pending_requests{{{POOL},pid="7"}}', "values": "3x30"}],
          "4m", "5m", {"service": "api", "pool": "main-db"},
          "Callers of api keep queueing for main-db",
          "Some api process has had callers waiting for a connection on main-db for 5m (now 3)."),
    _case("DbPoolConnectErrors", [{"series": f"db_pool_connect_errors_total{{{POOL}}}", "values": "0+60x30"}],
          "2m", "3m", {"service": "api", "pool": "main-db"},
          "api fails to connect to main-db",
          "0.60 failed checkouts per second on main-db (api): the server or pooler refuses or "
          "drops connections."),
    _case("DbConnectionBudgetExceeded", BUDGET + _limit(10), "9m", "10m", {"pool": "main-db"},
          "Worst-case connections to main-db exceed the server limit",
          "All processes together may open 12 connections to main-db, more than the server or "
          "pooler allows: under load, connects will fail. The server side is not measured (set "
          "TELEMETRY_SERVER_VIEW_URL)."),
    _case("DbConnectionBudgetExceeded", BUDGET + _limit(10) + SERVER, "9m", "10m", {"pool": "main-db"},
          "Worst-case connections to main-db exceed the server limit",
          "All processes together may open 12 connections to main-db, more than the server or "
          "pooler allows: under load, connects will fail. Measured on the server now: 34 "
          "connections of 37 usable."),
    # two hosts poll the same pooler: their series are deduplicated (3 waiting, not 6)
    _case("PgbouncerClientsWaiting", [
              {"series": f'pgbouncer_clients{{database="postgres",user="app",state="waiting",instance="{h}"}}', "values": "3x30"}
              for h in ("h1:9000", "h2:9000")],
          "1m", "2m", {"database": "postgres"},
          "Clients queue in pgbouncer for database postgres",
          "Clients have queued for a server connection to postgres within every minute for 2m (up to 3 "
          "at once in the last one): every server connection of the pool is in a transaction. "
          "db_pooler_waiting names the services and owners holding them."),
    # a queue that comes and goes between scrapes (3 waiting in one scrape a minute, at 15 s
    # resolution, never at an evaluation instant) still fires: the pool is full whenever it is
    # looked at closely
    {**_case("PgbouncerClientsWaiting", [
              {"series": 'pgbouncer_clients{database="postgres",user="app",state="waiting",instance="h1:9000"}',
               "values": " ".join(["0 3 0 0"] * 20)}],
          "1m", "3m", {"database": "postgres"},
          "Clients queue in pgbouncer for database postgres",
          "Clients have queued for a server connection to postgres within every minute for 2m (up to 3 "
          "at once in the last one): every server connection of the pool is in a transaction. "
          "db_pooler_waiting names the services and owners holding them."),
     "interval": "15s", "name": "PgbouncerClientsWaiting fires on a queue that flickers between scrapes"},
    _case("PgbouncerClientWaitCritical",
          [{"series": 'pgbouncer_client_maxwait_seconds{database="postgres",user="app"}', "values": "12x30"}],
          "0m", "1m", {"database": "postgres"},
          "Clients wait over 5s in pgbouncer for postgres",
          "Clients of postgres have waited up to 12s within each minute: requests and tasks stall before "
          "their first statement."),
    _case("DbServerConnectionsNearMax", SERVER, "4m", "5m", {},
          "The database server is near max_connections",
          "91.89% of the server's usable connections (max_connections minus reserved) are open: "
          "the next pool growth or deploy overlap gets refused."),
    _case("DbLockWaitLong", [{"series": "db_server_lock_wait_longest_seconds", "values": "25x30"}],
          "0m", "1m", {},
          "Backends wait over 10s for locks",
          "Backends have waited up to 25s for a lock within each minute. db_lock_wait names the blocking "
          "owner (route or task) and each blocked one."),
    # a row lock held across slow calls, episode after episode: each victim waits up to 40 s, then
    # the next one starts from 0 (15 s resolution). The instant gauge is above 10 s only 2 scrapes
    # in 3 and a for: on it never fired; the longest within each minute does
    {**_case("DbLockWaitLong", [{"series": "db_server_lock_wait_longest_seconds",
                                 "values": " ".join(["0 15 30 40"] * 20)}],
             "0m", "2m", {},
             "Backends wait over 10s for locks",
             "Backends have waited up to 40s for a lock within each minute. db_lock_wait names the blocking "
             "owner (route or task) and each blocked one."),
     "interval": "15s", "name": "DbLockWaitLong fires on lock waits that come in episodes"},
    _case("DbIdleInTransactionLong",
          [{"series": 'db_server_oldest_idle_in_transaction_seconds{application="worker"}', "values": "45x30"}],
          "1m", "2m", {"application": "worker"},
          "worker keeps transactions open while idle",
          "Backends of worker have sat idle inside a transaction for up to 45s within each minute: it holds "
          "its server connection (and its locks) while doing something else."),
    _case("TelemetrySharedViewDown",
          [{"series": 'db_server_view_up{job="api",instance="h1:9000"}', "values": "0x30"},
           {"series": 'pgbouncer_view_up{job="api",instance="h1:9000"}', "values": "1x30"}],
          "4m", "5m", {"job": "api", "instance": "h1:9000"},
          "The server or pooler view of h1:9000 is failing",
          "The host's poller cannot read PostgreSQL or pgbouncer: the db_server_ / pgbouncer_ "
          "figures are stale (see db_server_view_errors_total, pgbouncer_view_errors_total by reason)."),
    # 30 more messages a minute from 150: above 100, and delta() is positive from the 2nd sample
    # (1m): pending from 1m, firing at 11m
    _case("CeleryQueueBacklogGrowing",
          [{"series": f'celery_queue_length{{broker="redis://r:6379/0",queue="content",instance="{h}"}}', "values": "150+30x30"}
           for h in ("h1:9000", "h2:9000")],
          "10m", "11m", {"broker": "redis://r:6379/0", "queue": "content"},
          "Queue content keeps growing",
          "480 messages wait in content (redis://r:6379/0) and the backlog grew over the last 10 "
          "minutes: the workers consuming it cannot keep up."),
    _case("CeleryQueueOldestMessageOld",
          [{"series": 'celery_queue_oldest_message_seconds{broker="redis://r:6379/0",queue="content"}', "values": "600x30"}],
          "4m", "5m", {"broker": "redis://r:6379/0", "queue": "content"},
          "Messages wait over 300s in content",
          "The oldest message in content (redis://r:6379/0) has waited 10m 0s: no worker takes from "
          "it, or all its slots are busy."),
    _case("CeleryWorkerSlotsSaturated",
          [{"series": 'celery_worker_busy{service="content-worker",worker="celery@h1",queue="content",pid="5"}', "values": "6x30"},
           {"series": 'celery_worker_pool_size{service="content-worker",worker="celery@h1",pid="5"}', "values": "6x30"}],
          "9m", "10m", {"service": "content-worker", "worker": "celery@h1"},
          "Every slot of celery@h1 (content-worker) is busy",
          "All pool processes of celery@h1 (content-worker) have been executing tasks for 10m: new "
          "tasks wait in the queue (see celery_worker_reserved and the backlog)."),
    _silent("celery capacity: a small steady backlog, young messages, free slots", [
        {"series": 'celery_queue_length{broker="redis://r:6379/0",queue="content"}', "values": "500x30"},
        {"series": 'celery_queue_oldest_message_seconds{broker="redis://r:6379/0",queue="content"}', "values": "20x30"},
        {"series": 'celery_worker_busy{service="w",worker="celery@h1",queue="content",pid="5"}', "values": "5x30"},
        {"series": 'celery_worker_pool_size{service="w",worker="celery@h1",pid="5"}', "values": "6x30"},
    ], "25m", ["CeleryQueueBacklogGrowing", "CeleryQueueOldestMessageOld", "CeleryWorkerSlotsSaturated"]),
    _silent("shared side healthy: no queue, short waits, room on the server, views up", [
        {"series": 'pgbouncer_clients{database="postgres",user="app",state="waiting"}', "values": "0x30"},
        {"series": 'pgbouncer_client_maxwait_seconds{database="postgres",user="app"}', "values": "1x30"},
        {"series": 'db_server_connections{application="api",state="idle"}', "values": "10x30"},
        {"series": "db_server_connections_max", "values": "37x30"},
        {"series": "db_server_lock_wait_longest_seconds", "values": "2x30"},
        {"series": 'db_server_oldest_idle_in_transaction_seconds{application="worker"}', "values": "3x30"},
        {"series": 'db_server_view_up{job="api",instance="h1:9000"}', "values": "1x30"},
    ], "20m", ["PgbouncerClientsWaiting", "PgbouncerClientWaitCritical", "DbServerConnectionsNearMax",
               "DbLockWaitLong", "DbIdleInTransactionLong", "TelemetrySharedViewDown"]),
    # one blocked episode a minute from t=1m: increase()[5m] reads 5 once the window is full
    _case("EventLoopBlocked", [{"series": 'event_loop_blocked_total{service="api"}', "values": "0+1x30"}],
          "5m", "6m", {"service": "api"},
          "The event loop of api keeps getting blocked",
          "5 blocked episodes (over 0.5s) in 5 minutes in api: sync work inside async def stalls every "
          "request of that process."),
    _case("SemaphoreConvoy", [{"series": 'asyncio_semaphore_waiters{service="worker",semaphore="MAX_DB_CONCURRENT",pid="3"}', "values": "27x30"},
                              {"series": 'asyncio_semaphore_waiters{service="worker",semaphore="MAX_DB_CONCURRENT",pid="4"}', "values": "0x30"}],
          "9m", "10m", {"service": "worker", "semaphore": "MAX_DB_CONCURRENT"},
          "Tasks of worker keep queueing on semaphore MAX_DB_CONCURRENT",
          "Some worker process has had tasks waiting for MAX_DB_CONCURRENT for 10m (now 27): throughput is "
          "capped there."),
    _case("CeleryTaskFailureRateHigh", [
              {"series": 'celery_tasks_total{service="worker",task="generate_content",queue="content",outcome="succeeded"}', "values": "0+8x30"},
              {"series": 'celery_tasks_total{service="worker",task="generate_content",queue="content",outcome="failed"}', "values": "0+2x30"}],
          "10m", "11m", {"service": "worker", "task": "generate_content"},
          "Task generate_content of worker fails often",
          "20% of generate_content runs fail (threshold 10%)."),
    # all waits in (60, 120]: p95 = 60 + 0.95 * 60 = 117 s
    _case("CeleryQueueWaitHigh", [
              {"series": f'celery_task_queue_wait_seconds_bucket{{service="worker",task="generate_content",queue="content",le="{le}"}}', "values": v}
              for le, v in (("30.0", "0x30"), ("60.0", "0x30"), ("120.0", "0+10x30"), ("+Inf", "0+10x30"))],
          "10m", "11m", {"service": "worker", "task": "generate_content", "queue": "content"},
          "Task generate_content waits long in queue content",
          "p95 queue wait of generate_content on content is 1m 57s: workers cannot keep up."),
    _case("TelemetrySpansLost", [{"series": 'telemetry_spans_total{service="api",result="dropped"}', "values": "0+60x30"},
                                 {"series": 'telemetry_spans_total{service="api",result="exported"}', "values": "0+600x30"}],
          "15m", "16m", {"service": "api"},
          "api is losing spans",
          "1.00 spans per second fail to export or are dropped from a full queue in api: the collector is "
          "down or too slow."),
    _silent("healthy loops, free semaphores, few failures, short queues, spans exported", [
        {"series": 'event_loop_blocked_total{service="api"}', "values": "3x30"},
        {"series": 'asyncio_semaphore_waiters{service="worker",semaphore="MAX_DB_CONCURRENT",pid="3"}', "values": "0x30"},
        {"series": 'celery_tasks_total{service="worker",task="t",queue="q",outcome="succeeded"}', "values": "0+95x30"},
        {"series": 'celery_tasks_total{service="worker",task="t",queue="q",outcome="failed"}', "values": "0+5x30"},
        {"series": 'celery_task_queue_wait_seconds_bucket{service="worker",task="t",queue="q",le="1.0"}', "values": "0+10x30"},
        {"series": 'celery_task_queue_wait_seconds_bucket{service="worker",task="t",queue="q",le="+Inf"}', "values": "0+10x30"},
        {"series": 'telemetry_spans_total{service="api",result="exported"}', "values": "0+600x30"},
    ], "25m", ["EventLoopBlocked", "SemaphoreConvoy", "CeleryTaskFailureRateHigh", "CeleryQueueWaitHigh", "TelemetrySpansLost"]),
    _case("RedisPoolUsageWarning", REDIS_ONE_HOT_ONE_IDLE, "4m", "5m", {"service": "api", "pool": "127.0.0.1:6379/0"},
          "Redis pool 127.0.0.1:6379/0 of api is above 80% usage",
          "The busiest api process uses 100% of max_connections on Redis 127.0.0.1:6379/0."),
    _case("RedisPoolUsageCritical", REDIS_ONE_HOT_ONE_IDLE, "1m", "2m", {"service": "api", "pool": "127.0.0.1:6379/0"},
          "Redis pool 127.0.0.1:6379/0 of api is exhausted",
          "The busiest api process uses 100% of max_connections on Redis 127.0.0.1:6379/0: new "
          "commands wait or fail."),
    # 6 timeouts a minute from t=0 (the stream/publish exhaustion); rate()[5m] at 2m: 0.04/s
    _case("RedisPoolCheckoutFailures",
          [{"series": f'redis_pool_checkouts_total{{{REDIS_POOL},result="timeout"}}', "values": "0+6x30"},
           {"series": f'redis_pool_checkouts_total{{{REDIS_POOL},result="ok"}}', "values": "0+600x30"}],
          "1m", "2m", {"service": "api", "pool": "127.0.0.1:6379/0"},
          "Redis commands of api find no connection on 127.0.0.1:6379/0",
          "0.04 checkouts per second on Redis 127.0.0.1:6379/0 (api) time out or exceed "
          "max_connections: callers get errors."),
    _silent("redis: many processes at half, failures flat: nothing fires",
            [s for pid in range(1, 22) for s in (
                {"series": f'redis_pool_connections_in_use{{{REDIS_POOL},pid="{pid}"}}', "values": "1x30"},
                {"series": f'redis_pool_connections_max{{{REDIS_POOL},pid="{pid}"}}', "values": "2x30"})]
            + [{"series": f'redis_pool_checkouts_total{{{REDIS_POOL},result="timeout"}}', "values": "4x30"}],
            "20m", ["RedisPoolUsageWarning", "RedisPoolUsageCritical", "RedisPoolCheckoutFailures"]),
    _silent("21 processes each at 50%: no usage alert", MANY_AT_HALF, "20m",
            ["DbPoolUsageWarning", "DbPoolUsageCritical"]),
    _silent("idle pools, flat counters: nothing fires",
            ONE_HOT_ONE_IDLE[2:] + [
                {"series": f"db_pool_timeouts_total{{{POOL}}}", "values": "5x30"},
                {"series": f"db_pool_connect_errors_total{{{POOL}}}", "values": "2x30"},
                {"series": f'db_pool_pending_requests{{{POOL},pid="2"}}', "values": "0x30"},
            ], "20m",
            ["DbPoolUsageWarning", "DbPoolUsageCritical", "DbPoolCheckoutTimeouts",
             "DbPoolConnectErrors", "DbPoolPendingRequests"]),
    _silent("budget within the limit", BUDGET + _limit(50), "20m", ["DbConnectionBudgetExceeded"]),
    # no pooler in the path (no pooler view, the server sees only our own names): the first
    # statement's time is its own, no wait for a server connection
    _silent("slow first statements on a direct server",
            _hist("db_server_wait_seconds", {"0.5": 0, "1.0": 0, "2.5": 10, "+Inf": 10})
            + [{"series": 'db_server_connections{application="api",state="active"}', "values": "4x30"}], "20m",
            ["DbServerWaitHigh"]),
    _silent("fast holds and waits", _hist("db_connection_hold_seconds", {"0.1": 10, "5.0": 10, "+Inf": 10})
            + _hist("db_pool_checkout_wait_seconds", {"0.01": 10, "1.0": 10, "+Inf": 10})
            + _hist("db_server_wait_seconds", {"0.01": 10, "1.0": 10, "+Inf": 10}), "20m",
            ["DbConnectionHoldTooLong", "DbPoolCheckoutWaitHigh", "DbServerWaitHigh"]),
]  # fmt: skip


@pytest.mark.integration
def test_rules_pass_promtool_check():
    out = subprocess.run([_promtool(), "check", "rules", RULES], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules.ALERTS) + len(_rules.RECORDING)} rules found" in out.stdout


def test_every_alert_has_a_case_and_a_runbook():
    tested = {
        c["alert_rule_test"][-1]["alertname"] for c in CASES if c["name"].endswith("not before")
    }
    assert tested == {a.name for a in _rules.ALERTS}
    for alert in _rules.ALERTS:
        assert os.path.exists(os.path.join(ROOT, "docs", "runbooks", f"{alert.name}.md")), (
            alert.name
        )


@pytest.mark.integration
def test_alerts_with_promtool(tmp_path):
    tests = {"rule_files": [RULES], "evaluation_interval": "1m", "tests": CASES}
    path = tmp_path / "telemetry.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False, width=1000))
    out = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rule_expressions_name_only_exported_metrics():
    import re

    with open(RULES) as fh:
        rules = yaml.safe_load(fh)["groups"]
    recorded = {r["record"] for g in rules for r in g["rules"] if "record" in r}
    for group in rules:
        for rule in group["rules"]:
            expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # a label's value names no metric
            for name in re.findall(r"\b([a-z_][a-z0-9_:]*)\b(?=\s*[{\[)]|\s*/|\s*>|\s*$)", expr):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                labels = {lb for spec in CATALOGUE.values() for lb in spec.labels} | {
                    "le",
                    "job",
                    "instance",
                }
                promql = {
                    "by",
                    "on",
                    "or",
                    "rate",
                    "max",
                    "min",
                    "sum",
                    "increase",
                    "histogram_quantile",
                }
                if name in recorded or name in labels or name in promql:
                    continue
                assert base in CATALOGUE or name in CATALOGUE, (
                    f"{rule.get('alert') or rule.get('record')}: {name}"
                )
