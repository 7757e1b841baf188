"""Cost of pool instrumentation per checkout+checkin, against bare SQLAlchemy and a no-op floor.

Prints one table: microseconds per operation and the ratio to bare, for

* ``pool.connect(); close()``   - the raw checkout + checkin the package hooks
* ``engine.connect(); close()`` - the same through the Engine/Connection layer
* ``select 1``                  - a full statement round trip on a checked-out connection

under: bare SQLAlchemy; no-op checkout/checkin listeners (the floor any event-based hook pays);
this package single-process and multiprocess, and with OpenTelemetry's names exported over OTLP
every 0.5 s (``OTEL_METRICS_EXPORTER=otlp``, to a local sink); opentelemetry-instrumentation-sqlalchemy.

Each configuration runs in its own child process (engine-level listeners leave residue on an
engine, and a process must start clean), configurations alternate over several rounds, and the
best round is kept: on a noisy 2-core machine the minimum is the most repeatable estimate.

    python benchmarks/pool_overhead.py [--database-url URL] [--rounds 5] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = ["bare", "noop-listeners", "telemetry", "telemetry-multiprocess", "telemetry-otlp", "otel-sqlalchemy"]
OPS = ["pool.connect+close", "engine.connect+close", "select 1"]


def _sink() -> int:
    """An OTLP/HTTP endpoint that accepts and drops every export (in the child's own thread)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


def child(config: str, url: str, n: int) -> dict[str, float]:
    from sqlalchemy import create_engine, event, text
    from sqlalchemy.pool import QueuePool

    if config == "telemetry-multiprocess":
        os.environ["TELEMETRY_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-mp-")
    if config == "telemetry-otlp":  # OpenTelemetry's names over OTLP every 0.5 s, to a local sink
        os.environ.update(OTEL_METRICS_EXPORTER="otlp", OTEL_METRIC_EXPORT_INTERVAL="500",
                          OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{_sink()}")  # fmt: skip
    kwargs = {"poolclass": QueuePool, "pool_size": 2, "max_overflow": 2}
    engine = create_engine(url, **kwargs)
    if config == "noop-listeners":
        event.listen(engine.pool, "checkout", lambda *a: None)
        event.listen(engine.pool, "checkin", lambda *a: None)
    elif config.startswith("telemetry"):
        import telemetry

        telemetry.instrument(service="bench")
    elif config == "otel-sqlalchemy":
        from opentelemetry import trace
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())  # spans recorded, not exported
        SQLAlchemyInstrumentor().instrument(engine=engine, enable_commenter=False)

    pool = engine.pool
    out: dict[str, float] = {}

    def timed(fn, count: int) -> float:
        for _ in range(min(count, 1000)):
            fn()
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        return (time.perf_counter() - t0) / count * 1e6

    def raw() -> None:
        pool.connect().close()

    def conn() -> None:
        engine.connect().close()

    stmt = text("select 1")
    held = engine.connect()

    def select() -> None:
        held.execute(stmt).scalar()

    out[OPS[0]] = timed(raw, n)
    out[OPS[1]] = timed(conn, n)
    out[OPS[2]] = timed(select, max(1000, n // 4))
    held.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database-url", default=None, help="default: a SQLite file in a temp dir")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.database_url, args.n)))
        return
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='bench-')}/bench.db"
    best: dict[str, dict[str, float]] = {c: {} for c in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            res = subprocess.run(
                [sys.executable, __file__, "--child", config, "--database-url", url, "--n", str(args.n)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            for op, us in json.loads(res.stdout.strip().splitlines()[-1]).items():
                best[config][op] = min(us, best[config].get(op, float("inf")))
    safe = url.split("@")[-1] if "@" in url else url
    print(f"database: {safe}   rounds: {args.rounds}   n: {args.n}   (best round, microseconds)")
    header = f"{'configuration':<24}" + "".join(f"{op:>26}" for op in OPS)
    print(header)
    print("-" * len(header))
    for config in CONFIGS:
        cells = []
        for op in OPS:
            us, base = best[config][op], best["bare"][op]
            cells.append(f"{us:9.2f} us  x{us / base:5.2f}".rjust(26))
        print(f"{config:<24}" + "".join(cells))
    floor = best["noop-listeners"]
    print()
    for config in ("telemetry", "telemetry-multiprocess", "telemetry-otlp"):
        extra = best[config][OPS[0]] - floor[OPS[0]]
        print(f"{config}: +{extra:.2f} us per checkout+checkin over the no-op listener floor")
    otlp = best["telemetry-otlp"][OPS[0]] - best["telemetry"][OPS[0]]
    print(f"telemetry-otlp: {otlp:+.2f} us per checkout+checkin over telemetry without the OTLP export")


if __name__ == "__main__":
    main()
