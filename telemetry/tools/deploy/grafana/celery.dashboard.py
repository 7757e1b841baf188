"""Celery: task rate and outcomes, run time, queue wait, in progress, the DB semaphore."""

from telemetry import thresholds as T
from telemetry.tools.deploy.dashboards import (
    OPS,
    RATE,
    SECONDS,
    SHORT,
    SVC,
    dashboard,
    series,
)

dashboard = dashboard(
    "Celery", T.DASHBOARD_UID_CELERY, "Tasks by name and queue, the MAX_DB_CONCURRENT semaphore, the backlog and the worker slots.",
    pool=False,
    panels=[
        series("Tasks by outcome", [(f"sum by (task, outcome) (rate(celery_tasks_total{{{SVC}}}[{RATE}]))", "{{task}} {{outcome}}")],
               OPS, (0, 0, 12, 8)),
        series("Failures by exception", [(f"sum by (task, exception) (rate(celery_task_failures_total{{{SVC}}}[{RATE}]))",
                                          "{{task}} {{exception}}")], OPS, (12, 0, 12, 8)),
        series("Run time p50 / p95", [
            (f"histogram_quantile({q}, sum by (le, task) (rate(celery_task_runtime_seconds_bucket{{{SVC}}}[{RATE}])))", f"p{int(q * 100)} {{{{task}}}}")
            for q in (0.5, 0.95)], SECONDS, (0, 8, 12, 8)),
        series("Queue wait p50 / p95 (publish or ETA to start)", [
            (f"histogram_quantile({q}, sum by (le, task, queue) (rate(celery_task_queue_wait_seconds_bucket{{{SVC}}}[{RATE}])))",
             f"p{int(q * 100)} {{{{task}}}} {{{{queue}}}}") for q in (0.5, 0.95)], SECONDS, (12, 8, 12, 8)),
        series("In progress", [(f"sum by (task, queue) (celery_tasks_in_progress{{{SVC}}})", "{{task}} {{queue}}")], SHORT, (0, 16, 12, 8)),
        series("Semaphore: capacity, in use, waiters", [
            (f"sum by (semaphore) (asyncio_semaphore_capacity{{{SVC}}})", "capacity {{semaphore}}"),
            (f"sum by (semaphore) (asyncio_semaphore_in_use{{{SVC}}})", "in use {{semaphore}}"),
            (f"sum by (semaphore) (asyncio_semaphore_waiters{{{SVC}}})", "waiters {{semaphore}}"),
        ], SHORT, (12, 16, 12, 8)),
        series("Semaphore wait p95", [
            (f"histogram_quantile(0.95, sum by (le, semaphore) (rate(asyncio_semaphore_wait_seconds_bucket{{{SVC}}}[{RATE}])))", "{{semaphore}}")],
               SECONDS, (0, 24, 24, 8)),
        series("Backlog at the broker, by queue", [
            ("max by (broker, queue) (celery_queue_length)", "{{queue}} ({{broker}})"),
        ], SHORT, (0, 32, 12, 8), "Messages waiting, priority lists included; one poller per host.",
               lines=(T.CELERY_BACKLOG_WARNING,)),
        series("Oldest waiting message, by queue", [
            ("max by (broker, queue) (celery_queue_oldest_message_seconds)", "{{queue}}"),
        ], SECONDS, (12, 32, 12, 8), lines=(T.CELERY_OLDEST_MESSAGE_SECONDS_WARNING,)),
        series("Worker slots: busy / pool size / reserved", [
            (f"sum by (service, worker) (celery_worker_busy{{{SVC}}})", "busy {{worker}}"),
            (f"max by (service, worker) (celery_worker_pool_size{{{SVC}}})", "slots {{worker}}"),
            (f"sum by (service, worker) (celery_worker_reserved{{{SVC}}})", "reserved {{worker}}"),
        ], SHORT, (0, 40, 12, 8), "busy = slots: the worker is saturated; reserved tasks wait inside it."),
        series("Children replaced", [
            (f"sum by (service, worker) (rate(celery_worker_children_replaced_total{{{SVC}}}[{RATE}]))", "{{worker}}"),
        ], OPS, (12, 40, 12, 8), "max_tasks_per_child recycling, crashes, OOM kills."),
    ],
)  # fmt: skip
