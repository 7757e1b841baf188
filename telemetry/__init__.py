"""Pool, request and task observability for FastAPI + Celery + SQLAlchemy backends.

Call :func:`instrument` once at start-up of the API and of every worker::

    import telemetry
    telemetry.instrument(service="api")

Every SQLAlchemy pool in the process is then measured (wait, hold by owner, timeouts, connects,
in use against ``pool_size + max_overflow``), ``db_pool_critical_usage``,
``db_connection_held_too_long`` and ``db_pool_timeout`` are logged as structured events, and
``/metrics`` is available through :func:`metrics_app` or :func:`start_metrics_server`.

Importing this package has no side effects. The user guide is ``docs/``.
"""

from ._api import (
    flush,
    instrument,
    instrument_asyncpg_pool,
    instrument_celery,
    instrument_fastapi,
    instrument_psycopg_pool,
    instrument_redis,
    instrument_sqlalchemy,
    is_instrumented,
    metrics_app,
    scan_now,
    start_metrics_server,
    uninstrument,
)
from ._core.log import AddService, add_pid, add_trace_context, configure_logging, trace_ids
from ._core.multiprocess import prepare_dir as prepare_multiproc_dir
from ._core.owner import DEFAULT_OWNER, current_owner, db_owner
from ._core.settings import ConfigError, Settings
from .integrations.asgi import TelemetryMiddleware
from .integrations.asyncio import Semaphore, watch_event_loop

__all__ = [
    "AddService",
    "ConfigError",
    "DEFAULT_OWNER",
    "Semaphore",
    "Settings",
    "TelemetryMiddleware",
    "add_pid",
    "add_trace_context",
    "configure_logging",
    "current_owner",
    "db_owner",
    "flush",
    "instrument",
    "instrument_asyncpg_pool",
    "instrument_celery",
    "instrument_fastapi",
    "instrument_psycopg_pool",
    "instrument_redis",
    "instrument_sqlalchemy",
    "is_instrumented",
    "metrics_app",
    "prepare_multiproc_dir",
    "scan_now",
    "start_metrics_server",
    "trace_ids",
    "uninstrument",
    "watch_event_loop",
]
