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
WAIT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
)  # fmt: skip
#: Connection hold: 5 s is an edge so the hold alert's threshold is exact, not interpolated.
HOLD_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
CONNECT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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


_SPECS = [
    MetricSpec(
        "db_pool_connections_in_use", GAUGE, POOL_PID, "connections",
        "Connections checked out of the pool right now (the seed's metric).",
        "db.client.connection.count{state=used}",
    ),
    MetricSpec(
        "db_pool_connections_idle", GAUGE, POOL_PID, "connections",
        "Open connections waiting in the pool.",
        "db.client.connection.count{state=idle}",
    ),
    MetricSpec(
        "db_pool_size", GAUGE, POOL_PID, "connections",
        "Configured pool_size (kept from the seed; usage is NOT measured against it).",
        "db.client.connection.idle.max",
    ),
    MetricSpec(
        "db_pool_connections_max", GAUGE, POOL_PID, "connections",
        "Most connections the pool can open: pool_size + max_overflow. Usage is in_use / this.",
        "db.client.connection.max",
    ),
    MetricSpec(
        "db_server_connection_limit", GAUGE, POOL_PID, "connections",
        "Connections the database server or pooler allows this deployment "
        "(TELEMETRY_DB_CONNECTION_LIMIT); the budget alert compares the host sum of max to it.",
    ),
    MetricSpec(
        "db_pool_overflow", GAUGE, POOL_PID, "connections",
        "Connections open beyond pool_size right now (negative while the pool is still filling).",
    ),
    MetricSpec(
        "db_pool_pending_requests", GAUGE, POOL_PID, "requests",
        "Callers waiting for a checkout right now.",
        "db.client.connection.pending_requests",
    ),
    MetricSpec(
        "db_pool_connections_held_too_long", GAUGE, POOL_PID, "connections",
        "Connections held longer than the hold threshold right now.",
    ),
    MetricSpec(
        "db_pool_checkout_wait_seconds", HISTOGRAM, POOL, "seconds",
        "Time from asking the pool for a connection to getting it, or to the timeout.",
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
    MetricSpec(
        "db_pool_connects_total", COUNTER, POOL, "connections",
        "New DBAPI connections opened.",
    ),
    MetricSpec(
        "db_pool_connect_seconds", HISTOGRAM, POOL, "seconds",
        "Time to open a new DBAPI connection.",
        "db.client.connection.create_time", CONNECT_BUCKETS,
    ),
    MetricSpec(
        "db_pool_connect_errors_total", COUNTER, POOL, "errors",
        "Checkouts that failed with an error other than the pool timeout (connect failures).",
    ),
    MetricSpec(
        "db_pool_invalidations_total", COUNTER, POOL + ("kind",), "connections",
        "Connections invalidated, kind hard (closed) or soft (recycled at next checkout).",
    ),
    MetricSpec(
        "telemetry_owner_overflow_total", COUNTER, ("service", "pool"), "checkouts",
        "Checkouts whose owner was folded into owner=\"other\" because the per-pool cap was hit.",
    ),
    MetricSpec(
        "telemetry_hook_errors_total", COUNTER, ("service", "hook"), "errors",
        "Exceptions raised inside the package's hooks, caught so the host never sees them.",
    ),
    MetricSpec(
        "telemetry_log_events_suppressed_total", COUNTER, ("service", "event"), "events",
        "Structured events not emitted because of per-pool rate limiting.",
    ),
]  # fmt: skip

CATALOGUE: dict[str, MetricSpec] = {}
for _spec in _SPECS:
    if _spec.name in CATALOGUE:  # pragma: no cover - guarded by a test
        raise RuntimeError(f"metric {_spec.name} defined twice")
    CATALOGUE[_spec.name] = _spec


def spec(name: str) -> MetricSpec:
    return CATALOGUE[name]
