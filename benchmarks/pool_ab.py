"""Pool hot-path cost measured side by side in one process: batches of ``pool.connect();
close()`` on a QueuePool alternate between uninstrumented and instrumented (``instrument()`` /
``uninstrument()`` patch and restore at class level between batches). On a noisy 2-core machine
the spread between processes is larger than the ~1 us measured; inside one process it is not.

    python benchmarks/pool_ab.py [--batches 15] [--n 20000] [--otlp]

``--otlp``: the instrumented batches also export OpenTelemetry's names over OTLP every 0.5 s
(``OTEL_METRICS_EXPORTER=otlp``) to a local sink, so the export thread runs during the timing.
"""

from __future__ import annotations

import argparse
import sqlite3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--otlp", action="store_true", help="instrumented batches export over OTLP every 0.5 s")
    args = ap.parse_args()
    settings = {}
    if args.otlp:
        import os

        from pool_overhead import _sink

        os.environ.update(OTEL_METRIC_EXPORT_INTERVAL="500", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{_sink()}")
        settings["otlp_metrics"] = True
    from _ab import compare, report
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(lambda: sqlite3.connect(":memory:", check_same_thread=False), pool_size=2, max_overflow=2)

    bare, instrumented = compare(lambda: pool.connect().close(), args.batches, args.n, **settings)
    report(f"pool.connect()+close() on QueuePool(2+2), sqlite3 memory; {args.batches} alternating batches of {args.n}"
           + (" (instrumented: with the OTLP export)" if args.otlp else ""), bare, instrumented)  # fmt: skip


if __name__ == "__main__":
    main()
