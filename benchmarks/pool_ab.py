"""Pool hot-path cost measured side by side in one process: batches of ``pool.connect();
close()`` on a QueuePool alternate between uninstrumented and instrumented (``instrument()`` /
``uninstrument()`` patch and restore at class level between batches). On a noisy 2-core machine
the spread between processes is larger than the ~1 us measured; inside one process it is not.

    python benchmarks/pool_ab.py [--batches 15] [--n 20000]
"""

from __future__ import annotations

import argparse
import sqlite3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    from _ab import compare, report
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(lambda: sqlite3.connect(":memory:", check_same_thread=False), pool_size=2, max_overflow=2)

    bare, instrumented = compare(lambda: pool.connect().close(), args.batches, args.n)
    report(f"pool.connect()+close() on QueuePool(2+2), sqlite3 memory; {args.batches} alternating batches of {args.n}",
           bare, instrumented)  # fmt: skip


if __name__ == "__main__":
    main()
