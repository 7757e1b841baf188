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
        "instrument", "instrument_asyncpg_pool", "instrument_celery", "instrument_fastapi", "instrument_psycopg_pool",
        "instrument_redis", "instrument_sqlalchemy",
        "is_instrumented", "metrics_app", "prepare_multiproc_dir", "scan_now",
        "start_metrics_server", "trace_ids", "uninstrument", "watch_event_loop",
    }  # fmt: skip
    for name in telemetry.__all__:  # each one the package's own, documented object
        obj = getattr(telemetry, name)
        if isinstance(obj, str):
            assert obj == "unattributed", name  # DEFAULT_OWNER, the one constant
            continue
        assert getattr(obj, "__module__", "").startswith("telemetry"), (name, obj)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


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
    assert _fresh_process(code) == "ok"


def _fresh_process(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_runtime_never_imports_the_tools():
    """instrument() with every integration present loads no module of telemetry.tools (the
    generators, demo, report and CLI never run in a user's process), and no runtime module
    names it."""
    import pathlib

    code = (
        "import sys, telemetry\n"
        "telemetry.instrument(service='api', trace_sql=True)\n"
        "import fastapi, celery, sqlalchemy\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('telemetry.tools'))\n"
        "print(loaded)\n"
    )
    assert _fresh_process(code) == "[]"
    package = pathlib.Path(telemetry.__file__).parent
    imports_tools = ("from .tools", "from . import tools", "import telemetry.tools", "from telemetry.tools")
    offenders = [p.name for p in package.glob("*.py")
                 if any(line.lstrip().startswith(imports_tools) for line in p.read_text().splitlines())]  # fmt: skip
    assert offenders == []


def test_testing_helpers_read_metrics_and_events():
    from sqlalchemy import create_engine

    from telemetry.testing import capture_events, metrics, sample

    telemetry.instrument(service="api", critical_usage_ratio=0.5)
    from sqlalchemy.pool import QueuePool

    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_logging_name="helpers")
    with capture_events("db_pool_critical_usage") as events:
        with engine.connect():
            assert sample("db_pool_connections_in_use", pool="helpers") == 1
    engine.dispose()
    assert [e["checked_out"] for e in events] == [1]
    assert ("db_pool_checkouts_total", frozenset({("service", "api"), ("pool", "helpers"), ("result", "ok")})) in metrics()
    try:
        sample("db_pool_checkouts_total", pool="nowhere")
    except KeyError:
        pass
    else:  # pragma: no cover - the assertion that matters
        raise AssertionError("absent must not read as 0")
