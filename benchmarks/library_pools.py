"""Checkout cost of psycopg_pool's and asyncpg's pools, bare and instrumented, side by side in
one process (batches alternate: ``uninstrument()`` / ``instrument()`` between them, as
``pool_ab.py`` does for SQLAlchemy's):

* psycopg_pool ``ConnectionPool``: ``getconn()`` + ``putconn()``;
* psycopg_pool ``AsyncConnectionPool``: ``await getconn()`` + ``await putconn()``;
* asyncpg ``Pool``: ``await acquire()`` + ``await release()``, with a no-op ``reset`` (asyncpg's
  default reset is a round trip per release, which would bury the difference in its noise).

Against a real PostgreSQL: ``--database-url``, else a throwaway one started here (the binaries
of the Debian packages, as the tests use).

    python benchmarks/library_pools.py [--batches 15] [--n 5000] [--only asyncpg] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from _ab import compare, report


async def _per_call_us(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n * 1e6


async def compare_async(fn: Callable[[], Awaitable[Any]], batches: int, n: int) -> tuple[list[float], list[float]]:
    import telemetry

    bare, instrumented = [], []
    for _ in range(batches):
        telemetry.uninstrument()
        await _per_call_us(fn, 500)
        bare.append(await _per_call_us(fn, n))
        telemetry.instrument(service="bench", tracing=False)
        await _per_call_us(fn, 500)
        instrumented.append(await _per_call_us(fn, n))
    telemetry.uninstrument()
    return bare, instrumented


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from telemetry.tools.demo import stack

    with stack.start_postgres(40) as pg:
        yield f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--only", choices=("psycopg", "psycopg-async", "asyncpg"), default=None, help="one pool only")
    args = ap.parse_args()
    import asyncpg
    import psycopg_pool

    with _database(args.database_url) as url:
        if args.only in (None, "psycopg"):
            pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=2, open=True)
            pool.wait()
            bare, instrumented = compare(lambda: pool.putconn(pool.getconn()), args.batches, args.n)
            pool.close()
            report(f"psycopg_pool ConnectionPool getconn()+putconn(); {args.batches} alternating batches of {args.n}",
                   bare, instrumented)  # fmt: skip

        async def psycopg_async() -> tuple[list[float], list[float]]:
            apool = psycopg_pool.AsyncConnectionPool(url, min_size=1, max_size=2, open=False)
            await apool.open(wait=True)

            async def once() -> None:
                await apool.putconn(await apool.getconn())

            try:
                return await compare_async(once, args.batches, args.n)
            finally:
                await apool.close()

        if args.only in (None, "psycopg-async"):
            bare, instrumented = asyncio.run(psycopg_async())
            report(f"psycopg_pool AsyncConnectionPool getconn()+putconn(); {args.batches} alternating batches of {args.n}",
                   bare, instrumented)  # fmt: skip

        async def asyncpg_pool() -> tuple[list[float], list[float]]:
            async def no_reset(con: Any) -> None:
                return None

            apool = await asyncpg.create_pool(url, min_size=1, max_size=2, reset=no_reset)

            async def once() -> None:
                await apool.release(await apool.acquire())

            try:
                return await compare_async(once, args.batches, args.n)
            finally:
                await apool.close()

        if args.only in (None, "asyncpg"):
            bare, instrumented = asyncio.run(asyncpg_pool())
            report(f"asyncpg Pool acquire()+release() (no-op reset); {args.batches} alternating batches of {args.n}",
                   bare, instrumented)  # fmt: skip


if __name__ == "__main__":
    main()
