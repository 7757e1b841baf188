"""A steady closed workload on a real PostgreSQL for ``telemetry budget --metrics-url``:
``python -m tests.apps.steady URL METRICS_PORT POOL_SIZE MAX_OVERFLOW THREADS HOLD_SECONDS
[STREAMS]``. THREADS threads each check out a connection as ``POST /work``, hold it HOLD_SECONDS
(a ``pg_sleep``), give it back, again; STREAMS more threads serve streams of 2 s as
``GET /stream``, each keeping its connection for its life. Prints ``ready`` once serving."""

from __future__ import annotations

import sys
import threading

from sqlalchemy import create_engine, exc, text

import telemetry

url, port = sys.argv[1], int(sys.argv[2])
pool_size, max_overflow, threads, hold = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
streams = int(sys.argv[7]) if len(sys.argv) > 7 else 0
telemetry.configure_logging("api", stream=sys.stderr)
telemetry.instrument(service="api")
engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=0.5, pool_logging_name="main-db")
telemetry.start_metrics_server(port)


def work() -> None:
    while True:
        try:
            with telemetry.db_owner("POST /work"), engine.connect() as conn:
                conn.execute(text("select pg_sleep(:s)"), {"s": hold})
        except exc.TimeoutError:
            pass


def stream() -> None:
    while True:  # streams of 2 s, one after the other, each on one session for its life
        with telemetry.db_owner("GET /stream"), engine.connect() as conn:
            for _ in range(4):
                conn.execute(text("select pg_sleep(0.5)"))


for _ in range(streams):
    threading.Thread(target=stream, daemon=True).start()
for _ in range(threads):
    threading.Thread(target=work, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin
