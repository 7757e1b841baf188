"""Pool hot-path cost measured side by side in one process: batches of ``pool.connect();
close()`` on a QueuePool alternate between uninstrumented and instrumented (``instrument()`` /
``uninstrument()`` patch and restore at class level between batches). On a noisy 2-core machine
the spread between processes is larger than the ~1 us measured; inside one process it is not.

    python benchmarks/pool_ab.py [--batches 15] [--n 20000]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    from sqlalchemy.pool import QueuePool

    import telemetry

    pool = QueuePool(lambda: sqlite3.connect(":memory:", check_same_thread=False), pool_size=2, max_overflow=2)

    def batch(n: int) -> float:
        connect = pool.connect
        t0 = time.perf_counter()
        for _ in range(n):
            connect().close()
        return (time.perf_counter() - t0) / n * 1e6

    bare, instrumented = [], []
    for _ in range(args.batches):
        telemetry.uninstrument()
        batch(1000)
        bare.append(batch(args.n))
        telemetry.instrument(service="bench", tracing=False)
        batch(1000)
        instrumented.append(batch(args.n))
    telemetry.uninstrument()
    deltas = [i - b for b, i in zip(bare, instrumented, strict=True)]
    print(f"pool.connect()+close() on QueuePool(2+2), sqlite3 memory; {args.batches} alternating batches of {args.n}")
    print(f"  bare          best {min(bare):6.2f} us   median {statistics.median(bare):6.2f} us")
    print(f"  instrumented  best {min(instrumented):6.2f} us   median {statistics.median(instrumented):6.2f} us")
    print(f"  overhead      best-vs-best +{min(instrumented) - min(bare):.2f} us   median of paired deltas +{statistics.median(deltas):.2f} us")


if __name__ == "__main__":
    main()
