"""No secrets out: a database URL with a password (and one in its query string), a SQL parameter
and request headers carrying credentials never appear in a metric, a log event or a span
attribute. Everything emitted is collected in one process and scanned. Also: the metrics server
binds to loopback by default and can require basic auth or a bearer token."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

import telemetry

from . import services

# what drivers and frameworks put in their errors and labels moves with their versions
pytestmark = pytest.mark.matrix("sqlalchemy", "asgi")

SECRETS = ["s3cr3t-pw", "qry-s3cret", "param-s3cret", "hdr-s3cret", "cookie-s3cret"]

SCRIPT = r"""
import asyncio, io, json, sys, time
import httpx, structlog
import telemetry
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

url = sys.argv[1]
engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
logs = io.StringIO()
telemetry.configure_logging("api", stream=logs)
telemetry.instrument(service="api", hold_threshold_seconds=0.1, trace_sql=True)
spans = InMemorySpanExporter()
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(spans))
app = FastAPI()

@app.get("/items/{item_id}")
async def item(item_id: int):
    async with engine.connect() as conn:
        await conn.execute(text("select :p"), {"p": "param-s3cret"})
        await asyncio.sleep(0.3)          # held too long: event with the call site
    return {"ok": True}

async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        headers = {"Authorization": "Bearer hdr-s3cret", "Cookie": "session=cookie-s3cret"}
        results = await asyncio.gather(*(client.get("/items/1", headers=headers) for _ in range(3)), return_exceptions=True)
    await engine.dispose()
    return results

asyncio.run(main())
time.sleep(0.3)
events = [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]
names = sorted({e["event"] for e in events})
out = {"metrics": generate_latest().decode(), "logs": logs.getvalue(), "events": names,
       "spans": [dict(s.attributes or {}) | {"name": s.name} for s in spans.get_finished_spans()]}
print(json.dumps(out, default=str))
"""


@pytest.mark.integration
def test_nothing_emitted_carries_a_secret(pg):
    import json

    url = pg.url("asyncpg", password="s3cr3t-pw") + "?password=qry-s3cret"  # a password in the query too
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    out = subprocess.run([sys.executable, "-c", SCRIPT, url], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    emitted = json.loads(out.stdout.strip().splitlines()[-1])
    # the scan is meaningful: all three channels carried the events that could leak
    assert {"db_connection_held_too_long", "db_pool_timeout"} <= set(emitted["events"])
    assert any(s.get("db.statement") for s in emitted["spans"]), "no SQL span to scan"
    assert any(s["name"].startswith("GET /items") for s in emitted["spans"])
    assert "db_connection_hold_seconds" in emitted["metrics"]
    blob = json.dumps(emitted) + out.stderr
    for secret in SECRETS:
        assert secret not in blob, f"{secret} leaked"


def test_metrics_server_loopback_and_auth():
    from sqlalchemy import create_engine

    telemetry.instrument(service="api")
    engine = create_engine("sqlite://")
    with engine.connect():  # so the package's own series are on /metrics
        pass
    engine.dispose()  # closed, not left to the garbage collector (Python 3.13 warns)
    port = services.free_port()
    server, _ = telemetry.start_metrics_server(port, bearer_token="t0ken")
    try:
        assert server.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(base).status_code == 401
        assert httpx.get(base, headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.get(base, headers={"Authorization": "Bearer t0ken"})
        assert ok.status_code == 200
        assert "db_pool_checkouts_total" in ok.text
    finally:
        server.shutdown()
        server.server_close()
    port = services.free_port()
    server, _ = telemetry.start_metrics_server(port, basic_auth=("prom", "pw"))
    try:
        base = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(base).status_code == 401
        assert httpx.get(base, auth=("prom", "pw")).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(telemetry.ConfigError, match="not both"):
        telemetry.start_metrics_server(port, basic_auth=("a", "b"), bearer_token="c")


@pytest.fixture(scope="module")
def password_roles(pg):
    """Roles that must log in with their password (scram), whatever characters it holds: a line
    of pg_hba.conf for each, ahead of the suite's trust lines."""
    roles = {}
    for char in SPECIAL:
        role, password = f"pw_{ord(char)}", f"Tr0ub4{char}dor{char}Horse"
        pg.psql(f"create role {role} login password '{password}'")
        roles[char] = (role, password)
    hba = os.path.join(pg.datadir, "pg_hba.conf")
    with open(hba) as fh:
        kept = fh.read()
    with open(hba, "w") as fh:
        fh.writelines(f"host all {role} 127.0.0.1/32 scram-sha-256\n" for role, _ in roles.values())
        fh.write(kept)
    pg.psql("select pg_reload_conf()")
    yield roles
    with open(hba, "w") as fh:
        fh.write(kept)
    pg.psql("select pg_reload_conf()")


SPECIAL = ["/", "?", "#", "@", "%", ":"]


@pytest.mark.integration
@pytest.mark.parametrize("char", SPECIAL)
def test_a_database_password_with_any_character_logs_in_and_never_shows(pg, password_roles, char):
    """The server view's URL with the password as typed, holding any of ``/ ? # @ % :``: it
    logs in (scram: the password reached the server whole). With a wrong one, the failure is
    logged with the URL masked and its port kept, and no piece of the password anywhere."""
    from telemetry.testing import capture_events

    from .hostview import host, value, wait_for

    role, password = password_roles[char]
    url = f"postgresql://{role}:{password}@127.0.0.1:{pg.port}/postgres"
    telemetry.instrument(service="api", server_view_url=url, shared_view_interval_seconds=0.2)
    assert wait_for(lambda: value(host(None), "db_server_view_up") == 1, timeout=30)
    telemetry.uninstrument()
    wrong = password.replace("Horse", "Zebra")
    with capture_events("telemetry_shared_view_failed") as events:
        telemetry.instrument(service="api", server_view_url=url.replace(password, wrong),
                             shared_view_interval_seconds=0.2)  # fmt: skip
        assert wait_for(lambda: (value(host(None), "db_server_view_errors_total", reason="auth") or 0) >= 1, timeout=30)
    assert events and events[0]["url"] == f"postgresql://{role}:***@127.0.0.1:{pg.port}/postgres", events
    logged = repr(events)
    for piece in (wrong, "Tr0ub4", "Zebra"):
        assert piece not in logged, logged
