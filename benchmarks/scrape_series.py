"""Scrape cost per series, and what a scrape does to the application's event loop.

For 1k, 10k and 100k series (a gauge with that many label values, served through the package's
own collector and ``telemetry.metrics_app()``):

* render: building the exposition (``generate_latest``), best of ``--repeat``, milliseconds, and
  microseconds per series;
* loop stall: the longest gap between the ticks of a coroutine scheduled every 1 ms on the same
  event loop while one ``/metrics`` request is served, with the exposition built on the loop
  (prometheus-client's ASGI app, what the package served before) and in a worker thread (now).

    python benchmarks/scrape_series.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client import generate_latest, make_asgi_app

import telemetry
from telemetry._core import stats as _stats

SIZES = (1_000, 10_000, 100_000)


class Series:
    """A source of ``n`` distinct gauge series (what a label without a cap would grow to)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def samples(self) -> Iterable[Any]:
        for i in range(self.n):
            yield "db_server_connections", (("application", f"app{i}"), ("state", "active")), 1.0

    def reset(self) -> None:
        pass


async def _serve(app: Any) -> float:
    """The longest gap between 1 ms ticks while ``app`` answers one GET /metrics."""
    stalls = [0.0]
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls[0] = max(stalls[0], now - last)
            last = now

    async def scrape() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"", "headers": []}
        await asyncio.sleep(0.01)  # the ticker is running
        await app(scope, receive, send)
        done.set()

    await asyncio.gather(ticker(), scrape())
    return stalls[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    telemetry.instrument(service="bench", sqlalchemy=False, celery=False, redis=False, tracing=False,
                         loop_blocked_seconds=60)  # the stalls are measured here, not logged
    print(f"{'series':>8} {'render ms':>10} {'us/series':>10} {'stall on loop ms':>17} {'stall, thread ms':>17}")
    print("-" * 66)
    for n in SIZES:
        source = Series(n)
        _stats.REGISTRY.add(source)
        try:
            render = min(_timed(lambda: generate_latest(prometheus_client.REGISTRY)) for _ in range(args.repeat))
            inline = min(asyncio.run(_serve(make_asgi_app(prometheus_client.REGISTRY))) for _ in range(args.repeat))
            threaded = min(asyncio.run(_serve(telemetry.metrics_app())) for _ in range(args.repeat))
        finally:
            _stats.REGISTRY.discard(lambda s, source=source: s is source)
        print(f"{n:>8} {render * 1000:>10.1f} {render / n * 1e6:>10.2f} {inline * 1000:>17.1f} {threaded * 1000:>17.1f}")
    telemetry.uninstrument()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
