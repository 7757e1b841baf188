"""The shared view's cost, against a real PostgreSQL and pgbouncer (throwaway, loopback):

1. one poll (server: three statements; pgbouncer: five SHOWs; the join) with 20 and 500 server
   connections open (each a client in a pgbouncer pool or direct, named like the package's);
2. 21 instrumented processes sharing one multiprocess directory, all configured for the view,
   for ``--seconds``: how many monitoring connections the server sees, and how many query sets
   the host ran per interval (``db_server_view_polls_total`` summed over the host's processes).

    python benchmarks/shared_view.py [--rounds 30] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg  # noqa: E402

from telemetry._core.settings import Settings  # noqa: E402
from telemetry.server_view import poller as _shared  # noqa: E402

from ..tests import services  # noqa: E402

CHILD = """
import sys, time
import telemetry
telemetry.instrument(service=f"worker{sys.argv[3]}", multiproc_dir=sys.argv[1], server_view_url=sys.argv[2],
                     shared_view_interval_seconds=float(sys.argv[4]))
time.sleep(float(sys.argv[5]))
"""


def _open(url: str, n: int, prefix: str) -> list[Any]:
    conns = []
    for i in range(n):
        conns.append(psycopg.connect(url, autocommit=True, application_name=f"{prefix}{i % 4}/{10000 + i}@bench"))
    return conns


def poll_cost(pg: services.Postgres, bouncer: services.Pgbouncer, n: int, rounds: int) -> dict[str, float]:
    """``n`` server connections: ``pool_size`` of them pgbouncer's (linked to clients in a
    transaction, as many clients again idle), the rest direct."""
    pooled = _open(bouncer.url().replace("+psycopg", ""), 2 * bouncer.pool_size, "worker")
    direct = _open(pg.url().replace("+psycopg", ""), max(0, n - bouncer.pool_size - 2), "api")
    # as many pooled clients in a transaction as pgbouncer has server connections: all linked
    for conn in pooled[: bouncer.pool_size]:
        conn.execute("begin")
        conn.execute("select 1")
    settings = Settings.load(service="bench", server_view_url=pg.url(), pgbouncer_url=bouncer.admin_url)
    poller = _shared._Poller(settings)
    try:
        poller.poll()  # connect once
        total, server, pooler = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            poller.poll()
            total.append(time.perf_counter() - t0)
            server.append(_shared.PUBLISHED.server_seconds)
            pooler.append(_shared.PUBLISHED.pooler_seconds)
        rows = pg.psql("select count(*) from pg_stat_activity where backend_type = 'client backend'")
    finally:
        poller.close()
        for conn in direct + pooled:
            conn.close()
        _shared.PUBLISHED.reset()
    return {"backends": int(rows), "total_ms": statistics.median(total) * 1e3,
            "p95_ms": sorted(total)[int(0.95 * (len(total) - 1))] * 1e3,
            "server_ms": statistics.median(server) * 1e3, "pooler_ms": statistics.median(pooler) * 1e3}  # fmt: skip


def one_per_host(pg: services.Postgres, processes: int, seconds: float, interval: float) -> dict[str, float]:
    from telemetry._core import exposition as _exposition

    url = pg.url().replace("+psycopg", "")
    directory = tempfile.mkdtemp()

    def polls() -> float:
        for fam in _exposition.host_registry(directory).collect():
            if fam.name == "db_server_view_polls":
                return sum(s.value for s in fam.samples if s.name.endswith("_total"))
        return 0.0

    procs = [subprocess.Popen([sys.executable, "-c", CHILD, directory, url, str(i), str(interval), "600"])
             for i in range(processes)]  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while len([f for f in os.listdir(directory) if f.startswith("telemetry-") and f[10].isdigit()]) < processes:
            if time.monotonic() > deadline:
                raise TimeoutError("the processes did not start")
            time.sleep(0.2)
        # 21 interpreters importing on 2 cores: wait for the first poll, then for every import
        while polls() == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(10)
        before, t0 = polls(), time.monotonic()
        pollers = []
        while time.monotonic() - t0 < seconds:
            pollers.append(int(pg.psql(
                "select count(*) from pg_stat_activity where application_name like 'telemetry-shared-view/%'")))
            time.sleep(0.5)
        after, elapsed = polls(), time.monotonic() - t0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    return {"processes": processes, "monitoring_connections_max": max(pollers),
            "query_sets_per_interval": (after - before) / (elapsed / interval)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with services.start_postgres(max_connections=560) as pg, services.start_pgbouncer(pg, pool_size=10) as bouncer:
        print("| server connections | poll median (ms) | poll p95 (ms) | server queries (ms) | pgbouncer SHOWs (ms) |")
        print("|---|---|---|---|---|")
        for n in (20, 500):  # the pgbouncer pool's 10 + direct ones, + the view's own
            r = poll_cost(pg, bouncer, n, args.rounds)
            print(f"| {r['backends']} | {r['total_ms']:.2f} | {r['p95_ms']:.2f} | {r['server_ms']:.2f} | {r['pooler_ms']:.2f} |")
        r2 = one_per_host(pg, 21, args.seconds, 0.5)
        print()
        print("| processes on the host | monitoring connections (max seen) | query sets per interval (host sum of db_server_view_polls_total) |")
        print("|---|---|---|")
        print(f"| {r2['processes']} | {r2['monitoring_connections_max']} | {r2['query_sets_per_interval']:.2f} |")


if __name__ == "__main__":
    main()
