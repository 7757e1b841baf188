"""redis-py pool hot path: ``get_connection()`` + ``release()`` on a real Redis (a throwaway
``redis-server`` on a free loopback port), batches alternating between uninstrumented and
instrumented in one process, as ``benchmarks/pool_ab.py`` does for SQLAlchemy.

    python benchmarks/redis_pool.py [--batches 15] [--n 20000]
"""

from __future__ import annotations

import argparse
import shutil
import socket
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
        from _ab import compare, report

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

        bare, instrumented = compare(lambda: pool.release(pool.get_connection("PING")), args.batches, args.n,
                                     sqlalchemy=False)  # fmt: skip
        report(f"redis-py {redis.__version__} ConnectionPool get_connection()+release(); "
               f"{args.batches} alternating batches of {args.n}", bare, instrumented)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
