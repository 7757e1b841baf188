"""Every alert of the shipped rule file, with the thresholds a deployment tunes (``RulesConfig``):
the one definition ``telemetry rules``, the committed ``alerts/telemetry.rules.yml``, the demo's
scaled copy and the promtool tests are rendered from."""

from __future__ import annotations

import dataclasses

from telemetry import thresholds as T
from telemetry.server_view.model import POOLER_NAMES
from telemetry.tools.promql import check_selector

#: a transaction pooler is in the path: its view is read, or the server sees connections named
#: after one (a renaming pooler such as Supavisor)
POOLER_IN_PATH = ("count(pgbouncer_view_up) > 0 or count(db_server_connections{application=~\"(?i)("
                  + "|".join(sorted(n for n in POOLER_NAMES if n)) + ')"} > 0) > 0')


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
            # only where a transaction pooler is in the path (its view read, or the server seeing
            # connections named after one): without one, the first statement's time is its own
            f"service_pool:db_server_wait_seconds:p95_5m > {sec(T.SERVER_WAIT_P95_SECONDS_WARNING)} "
            f"and on() ({POOLER_IN_PATH})",
            T.FOR_SERVER_WAIT,
            "warning",
            "First statements of {{ $labels.service }}'s transactions are slow behind the pooler on {{ $labels.pool }}",
            "p95 of the first statement of {{ $labels.service }}'s transactions on {{ $labels.pool }} is "
            "{{ $value | humanizeDuration }} behind a transaction pooler: a queue for a server connection "
            "or slow statements, not the pool. `telemetry diagnose` tells which (the pooler's queue, the "
            "server's active backends).",
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
