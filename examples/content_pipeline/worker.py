"""Celery entry point: ``celery -A examples.content_pipeline.worker worker --pool prefork``.

The one line of telemetry a worker needs is ``telemetry.instrument(...)``, in the prefork parent
before the pool forks; children start clean on their own.
"""

from __future__ import annotations

import telemetry

telemetry.configure_logging("worker")
telemetry.instrument(service="worker")

from .tasks import app, generate_content  # noqa: E402

__all__ = ["app", "generate_content"]
