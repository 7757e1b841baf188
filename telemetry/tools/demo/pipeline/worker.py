"""Celery entry point, one per worker group (the report's logs 4, content 6, workflow 4):
``celery -A telemetry.tools.demo.pipeline.worker worker --pool prefork -Q content -c 6``.

The one line of telemetry a worker needs is ``telemetry.instrument(...)``, in the prefork parent
before the pool forks; children start clean on their own. ``WORKER_SERVICE`` names the group.
"""

from __future__ import annotations

import os

import telemetry

SERVICE = os.environ.get("WORKER_SERVICE", "worker")
telemetry.configure_logging(SERVICE)
telemetry.instrument(service=SERVICE)

from .tasks import advance_workflow, app, generate_content, write_log  # noqa: E402

__all__ = ["advance_workflow", "app", "generate_content", "write_log"]
