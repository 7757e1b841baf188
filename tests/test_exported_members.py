"""The public surface is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import subprocess
import sys

import telemetry


def test_public_api():
    assert telemetry.__all__ == sorted(telemetry.__all__)
    assert set(telemetry.__all__) == {
        "DEFAULT_OWNER", "AddService", "ConfigError", "Semaphore", "Settings", "TelemetryMiddleware",
        "add_pid", "add_trace_context", "configure_logging", "current_owner", "db_owner", "flush",
        "instrument", "instrument_celery", "instrument_fastapi", "instrument_sqlalchemy",
        "is_instrumented", "metrics_app", "prepare_multiproc_dir", "scan_now",
        "start_metrics_server", "trace_ids", "uninstrument", "watch_event_loop",
    }  # fmt: skip
    for name in telemetry.__all__:
        assert getattr(telemetry, name) is not None


def test_import_has_no_side_effects():
    """Importing configures nothing, starts no thread, patches no pool, imports no SQLAlchemy."""
    code = (
        "import threading, sys, structlog, logging\n"
        "before = threading.active_count()\n"
        "import telemetry\n"
        "assert threading.active_count() == before\n"
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy imported'\n"
        "assert not structlog.is_configured()\n"
        "assert not logging.getLogger().handlers\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
