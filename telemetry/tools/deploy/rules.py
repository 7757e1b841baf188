"""Prometheus recording and alerting rules, generated from :mod:`telemetry.thresholds`.

Conventions (after the monitoring mixins): alerts named ``<Component><Condition>``, always a
``for:``, ``severity`` the only routing label, annotations ``summary``, ``description`` (templated
with labels and value), ``runbook_url``, ``dashboard_url`` and, where a log event explains the
alert, ``logs_url`` (Grafana Explore on Loki with the shipped LogQL query).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from telemetry.tools.promql import with_selector

from .alert_specs import DEFAULT, Alert, RulesConfig, build_alerts  # noqa: F401 - re-exported

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


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(duration: str) -> float:
    """A Prometheus duration in seconds (``"5m"`` -> 300.0)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", duration)
    if match is None:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def scaled(duration: str, factor: float) -> str:
    """A Prometheus duration times ``factor`` (``"5m"``, 0.1 -> ``"30s"``)."""
    if factor == 1:
        return duration
    millis = max(1, round(seconds(duration) * factor * 1000))
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
        return f"[{window}]" if seconds(window) >= MIN_WINDOW_SECONDS else f"[{MIN_WINDOW_SECONDS}s]"

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
        header = "# Generated by `telemetry generate` from telemetry/tools/deploy/rules.py and thresholds.py. Do not edit.\n"
    else:
        header = "# Generated by `telemetry rules` (poolsight). Regenerate rather than edit.\n"
    return header + yaml.safe_dump(
        rule_groups(cfg), sort_keys=False, width=1000, allow_unicode=True
    )


def render_log_query(event: str) -> str:
    return (f"# LogQL for {event} (generated). $service and $pool are Grafana variables;\n"
            f"# each row carries trace_id, which the Loki datasource links to Tempo.\n"
            f"{LOG_QUERIES[event]}\n")  # fmt: skip
