"""Host scrape cost as workers recycle: stock prometheus-client multiprocess mode against ours.

Each simulated process carries ~10 metrics like the package's pool metrics (gauges per process,
counters, two histograms with labels). For N = 21 / 100 / 500 / 2,000 processes:

* stock: N processes' ``*.db`` files (counter, gauge livesum, histogram), written with
  prometheus-client's own ``MmapedDict``; a scrape is ``MultiProcessCollector`` + exposition.
  Dead processes' files stay, as they do in production (only ``mark_process_dead`` removes live
  gauge files), so the scrape reads all N.
* ours: 21 live processes (real sleeping children, so the pid + start-time liveness check is
  real) and N - 21 that have exited. The first scrape folds the dead into the archive (shown
  separately: paid once); every later scrape reads 21 files + the archive.

Best of ``--repeat`` scrapes, milliseconds.

    python benchmarks/scrape.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from telemetry._core import exposition as _exposition
from telemetry._core import multiprocess as _multiprocess
from telemetry._core.catalogue import HOLD_BUCKETS, WAIT_BUCKETS

SIZES = (21, 100, 500, 2000)
LIVE = 21


def _labels(i: int) -> list[list[str]]:
    return [["service", "api" if i % 2 else "worker"], ["pool", "main-db"]]


def stock_files(directory: str, n: int) -> None:
    for pid in range(100000, 100000 + n):
        svc, pool = _labels(pid)[0][1], "main-db"
        counters = MmapedDict(os.path.join(directory, f"counter_{pid}.db"))
        for name in ("db_pool_checkouts_total", "db_pool_timeouts_total", "db_pool_connects_total"):
            counters.write_value(mmap_key(name, name, ["service", "pool"], [svc, pool], ""), float(pid % 97), 0.0)
        counters.close()
        gauges = MmapedDict(os.path.join(directory, f"gauge_livesum_{pid}.db"))
        for name in ("db_pool_connections_in_use", "db_pool_connections_max", "db_pool_pending_requests"):
            gauges.write_value(mmap_key(name, name, ["service", "pool"], [svc, pool], ""), 1.0, 0.0)
        gauges.close()
        hists = MmapedDict(os.path.join(directory, f"histogram_{pid}.db"))
        for name, buckets in (("db_pool_checkout_wait_seconds", WAIT_BUCKETS), ("db_connection_hold_seconds", HOLD_BUCKETS)):
            for le in (*buckets, float("inf")):
                key = mmap_key(name, f"{name}_bucket", ["service", "pool", "le"], [svc, pool, str(le)], "")
                hists.write_value(key, 1.0, 0.0)
            hists.write_value(mmap_key(name, f"{name}_sum", ["service", "pool"], [svc, pool], ""), 0.5, 0.0)
        hists.close()


def _snap(i: int) -> dict:
    lb = _labels(i)
    return {
        "c": [[n, lb, float(i % 97)] for n in ("db_pool_checkouts_total", "db_pool_timeouts_total", "db_pool_connects_total")],
        "g": [[n, lb, 1.0] for n in ("db_pool_connections_in_use", "db_pool_connections_max", "db_pool_pending_requests")],
        "h": [["db_pool_checkout_wait_seconds", lb, [1] * (len(WAIT_BUCKETS) + 1), 0.5],
              ["db_connection_hold_seconds", lb, [1] * (len(HOLD_BUCKETS) + 1), 0.5]],
    }  # fmt: skip


def our_files(directory: str, n: int, live: list[subprocess.Popen[bytes]]) -> float:
    """Write files for the live children and n - LIVE dead processes; return the expected total
    of db_pool_checkouts_total so the benchmark can check the merge is exact."""
    expected = 0.0
    for i, proc in enumerate(live):
        start = _multiprocess._proc_start(proc.pid)
        assert start
        with open(os.path.join(directory, _multiprocess.file_name(proc.pid, start)), "w") as fh:
            json.dump({"pid": proc.pid, "start": start, "snap": _snap(i)}, fh)
        expected += i % 97
    for i in range(len(live), n):
        pid = 4_000_000 + i  # above pid_max: certainly not running
        with open(os.path.join(directory, _multiprocess.file_name(pid, "1")), "w") as fh:
            json.dump({"pid": pid, "start": "1", "snap": _snap(i)}, fh)
        expected += i % 97
    return expected


def scrape_ms(registry: CollectorRegistry) -> float:
    t0 = time.perf_counter()
    generate_latest(registry)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    live = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(LIVE)]
    rows = []
    try:
        for n in SIZES:
            with tempfile.TemporaryDirectory() as stock_dir, tempfile.TemporaryDirectory() as ours_dir:
                stock_files(stock_dir, n)
                registry = CollectorRegistry()
                MultiProcessCollector(registry, stock_dir)
                stock = min(scrape_ms(registry) for _ in range(args.repeat))
                expected = our_files(ours_dir, n, live)
                ours_registry = _exposition.host_registry(ours_dir)
                first = scrape_ms(ours_registry)
                steady = min(scrape_ms(ours_registry) for _ in range(args.repeat))
                total = sum(float(line.split()[-1]) for line in generate_latest(ours_registry).decode().splitlines()
                            if line.startswith("db_pool_checkouts_total{"))  # fmt: skip
                assert total == expected, (total, expected)  # the merge lost or doubled nothing
                files = len(os.listdir(ours_dir))
                rows.append((n, stock, first, steady, files))
    finally:
        for proc in live:
            proc.kill()
            proc.wait()
    print(f"{'processes':>10}{'stock scrape':>16}{'ours: 1st scrape':>20}{'ours: later':>16}{'files after':>14}")
    print(f"{'':>10}{'(all files)':>16}{'(folds the dead)':>20}{'(21 live)':>16}{'(ours)':>14}")
    print("-" * 76)
    for n, stock, first, steady, files in rows:
        print(f"{n:>10}{stock:>13.1f} ms{first:>17.1f} ms{steady:>13.1f} ms{files:>14}")


if __name__ == "__main__":
    main()
