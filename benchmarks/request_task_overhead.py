"""Overhead per HTTP request and per Celery task, bare against instrumented.

* request: a FastAPI endpoint called through its ASGI interface in-process (no network, so the
  figure is the middleware's own cost), bare / metrics only (``TELEMETRY_TRACING=false``) /
  metrics + OpenTelemetry server spans (no exporter).
* task: ``task.apply()`` runs a no-op task in-process through Celery's tracer, which sends the
  same prerun/postrun signals a worker sends; bare / metrics only / metrics + spans.

Each configuration runs in its own child process; rounds alternate; the best round is kept.

    python benchmarks/request_task_overhead.py [--rounds 5] [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

CONFIGS = ["bare", "metrics", "metrics+spans"]


def child(config: str, n: int) -> dict[str, float]:
    if config != "bare":
        os.environ["TELEMETRY_TRACING"] = "true" if config == "metrics+spans" else "false"
        import telemetry

        telemetry.instrument(service="bench", sqlalchemy=False)
    from celery import Celery
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    async def call() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/items/7", "raw_path": b"/items/7", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80), "app": app}  # fmt: skip
        sent = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    async def requests(count: int) -> float:
        for _ in range(200):
            await call()
        t0 = time.perf_counter()
        for _ in range(count):
            await call()
        return (time.perf_counter() - t0) / count * 1e6

    celery = Celery("bench", broker="memory://", backend="cache+memory://")

    @celery.task(name="noop")
    def noop() -> int:
        return 1

    def tasks(count: int) -> float:
        for _ in range(100):
            noop.apply()
        t0 = time.perf_counter()
        for _ in range(count):
            noop.apply()
        return (time.perf_counter() - t0) / count * 1e6

    return {"request": asyncio.run(requests(n)), "task": tasks(max(500, n // 2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    best: dict[str, dict[str, float]] = {c: {} for c in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--child", config, "--n", str(args.n)],
                                 check=True, capture_output=True, text=True, env=env)  # fmt: skip
            for op, us in json.loads(out.stdout.strip().splitlines()[-1]).items():
                best[config][op] = min(us, best[config].get(op, float("inf")))
    print(f"rounds: {args.rounds}   n: {args.n}   (best round, microseconds per operation)")
    print(f"{'configuration':<16}{'request':>24}{'task':>24}")
    print("-" * 64)
    for config in CONFIGS:
        cells = [f"{best[config][op]:9.1f} us  x{best[config][op] / best['bare'][op]:5.2f}" for op in ("request", "task")]
        print(f"{config:<16}" + "".join(c.rjust(24) for c in cells))
    print()
    for op in ("request", "task"):
        for config in CONFIGS[1:]:
            print(f"{op} {config}: +{best[config][op] - best['bare'][op]:.1f} us")


if __name__ == "__main__":
    main()
