"""The structlog helper: one JSON line per event, service/pid/level, trace ids only inside a
span, standard-library records through the same renderer."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

import telemetry

pytestmark = pytest.mark.matrix("structlog")


@pytest.fixture
def stream():
    buf = io.StringIO()
    yield buf
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == "telemetry-json"]:
        root.removeHandler(h)


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_with_trace_ids_only_inside_a_span(stream):
    telemetry.configure_logging("api", stream=stream)
    log = structlog.get_logger("app")
    log.info("outside")
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        log.info("inside", concept=3)
        ctx = span.get_span_context()
    logging.getLogger("sqlalchemy.pool").warning("stdlib %s", "record")
    out, inside, std = _lines(stream)
    assert out["event"] == "outside" and "trace_id" not in out and "span_id" not in out
    assert out["service"] == "api" and isinstance(out["pid"], int) and out["level"] == "info"
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert re.fullmatch(r"[0-9a-f]{32}", inside["trace_id"]) and inside["concept"] == 3
    assert std["event"] == "stdlib record" and std["logger"] == "sqlalchemy.pool"
    assert std["service"] == "api" and std["level"] == "warning"


def test_bad_level_is_refused():
    with pytest.raises(ValueError, match="invalid log level 'LOUD'"):
        telemetry.configure_logging("api", level="LOUD")


def test_processors_compose_into_a_user_chain():
    event = {"event": "x"}
    event = telemetry.AddService("worker")(None, "info", event)
    event = telemetry.add_pid(None, "info", event)
    event = telemetry.add_trace_context(None, "info", event)
    assert event["service"] == "worker" and "pid" in event and "trace_id" not in event


def test_an_app_that_called_basicconfig_logs_each_record_once_without_colour_codes():
    """logging.basicConfig() first (as many apps do), then configure_logging(): one JSON line per
    record, nothing plain on stderr, and uvicorn's colour-coded duplicate message dropped."""
    import subprocess
    import sys

    script = (
        "import logging, telemetry\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "telemetry.configure_logging('api')\n"
        "logging.getLogger('app').warning('hello')\n"
        "logging.getLogger('uvicorn.error').info('Started server process', "
        "extra={'color_message': 'Started server process [\\x1b[36m%d\\x1b[0m]'})\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(e["event"], e["logger"]) for e in lines] == [("hello", "app"), ("Started server process", "uvicorn.error")]
    assert "color_message" not in lines[1] and "\x1b" not in out.stdout


def test_without_structlog_configured_an_event_is_one_line_in_the_hosts_format():
    """A Celery worker's logging (a prefix format on the root logger), structlog never
    configured: the package's event is one record of the standard library's ``telemetry``
    logger, formatted by the host once (it came out double-prefixed through stdout)."""
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout,\n"
        "                    format='[%(asctime)s: %(levelname)s/MainProcess] %(message)s')\n"
        "from telemetry._core import log as _log\n"
        "_log.INTERNAL.service = 'worker'\n"
        "_log.emit('warning', 'redis_connection_held_too_long', owner='save-concept', held_seconds=6.5)\n"
        "print('structlog' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "False", out.stdout  # structlog not even imported
    assert re.fullmatch(r"\[.*: WARNING/MainProcess\] redis_connection_held_too_long owner='save-concept' "
                        r"held_seconds=6.5 service='worker'", lines[0]), lines[0]


def test_configure_logging_names_the_process_as_instrument_does(stream, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "content-worker")
    telemetry.configure_logging(stream=stream)
    structlog.get_logger("app").info("hello")
    assert _lines(stream)[0]["service"] == "content-worker"
    monkeypatch.setenv("TELEMETRY_SERVICE_NAME", "api")  # first in order, as in instrument()
    telemetry.configure_logging(stream=stream)
    structlog.get_logger("app").info("again")
    assert _lines(stream)[1]["service"] == "api"
