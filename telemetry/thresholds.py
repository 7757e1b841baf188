"""The one place for alert thresholds, ``for`` durations and dashboard uids.

Log events, Prometheus rule files, dashboards, runbooks and the demo's report all read these
constants, so a threshold changed here changes everywhere at once (the generated files then fail
their drift test until they are regenerated).
"""

from __future__ import annotations

#: Pool usage (in use / (pool_size + max_overflow)) that raises the warning alert.
POOL_USAGE_WARNING = 0.80
#: Pool usage that raises the critical alert (pages).
POOL_USAGE_CRITICAL = 0.95
#: Pool usage above which the ``db_pool_critical_usage`` log event is emitted (the incident report's 90%).
POOL_USAGE_LOG = 0.90
#: Seconds a connection may be held before ``db_connection_held_too_long`` (and the p95 alert).
HOLD_SECONDS_WARNING = 5.0
#: Checkout wait p95 (seconds) that raises the wait alert.
WAIT_P95_SECONDS_WARNING = 1.0
#: p95 of the first statement of transactions (the wait for a server connection behind a
#: transaction pooler or a full server) that raises DbServerWaitHigh.
SERVER_WAIT_P95_SECONDS_WARNING = 1.0
FOR_SERVER_WAIT = "5m"
#: Event-loop lag (seconds) counted as blocked.
LOOP_BLOCKED_SECONDS = 0.5

#: ``for:`` durations of the alerts, as Prometheus durations.
FOR_USAGE_WARNING = "5m"
FOR_USAGE_CRITICAL = "2m"
FOR_HOLD_WARNING = "10m"
FOR_WAIT_WARNING = "5m"
FOR_TIMEOUTS = "1m"

#: Fixed Grafana dashboard uids, used by the alerts' ``dashboard_url``.
DASHBOARD_UID_POOLS = "telemetry-db-pools"
DASHBOARD_UID_API = "telemetry-api"
DASHBOARD_UID_CELERY = "telemetry-celery"
DASHBOARD_UID_OVERVIEW = "telemetry-overview"

#: Sustained pending checkouts (callers waiting) before DbPoolPendingRequests fires.
FOR_PENDING = "5m"
#: Connect errors must persist this long before DbPoolConnectErrors fires.
FOR_CONNECT_ERRORS = "2m"
#: The configured worst case must exceed the limit this long (deploys overlap briefly).
FOR_BUDGET = "10m"

#: Semaphore waiters sustained this long: a convoy in front of the pool.
FOR_SEMAPHORE_CONVOY = "10m"
#: Share of Celery tasks failing that raises CeleryTaskFailureRateHigh.
CELERY_FAILURE_RATIO_WARNING = 0.10
FOR_CELERY_FAILURES = "10m"
#: Celery queue wait p95 (seconds) that raises CeleryQueueWaitHigh.
CELERY_QUEUE_WAIT_P95_SECONDS_WARNING = 60.0
FOR_CELERY_QUEUE_WAIT = "10m"
#: Blocked-loop episodes: any in the window, sustained this long.
FOR_LOOP_BLOCKED = "5m"
#: Spans failed or dropped: any, sustained this long.
FOR_SPANS_LOST = "15m"

#: Where alert links point. Regenerate (``telemetry generate``) after changing them.
RUNBOOK_BASE_URL = "https://github.com/example/telemetry/blob/main/docs/runbooks"
GRAFANA_URL = "http://localhost:3000"
LOKI_DATASOURCE_UID = "loki"

#: The shared side (PostgreSQL server view, pgbouncer view).
#: A lock wait this long emits ``db_lock_wait`` (the event fires during the episode).
LOCK_WAIT_EVENT_SECONDS = 1.0
#: Clients queued in pgbouncer this long (its maxwait) emit ``db_pooler_waiting`` (a queue
#: while pgbouncer opens a server connection lasts milliseconds and is not an episode).
POOLER_WAIT_EVENT_SECONDS = 0.5
#: A backend idle in a transaction this long emits ``db_idle_in_transaction``.
IDLE_IN_TRANSACTION_EVENT_SECONDS = 5.0
#: Longest current lock wait (seconds) that raises DbLockWaitLong.
LOCK_WAIT_SECONDS_WARNING = 10.0
FOR_LOCK_WAIT = "1m"
#: Oldest idle-in-transaction age (seconds) that raises DbIdleInTransactionLong.
IDLE_IN_TRANSACTION_SECONDS_WARNING = 30.0
FOR_IDLE_IN_TRANSACTION = "2m"
#: Server connections / (max_connections - reserved) that raises DbServerConnectionsNearMax.
SERVER_CONNECTIONS_RATIO_WARNING = 0.85
FOR_SERVER_CONNECTIONS = "5m"
#: Clients queued in pgbouncer: any, sustained (warning); the longest waiting this long (critical).
FOR_POOLER_WAITING = "2m"
POOLER_MAXWAIT_SECONDS_CRITICAL = 5.0
FOR_POOLER_MAXWAIT = "1m"
#: The server or pooler view failing this long (its figures are stale).
FOR_SHARED_VIEW_DOWN = "5m"
DASHBOARD_UID_SERVER = "telemetry-db-server"

#: Celery capacity: a backlog above this that keeps growing raises CeleryQueueBacklogGrowing.
CELERY_BACKLOG_WARNING = 100
FOR_CELERY_BACKLOG = "10m"
#: The oldest waiting message older than this raises CeleryQueueOldestMessageOld.
CELERY_OLDEST_MESSAGE_SECONDS_WARNING = 300.0
FOR_CELERY_OLDEST = "5m"
#: Every slot of a worker busy this long raises CeleryWorkerSlotsSaturated.
FOR_CELERY_SLOTS = "10m"
