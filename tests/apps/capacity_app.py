"""A Celery app for the capacity tests: ``celery -A tests.apps.capacity_app worker``.

Broker ``BROKER_URL`` (Redis db 0, priority lists on), result backend ``BACKEND_URL`` (Redis db
1), queues ``content`` and ``logs``.
"""

from __future__ import annotations

import os
import time

import telemetry

if not telemetry.is_instrumented():  # imported by the API test process too, which instrumented itself
    telemetry.instrument(service=os.environ.get("TELEMETRY_SERVICE_NAME", "capacity-worker"))

from celery import Celery  # noqa: E402

app = Celery("capacity", broker=os.environ["BROKER_URL"], backend=os.environ["BACKEND_URL"])
app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"}
app.conf.task_default_queue = "content"
app.conf.worker_prefetch_multiplier = 4
app.conf.worker_hijack_root_logger = False


@app.task(name="quick", shared=False)  # not registered into every later app (tests create many)
def quick() -> int:
    return 1


@app.task(name="sleepy", shared=False)
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
