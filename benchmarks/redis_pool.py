"""redis-py pool hot path: ``get_connection()`` + ``release()`` on a real Redis (a throwaway
``redis-server`` on a free loopback port), batches alternating between uninstrumented and
instrumented in one process, as ``benchmarks/pool_ab.py`` does for SQLAlchemy.

    python benchmarks/redis_pool.py [--batches 15] [--n 20000]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: run scripts/install-system-deps.sh")
    port = _free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        import redis

        import telemetry

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        pool = redis.ConnectionPool(host="127.0.0.1", port=port, max_connections=4)
        pool.release(pool.get_connection("PING"))  # connected once: the loop measures the pool

        def batch(n: int) -> float:
            get, release = pool.get_connection, pool.release
            t0 = time.perf_counter()
            for _ in range(n):
                release(get("PING"))
            return (time.perf_counter() - t0) / n * 1e6

        bare, instrumented = [], []
        for _ in range(args.batches):
            telemetry.uninstrument()
            batch(1000)
            bare.append(batch(args.n))
            telemetry.instrument(service="bench", tracing=False, sqlalchemy=False)
            batch(1000)
            instrumented.append(batch(args.n))
        telemetry.uninstrument()
        deltas = [i - b for b, i in zip(bare, instrumented, strict=True)]
        print(f"redis-py {redis.__version__} ConnectionPool get_connection()+release(); "
              f"{args.batches} alternating batches of {args.n}")  # fmt: skip
        print(f"  bare          best {min(bare):6.2f} us   median {statistics.median(bare):6.2f} us")
        print(f"  instrumented  best {min(instrumented):6.2f} us   median {statistics.median(instrumented):6.2f} us")
        print(f"  overhead      best-vs-best +{min(instrumented) - min(bare):.2f} us   "
              f"median of paired deltas +{statistics.median(deltas):.2f} us")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
