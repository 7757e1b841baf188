"""A host whose workers recycle: a parent serving the host aggregate, forking short-lived children
that each check out connections and exit. ``python -m tests.apps.churn DIR PORT CHILDREN``:
prints "ready", starts on a line from stdin, prints "done N" (checkouts made by all processes),
and serves until stdin closes."""

from __future__ import annotations

import multiprocessing
import os
import sys

from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool

import telemetry

directory, port, children = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
telemetry.configure_logging("worker", stream=sys.stderr)  # stdout carries the protocol only
telemetry.instrument(service="worker", multiproc_dir=directory, flush_interval_seconds=0.05)
telemetry.start_metrics_server(port)
url = f"sqlite:///{directory}/churn.db"


def child(n: int) -> None:
    engine = create_engine(url, poolclass=QueuePool, pool_size=1, max_overflow=0)
    for _ in range(n):
        with engine.connect():
            pass


if __name__ == "__main__":
    print("ready", flush=True)
    sys.stdin.readline()  # start when the test says so (Prometheus is scraping)
    ctx = multiprocessing.get_context("fork")
    total = 0
    for _ in range(children):
        p = ctx.Process(target=child, args=(5,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        total += 5
    print(f"done {total}", flush=True)
    sys.stdin.readline()  # keep serving until the test is done scraping
    os._exit(0)
