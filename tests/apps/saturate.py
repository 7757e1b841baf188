"""An instrumented process whose pool a test fills on command: ``python -m tests.apps.saturate
URL METRICS_PORT``, then write the number of connections to hold, one per line, on stdin."""

from __future__ import annotations

import sys

from sqlalchemy import create_engine

import telemetry

url, port = sys.argv[1], int(sys.argv[2])
telemetry.configure_logging("api", stream=sys.stderr)  # stdout carries the protocol only
telemetry.instrument(service="api")
engine = create_engine(url, pool_size=5, max_overflow=5, pool_timeout=1, pool_logging_name="main-db")
telemetry.start_metrics_server(port)
held = []
print("ready", flush=True)
for line in sys.stdin:
    n = int(line.strip())
    while len(held) < n:
        held.append(engine.connect())
    while len(held) > n:
        held.pop().close()
    print(f"holding {len(held)}", flush=True)
