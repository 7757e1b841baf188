from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import telemetry
from telemetry.testing import sample  # noqa: F401 - re-exported for the tests
from telemetry.tools._proc import PORT_RANGE_ENV

from . import services

# Parallel workers (pytest-xdist) each take free ports from a range of their own, below the
# kernel's ephemeral range: two workers never pick one port between choosing it and a server
# binding it. The demo's processes started by a test inherit the range.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _worker = int(os.environ["PYTEST_XDIST_WORKER"][2:])
    _base = int(os.environ.get("TELEMETRY_TEST_PORT_BASE", "20000")) + 1000 * _worker
    os.environ[PORT_RANGE_ENV] = f"{_base}-{_base + 1000}"


#: files whose tests take minutes: started first, each whole on one parallel worker
#: (``--dist loadfile``), so the demos (20 processes each, judging rates and waits on 2 cores)
#: run one at a time while the light tests run beside them
LONG_FILES = ("test_alert_path.py", "test_demo.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, so that parallel workers (pytest-xdist) start them at once and
    finish together; the rest in their usual order."""
    items.sort(key=lambda item: 0 if item.path.name in LONG_FILES else 1)


@pytest.fixture(scope="session")
def pg() -> Iterator[services.Postgres]:
    """A throwaway PostgreSQL cluster on a free loopback port (max_connections=40)."""
    with services.start_postgres(max_connections=40) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[services.Redis]:
    with services.start_redis() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_telemetry() -> Iterator[None]:
    """Every test starts and ends with nothing instrumented, leaves no thread running and no
    garbage behind. A forked child hangs in a C library's lock (SQLite's) that another thread held
    at the moment of fork: a thread left by an earlier test, or a garbage collection that the
    scraping thread of a later test happens to run, closing an earlier test's SQLite connections
    (CI saw a forked child stuck in sqlite3.connect)."""
    telemetry.uninstrument()
    before = set(threading.enumerate())
    yield
    telemetry.uninstrument()
    deadline = time.monotonic() + 5
    while left := [t for t in threading.enumerate() if t not in before and t.is_alive()]:
        if time.monotonic() > deadline:
            pytest.fail(f"the test left threads running: {sorted(t.name for t in left)}")
        time.sleep(0.05)
    _dispose_engines()
    gc.collect()  # here, in the main thread


def _dispose_engines() -> None:
    """Close the connections the test's sync engines still pool. Left to the garbage collector,
    each SQLite connection is closed by nobody: Python 3.13 reports every one of them
    (``ResourceWarning: unclosed database``), which the suite treats as an error. The package
    holds no connection of its own; these are the tests' engines."""
    from telemetry.integrations.sqlalchemy.engines import live_engines

    for engine in live_engines():
        if not engine.dialect.is_async:  # an async engine's pool closes on its own loop
            engine.dispose()


async def starve(engine: Any, waiters: int, hold: float = 1.0, owner: str = "hog") -> list[str]:
    """One coroutine (as ``owner``) holds a connection for ``hold`` seconds while ``waiters``
    others try to check one out; returns each waiter's result, "ok" or "timeout"."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    holding = asyncio.Event()

    async def hog() -> None:
        with telemetry.db_owner(owner):
            async with engine.connect():
                holding.set()
                await asyncio.sleep(hold)

    async def waiter() -> str:
        await holding.wait()
        try:
            async with engine.connect():
                return "ok"
        except PoolTimeout:
            return "timeout"

    results = await asyncio.gather(hog(), *(waiter() for _ in range(waiters)))
    return list(results[1:])
