"""Prometheus recording and alerting rules, generated from :mod:`telemetry.thresholds`.

Conventions (after the monitoring mixins): alerts named ``<Component><Condition>``, always a
``for:``, ``severity`` the only routing label, annotations ``summary``, ``description`` (templated
with labels and value), ``runbook_url``, ``dashboard_url`` and, where a log event explains the
alert, ``logs_url`` (Grafana Explore on Loki with the shipped LogQL query).
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from typing import Any

from .. import thresholds as T
from .promql import check_selector, with_selector

POOL_LABELS = "service, pool"

RECORDING: list[tuple[str, str]] = [
    # one saturated process must be visible among idle ones: max over pid, never sum
    ("service_pool:db_pool_usage:max",
     f"max by ({POOL_LABELS}) (db_pool_connections_in_use / db_pool_connections_max)"),
    ("service_pool:db_pool_connections_in_use:sum",
     f"sum by ({POOL_LABELS}) (db_pool_connections_in_use)"),
    ("service_pool:db_pool_pending_requests:max",
     f"max by ({POOL_LABELS}) (db_pool_pending_requests)"),
    ("service_pool:db_pool_connections_held_too_long:max",
     f"max by ({POOL_LABELS}) (db_pool_connections_held_too_long)"),
    ("service_pool:db_connection_hold_seconds:p95_5m",
     f"histogram_quantile(0.95, sum by (le, {POOL_LABELS}) (rate(db_connection_hold_seconds_bucket[5m])))"),
    ("service_pool:db_pool_checkout_wait_seconds:p95_5m",
     f"histogram_quantile(0.95, sum by (le, {POOL_LABELS}) (rate(db_pool_checkout_wait_seconds_bucket[5m])))"),
    ("service_pool:db_server_wait_seconds:p95_5m",
     f"histogram_quantile(0.95, sum by (le, {POOL_LABELS}) (rate(db_server_wait_seconds_bucket[5m])))"),
    ("service_pool:db_pool_timeouts:rate5m",
     f"sum by ({POOL_LABELS}) (rate(db_pool_timeouts_total[5m]))"),
    ("service_pool:db_pool_connect_errors:rate5m",
     f"sum by ({POOL_LABELS}) (rate(db_pool_connect_errors_total[5m]))"),
    ("service:event_loop_blocked:increase5m",
     "sum by (service) (increase(event_loop_blocked_total[5m]))"),
    ("service_semaphore:asyncio_semaphore_waiters:max",
     "max by (service, semaphore) (asyncio_semaphore_waiters)"),
    ("service_task:celery_tasks_failed:ratio_rate5m",
     'sum by (service, task) (rate(celery_tasks_total{outcome="failed"}[5m])) / '
     "sum by (service, task) (rate(celery_tasks_total[5m]))"),
    ("service_task_queue:celery_task_queue_wait_seconds:p95_5m",
     "histogram_quantile(0.95, sum by (le, service, task, queue) (rate(celery_task_queue_wait_seconds_bucket[5m])))"),
    ("service:telemetry_spans_lost:rate5m",
     'sum by (service) (rate(telemetry_spans_total{result=~"failed|dropped"}[5m]))'),
    # redis-py pools: the same maths as the database pools (max over processes, never sum)
    ("service_pool:redis_pool_usage:max",
     f"max by ({POOL_LABELS}) (redis_pool_connections_in_use / redis_pool_connections_max)"),
    ("service_pool:redis_pool_checkout_failures:rate5m",
     f'sum by ({POOL_LABELS}) (rate(redis_pool_checkouts_total{{result=~"timeout|too_many"}}[5m]))'),
    # the connection budget: pools to one database share a name across services
    ("pool:db_pool_connections_max:sum", "sum by (pool) (db_pool_connections_max)"),
    ("pool:db_server_connection_limit:max", "max by (pool) (db_server_connection_limit)"),
    # the shared view: every host's poller reports the same server and pooler, so series are
    # deduplicated with max across hosts before any sum
    ("server:db_server_connections:sum",
     "sum(max by (application, state) (db_server_connections))"),
    ("server:db_server_connections_max:max", "max(db_server_connections_max)"),
    ("server:db_server_lock_wait_longest_seconds:max", "max(db_server_lock_wait_longest_seconds)"),
    ("application:db_server_oldest_idle_in_transaction_seconds:max",
     "max by (application) (db_server_oldest_idle_in_transaction_seconds)"),
    ("database:pgbouncer_clients_waiting:max",
     'max by (database) (sum by (database, instance) (pgbouncer_clients{state="waiting"}))'),
    ("database:pgbouncer_client_maxwait_seconds:max",
     "max by (database) (pgbouncer_client_maxwait_seconds)"),
    # Celery capacity: the backlog is host-wide (one poller per host: max across hosts), slots
    # are per worker (its parent process)
    ("broker_queue:celery_queue_length:max", "max by (broker, queue) (celery_queue_length)"),
    ("broker_queue:celery_queue_oldest_message_seconds:max",
     "max by (broker, queue) (celery_queue_oldest_message_seconds)"),
    ("service_worker:celery_worker_busy:ratio",
     "sum by (service, worker) (celery_worker_busy) / max by (service, worker) (celery_worker_pool_size)"),
]  # fmt: skip

LOG_QUERIES = {
    "event_loop_blocked": '{service="$service"} | json | event="event_loop_blocked"',
    "db_pool_critical_usage": '{service="$service"} | json | event="db_pool_critical_usage" | pool="$pool"',
    "db_connection_held_too_long": '{service="$service"} | json | event="db_connection_held_too_long" | pool="$pool"',
    "db_pool_timeout": '{service="$service"} | json | event="db_pool_timeout" | pool="$pool"',
    "redis_connection_held_too_long": '{service="$service"} | json | event="redis_connection_held_too_long" | pool="$pool"',
    # the shared view's events come from whichever process polls: any service
    "db_lock_wait": '{service=~".+"} | json | event="db_lock_wait"',
    "db_idle_in_transaction": '{service=~".+"} | json | event="db_idle_in_transaction"',
    "db_pooler_waiting": '{service=~".+"} | json | event="db_pooler_waiting"',
}


@dataclasses.dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    dashboard_uid: str = T.DASHBOARD_UID_POOLS
    log_event: str | None = None


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


@dataclasses.dataclass(frozen=True)
class RulesConfig:
    """What a deployment tunes, as monitoring mixins do: where the series are (a selector added
    to every metric), the thresholds (defaults: ``telemetry.thresholds``), where links point,
    and two clocks for the demo, which compresses production: ``for_scale`` multiplies the
    ``for:`` durations and the range windows (a scenario of seconds stands for minutes),
    ``seconds_scale`` the thresholds that are durations (its work runs faster too)."""

    selector: str = ""
    pool_usage_warning: float = T.POOL_USAGE_WARNING
    pool_usage_critical: float = T.POOL_USAGE_CRITICAL
    hold_seconds: float = T.HOLD_SECONDS_WARNING
    runbook_base_url: str = T.RUNBOOK_BASE_URL
    grafana_url: str = T.GRAFANA_URL
    loki_datasource_uid: str = T.LOKI_DATASOURCE_UID
    for_scale: float = 1.0
    seconds_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("pool_usage_warning", "pool_usage_critical"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name}={value!r}: expected a ratio in (0, 1), e.g. 0.8 for 80%")
        if self.pool_usage_warning >= self.pool_usage_critical:
            raise ValueError(
                f"pool_usage_warning={self.pool_usage_warning} must be below "
                f"pool_usage_critical={self.pool_usage_critical}"
            )
        if not 0 < self.hold_seconds < 86400:
            raise ValueError(f"hold_seconds={self.hold_seconds!r}: expected seconds in (0, 86400)")
        for name in ("for_scale", "seconds_scale"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a factor in (0, 1]")
        for name in ("runbook_base_url", "grafana_url"):
            if not str(getattr(self, name)).startswith(("http://", "https://")):
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: expected an http:// or https:// URL"
                )
        object.__setattr__(self, "selector", check_selector(self.selector))


DEFAULT = RulesConfig()


def build_alerts(cfg: RulesConfig) -> list[Alert]:
    """Every alert, with the tunable thresholds of ``cfg``."""

    def sec(x: float) -> str:  # a threshold that is a duration, on the deployment's clock
        return f"{x * cfg.seconds_scale:g}"

    return [
        Alert(
            "DbPoolUsageWarning",
            f"service_pool:db_pool_usage:max > {cfg.pool_usage_warning}",
            T.FOR_USAGE_WARNING,
            "warning",
            "Pool {{ $labels.pool }} of {{ $labels.service }} is above "
            + _pct(cfg.pool_usage_warning)
            + " usage",
            "The busiest {{ $labels.service }} process uses {{ $value | humanizePercentage }} of "
            "pool_size + max_overflow on {{ $labels.pool }}.",
            log_event="db_pool_critical_usage",
        ),
        Alert(
            "DbPoolUsageCritical",
            f"service_pool:db_pool_usage:max > {cfg.pool_usage_critical}",
            T.FOR_USAGE_CRITICAL,
            "critical",
            "Pool {{ $labels.pool }} of {{ $labels.service }} is exhausted",
            "The busiest {{ $labels.service }} process uses {{ $value | humanizePercentage }} of "
            "pool_size + max_overflow on {{ $labels.pool }}: new checkouts wait or time out.",
            log_event="db_pool_critical_usage",
        ),
        Alert(
            "DbConnectionHoldTooLong",
            # the p95 sees a hold when it ends; a session held for the life of a stream shows
            # first in the watchdog's count of connections held past the hold threshold
            f"service_pool:db_connection_hold_seconds:p95_5m > {sec(cfg.hold_seconds)} "
            "or service_pool:db_pool_connections_held_too_long:max > 0",
            T.FOR_HOLD_WARNING,
            "warning",
            "Connections of {{ $labels.service }} are held too long on {{ $labels.pool }}",
            "95% of connection holds on {{ $labels.pool }} ({{ $labels.service }}) last up to "
            "{{ $value | humanizeDuration }} (threshold "
            + f"{sec(cfg.hold_seconds)}s"
            + "), or connections "
            "are held past it right now (db_pool_connections_held_too_long; the value is then their count).",
            log_event="db_connection_held_too_long",
        ),
        Alert(
            "DbPoolCheckoutWaitHigh",
            f"service_pool:db_pool_checkout_wait_seconds:p95_5m > {sec(T.WAIT_P95_SECONDS_WARNING)}",
            T.FOR_WAIT_WARNING,
            "warning",
            "Checkouts of {{ $labels.service }} wait for connections on {{ $labels.pool }}",
            "p95 checkout wait on {{ $labels.pool }} ({{ $labels.service }}) is "
            "{{ $value | humanizeDuration }}: requests spend that long before their first query.",
        ),
        Alert(
            "DbServerWaitHigh",
            f"service_pool:db_server_wait_seconds:p95_5m > {sec(T.SERVER_WAIT_P95_SECONDS_WARNING)}",
            T.FOR_SERVER_WAIT,
            "warning",
            "Transactions of {{ $labels.service }} wait for a server connection on {{ $labels.pool }}",
            "p95 of the first statement of {{ $labels.service }}'s transactions on {{ $labels.pool }} is "
            "{{ $value | humanizeDuration }}: the pooler or the server is full; the pool is not the cause.",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
        ),
        Alert(
            "RedisPoolUsageWarning",
            f"service_pool:redis_pool_usage:max > {cfg.pool_usage_warning}",
            T.FOR_USAGE_WARNING,
            "warning",
            "Redis pool {{ $labels.pool }} of {{ $labels.service }} is above "
            + _pct(cfg.pool_usage_warning)
            + " usage",
            "The busiest {{ $labels.service }} process uses {{ $value | humanizePercentage }} of "
            "max_connections on Redis {{ $labels.pool }}.",
            log_event="redis_connection_held_too_long",
        ),
        Alert(
            "RedisPoolUsageCritical",
            f"service_pool:redis_pool_usage:max > {cfg.pool_usage_critical}",
            T.FOR_USAGE_CRITICAL,
            "critical",
            "Redis pool {{ $labels.pool }} of {{ $labels.service }} is exhausted",
            "The busiest {{ $labels.service }} process uses {{ $value | humanizePercentage }} of "
            "max_connections on Redis {{ $labels.pool }}: new commands wait or fail.",
            log_event="redis_connection_held_too_long",
        ),
        Alert(
            "RedisPoolCheckoutFailures",
            "service_pool:redis_pool_checkout_failures:rate5m > 0",
            T.FOR_TIMEOUTS,
            "critical",
            "Redis commands of {{ $labels.service }} find no connection on {{ $labels.pool }}",
            '{{ printf "%.2f" $value }} checkouts per second on Redis {{ $labels.pool }} '
            "({{ $labels.service }}) time out or exceed max_connections: callers get errors.",
            log_event="redis_connection_held_too_long",
        ),
        Alert(
            "DbPoolCheckoutTimeouts",
            "service_pool:db_pool_timeouts:rate5m > 0",
            T.FOR_TIMEOUTS,
            "critical",
            "Checkouts of {{ $labels.service }} time out on {{ $labels.pool }}",
            '{{ printf "%.2f" $value }} checkouts per second hit pool_timeout on {{ $labels.pool }} '
            "({{ $labels.service }}): callers get errors.",
            log_event="db_pool_timeout",
        ),
        Alert(
            "DbPoolPendingRequests",
            "service_pool:db_pool_pending_requests:max > 0",
            T.FOR_PENDING,
            "warning",
            "Callers of {{ $labels.service }} keep queueing for {{ $labels.pool }}",
            "Some {{ $labels.service }} process has had callers waiting for a connection on "
            "{{ $labels.pool }} for " + T.FOR_PENDING + " (now {{ $value }}).",
        ),
        Alert(
            "DbPoolConnectErrors",
            "service_pool:db_pool_connect_errors:rate5m > 0",
            T.FOR_CONNECT_ERRORS,
            "warning",
            "{{ $labels.service }} fails to connect to {{ $labels.pool }}",
            '{{ printf "%.2f" $value }} failed checkouts per second on {{ $labels.pool }} '
            "({{ $labels.service }}): the server or pooler refuses or drops connections.",
        ),
        Alert(
            "EventLoopBlocked",
            "service:event_loop_blocked:increase5m > 0",
            T.FOR_LOOP_BLOCKED,
            "warning",
            "The event loop of {{ $labels.service }} keeps getting blocked",
            "{{ $value | humanize }} blocked episodes (over "
            + f"{T.LOOP_BLOCKED_SECONDS:g}s"
            + ") in 5 minutes in "
            "{{ $labels.service }}: sync work inside async def stalls every request of that process.",
            dashboard_uid=T.DASHBOARD_UID_API,
            log_event="event_loop_blocked",
        ),
        Alert(
            "SemaphoreConvoy",
            "service_semaphore:asyncio_semaphore_waiters:max > 0",
            T.FOR_SEMAPHORE_CONVOY,
            "warning",
            "Tasks of {{ $labels.service }} keep queueing on semaphore {{ $labels.semaphore }}",
            "Some {{ $labels.service }} process has had tasks waiting for {{ $labels.semaphore }} for "
            + T.FOR_SEMAPHORE_CONVOY
            + " (now {{ $value }}): throughput is capped there.",
            dashboard_uid=T.DASHBOARD_UID_CELERY,
        ),
        Alert(
            "CeleryTaskFailureRateHigh",
            f"service_task:celery_tasks_failed:ratio_rate5m > {T.CELERY_FAILURE_RATIO_WARNING:g}",
            T.FOR_CELERY_FAILURES,
            "warning",
            "Task {{ $labels.task }} of {{ $labels.service }} fails often",
            "{{ $value | humanizePercentage }} of {{ $labels.task }} runs fail (threshold "
            + _pct(T.CELERY_FAILURE_RATIO_WARNING)
            + ").",
            dashboard_uid=T.DASHBOARD_UID_CELERY,
        ),
        Alert(
            "CeleryQueueWaitHigh",
            f"service_task_queue:celery_task_queue_wait_seconds:p95_5m > {sec(T.CELERY_QUEUE_WAIT_P95_SECONDS_WARNING)}",
            T.FOR_CELERY_QUEUE_WAIT,
            "warning",
            "Task {{ $labels.task }} waits long in queue {{ $labels.queue }}",
            "p95 queue wait of {{ $labels.task }} on {{ $labels.queue }} is {{ $value | humanizeDuration }}: "
            "workers cannot keep up.",
            dashboard_uid=T.DASHBOARD_UID_CELERY,
        ),
        Alert(
            "CeleryQueueBacklogGrowing",
            f"broker_queue:celery_queue_length:max > {T.CELERY_BACKLOG_WARNING} "
            "and delta(broker_queue:celery_queue_length:max[10m]) > 0",
            T.FOR_CELERY_BACKLOG,
            "warning",
            "Queue {{ $labels.queue }} keeps growing",
            "{{ $value }} messages wait in {{ $labels.queue }} ({{ $labels.broker }}) and the backlog "
            "grew over the last 10 minutes: the workers consuming it cannot keep up.",
            dashboard_uid=T.DASHBOARD_UID_CELERY,
        ),
        Alert(
            "CeleryQueueOldestMessageOld",
            f"broker_queue:celery_queue_oldest_message_seconds:max > {sec(T.CELERY_OLDEST_MESSAGE_SECONDS_WARNING)}",
            T.FOR_CELERY_OLDEST,
            "warning",
            "Messages wait over "
            + f"{sec(T.CELERY_OLDEST_MESSAGE_SECONDS_WARNING)}s"
            + " in {{ $labels.queue }}",
            "The oldest message in {{ $labels.queue }} ({{ $labels.broker }}) has waited "
            "{{ $value | humanizeDuration }}: no worker takes from it, or all its slots are busy.",
            dashboard_uid=T.DASHBOARD_UID_CELERY,
        ),
        Alert(
            "CeleryWorkerSlotsSaturated",
            "service_worker:celery_worker_busy:ratio >= 1",
            T.FOR_CELERY_SLOTS,
            "warning",
            "Every slot of {{ $labels.worker }} ({{ $labels.service }}) is busy",
            "All pool processes of {{ $labels.worker }} ({{ $labels.service }}) have been executing tasks for "
            + T.FOR_CELERY_SLOTS
            + ": new tasks wait in the queue (see celery_worker_reserved and the backlog).",
            dashboard_uid=T.DASHBOARD_UID_CELERY,
        ),
        Alert(
            "TelemetrySpansLost",
            "service:telemetry_spans_lost:rate5m > 0",
            T.FOR_SPANS_LOST,
            "warning",
            "{{ $labels.service }} is losing spans",
            '{{ printf "%.2f" $value }} spans per second fail to export or are dropped from a full queue in '
            "{{ $labels.service }}: the collector is down or too slow.",
        ),
        Alert(
            "DbConnectionBudgetExceeded",
            "pool:db_pool_connections_max:sum > on (pool) pool:db_server_connection_limit:max",
            T.FOR_BUDGET,
            "warning",
            "Worst-case connections to {{ $labels.pool }} exceed the server limit",
            "All processes together may open {{ $value }} connections to {{ $labels.pool }}, more "
            "than the server or pooler allows: under load, connects will fail. "
            '{{ with query "server:db_server_connections:sum" }}Measured on the server now: '
            "{{ . | first | value }} connections"
            '{{ with query "server:db_server_connections_max:max" }} of {{ . | first | value }} usable{{ end }}.'
            "{{ else }}The server side is not measured (set TELEMETRY_SERVER_VIEW_URL).{{ end }}",
        ),
        Alert(
            "PgbouncerClientsWaiting",
            # the queue comes and goes between scrapes while the pool stays full: "some client
            # waited within each minute", never "one scrape saw a queue" (that flickers, and a
            # for: on a flickering gauge never fires; the demo's worker-transactions showed it)
            # (on the scraped series: a recorded one holds only the evaluation instants)
            'max by (database) (max_over_time(pgbouncer_clients{state="waiting"}[1m])) > 0',
            T.FOR_POOLER_WAITING,
            "warning",
            "Clients queue in pgbouncer for database {{ $labels.database }}",
            "Clients have queued for a server connection to {{ $labels.database }} within every minute for "
            + T.FOR_POOLER_WAITING
            + " (up to {{ $value }} at once in the last one): every server connection "
            "of the pool is in a transaction. "
            "db_pooler_waiting names the services and owners holding them.",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
            log_event="db_pooler_waiting",
        ),
        Alert(
            "PgbouncerClientWaitCritical",
            # waits, lock waits and idle transactions come and go: the longest within each minute
            # (one long episode at a time never satisfies a for: on the instant gauge)
            f"max by (database) (max_over_time(pgbouncer_client_maxwait_seconds[1m])) > {sec(T.POOLER_MAXWAIT_SECONDS_CRITICAL)}",
            T.FOR_POOLER_MAXWAIT,
            "critical",
            "Clients wait over "
            + f"{sec(T.POOLER_MAXWAIT_SECONDS_CRITICAL)}s"
            + " in pgbouncer for {{ $labels.database }}",
            "Clients of {{ $labels.database }} have waited up to {{ $value | humanizeDuration }} within each minute: "
            "requests and tasks stall before their first statement.",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
            log_event="db_pooler_waiting",
        ),
        Alert(
            "DbServerConnectionsNearMax",
            f"server:db_server_connections:sum / server:db_server_connections_max:max > {T.SERVER_CONNECTIONS_RATIO_WARNING}",
            T.FOR_SERVER_CONNECTIONS,
            "warning",
            "The database server is near max_connections",
            "{{ $value | humanizePercentage }} of the server's usable connections (max_connections minus "
            "reserved) are open: the next pool growth or deploy overlap gets refused.",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
        ),
        Alert(
            "DbLockWaitLong",
            f"max(max_over_time(db_server_lock_wait_longest_seconds[1m])) > {sec(T.LOCK_WAIT_SECONDS_WARNING)}",
            T.FOR_LOCK_WAIT,
            "warning",
            "Backends wait over " + f"{sec(T.LOCK_WAIT_SECONDS_WARNING)}s" + " for locks",
            "Backends have waited up to {{ $value | humanizeDuration }} for a lock within each minute. db_lock_wait names the "
            "blocking owner (route or task) and each blocked one.",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
            log_event="db_lock_wait",
        ),
        Alert(
            "DbIdleInTransactionLong",
            "max by (application) (max_over_time(db_server_oldest_idle_in_transaction_seconds[1m])) > "
            f"{sec(T.IDLE_IN_TRANSACTION_SECONDS_WARNING)}",
            T.FOR_IDLE_IN_TRANSACTION,
            "warning",
            "{{ $labels.application }} keeps transactions open while idle",
            "Backends of {{ $labels.application }} have sat idle inside a transaction for up to "
            "{{ $value | humanizeDuration }} within each minute: it holds its server connection (and its locks) while "
            "doing something else.",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
            log_event="db_idle_in_transaction",
        ),
        Alert(
            "TelemetrySharedViewDown",
            "min by (job, instance) (db_server_view_up) == 0 or min by (job, instance) (pgbouncer_view_up) == 0",
            T.FOR_SHARED_VIEW_DOWN,
            "warning",
            "The server or pooler view of {{ $labels.instance }} is failing",
            "The host's poller cannot read PostgreSQL or pgbouncer: the db_server_ / pgbouncer_ figures "
            "are stale (see db_server_view_errors_total, pgbouncer_view_errors_total by reason).",
            dashboard_uid=T.DASHBOARD_UID_SERVER,
        ),
    ]


ALERTS: list[Alert] = build_alerts(DEFAULT)


def runbook_url(alert: str, cfg: RulesConfig = DEFAULT) -> str:
    return f"{cfg.runbook_base_url.rstrip('/')}/{alert}.md"


def dashboard_url(uid: str, cfg: RulesConfig = DEFAULT) -> str:
    return (f"{cfg.grafana_url.rstrip('/')}/d/{uid}?var-service={{{{ $labels.service | urlquery }}}}"
            "&var-pool={{ $labels.pool | urlquery }}")  # fmt: skip


def logs_url(event: str, cfg: RulesConfig = DEFAULT) -> str:
    """Grafana Explore on Loki with the event's query, the alert's labels filled in."""
    expr = LOG_QUERIES[event].replace("$service", "SERVICE__").replace("$pool", "POOL__")
    left = {"datasource": cfg.loki_datasource_uid, "queries": [{"refId": "A", "expr": expr}],
            "range": {"from": "now-1h", "to": "now"}}  # fmt: skip
    quoted = urllib.parse.quote(json.dumps(left, separators=(",", ":")), safe="")
    quoted = quoted.replace("SERVICE__", "{{ $labels.service | urlquery }}")
    quoted = quoted.replace("POOL__", "{{ $labels.pool | urlquery }}")
    return f"{cfg.grafana_url.rstrip('/')}/explore?orgId=1&left={quoted}"


def scaled(duration: str, factor: float) -> str:
    """A Prometheus duration times ``factor`` (``"5m"``, 0.1 -> ``"30s"``)."""
    if factor == 1:
        return duration
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    if match is None:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    millis = max(1, round(float(match.group(1)) * units[match.group(2)] * factor * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


#: the shortest range window a scaled file gets: a rate needs two scrapes (the demo scrapes every second)
MIN_WINDOW_SECONDS = 3


def windows(expr: str, factor: float) -> str:
    """``expr`` with its range windows (``[5m]``) times ``factor``, never under
    ``MIN_WINDOW_SECONDS``: on a faster clock the windows shrink with the ``for:`` durations,
    so an alert resolves within the run that fired it."""
    if factor == 1:
        return expr

    def one(m: re.Match[str]) -> str:
        window = scaled(m.group(1), factor)
        millis = int(window[:-2]) if window.endswith("ms") else int(window[:-1]) * 1000
        return f"[{window}]" if millis >= MIN_WINDOW_SECONDS * 1000 else f"[{MIN_WINDOW_SECONDS}s]"

    return re.sub(r"\[(\d+(?:\.\d+)?(?:ms|s|m|h|d))\]", one, expr)


def rule_groups(cfg: RulesConfig = DEFAULT) -> dict[str, Any]:
    alerts = []
    for a in build_alerts(cfg):
        annotations = {
            "summary": a.summary,
            "description": a.description,
            "runbook_url": runbook_url(a.name, cfg),
            "dashboard_url": dashboard_url(a.dashboard_uid, cfg),
        }
        if a.log_event:
            annotations["logs_url"] = logs_url(a.log_event, cfg)
        alerts.append({
            "alert": a.name, "expr": windows(with_selector(a.expr, cfg.selector), cfg.for_scale),
            "for": scaled(a.for_, cfg.for_scale),
            "labels": {"severity": a.severity}, "annotations": annotations,
        })  # fmt: skip
    # one group: rules in a group run in order, so an alert sees the recorded series of the
    # same evaluation (across groups the order is not defined and alerts would lag by one)
    records = [
        {"record": r, "expr": windows(with_selector(e, cfg.selector), cfg.for_scale)}
        for r, e in RECORDING
    ]
    return {"groups": [{"name": "telemetry-db-pool", "rules": records + alerts}]}


def render_rules(cfg: RulesConfig = DEFAULT) -> str:
    import yaml

    if cfg == DEFAULT:
        header = "# Generated by `telemetry generate` from telemetry/tools/rules.py and thresholds.py. Do not edit.\n"
    else:
        header = "# Generated by `telemetry rules` (poolsight). Regenerate rather than edit.\n"
    return header + yaml.safe_dump(
        rule_groups(cfg), sort_keys=False, width=1000, allow_unicode=True
    )


def render_log_query(event: str) -> str:
    return (f"# LogQL for {event} (generated). $service and $pool are Grafana variables;\n"
            f"# each row carries trace_id, which the Loki datasource links to Tempo.\n"
            f"{LOG_QUERIES[event]}\n")  # fmt: skip
