"""Throwaway real services for the tests: PostgreSQL, pgbouncer, Redis, started on free loopback
ports (the same code as ``telemetry demo --stack real``: ``telemetry/tools/demo/stack.py``).

Outside CI a test whose binary is missing is skipped with the reason; with ``CI=true`` it fails,
so CI can never pass by skipping the real-service tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import TypeVar

import httpx
import pytest

from telemetry.tools.demo import stack
from telemetry.tools.demo.stack import (
    Pgbouncer,
    Postgres,
    Redis,
    free_port,
    pg_bin,
    wait_port,
)

__all__ = ["Pgbouncer", "Postgres", "Redis", "binary", "free_port", "missing", "pg_bin", "restart_postgres",
           "start_pgbouncer", "start_postgres", "start_redis", "wait_port", "wait_ready"]  # fmt: skip

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip (locally) or fail (CI) because a service binary is not installed."""
    message = what if what.endswith("scripts/install-system-deps.sh") else f"{what} is not installed: run scripts/install-system-deps.sh"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def binary(name: str, package: str) -> str:
    """Path of a service binary from a Debian package, or skip (locally) / fail (CI)."""
    path = shutil.which(name)
    if not path:
        missing(f"{name} (Debian package {package})")
    assert path
    return path


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Wait until a Prometheus or Alertmanager on ``port`` answers ``/-/ready`` with 200: its port
    opens before it serves (a query during start-up answers 503 "Service Unavailable")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing ready on 127.0.0.1:{port}/-/ready after {timeout:.0f}s")


@contextlib.contextmanager
def _or_missing(started: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    """``started`` (one of ``telemetry.tools.demo.stack``'s starters), or skip (locally) / fail (CI)
    when its binary is not installed."""
    try:
        with started as server:
            yield server
    except stack.Missing as exc:
        missing(str(exc))


def start_postgres(max_connections: int = 40) -> contextlib.AbstractContextManager[Postgres]:
    return _or_missing(stack.start_postgres(max_connections))


def start_pgbouncer(pg: Postgres, pool_size: int = 4,
                    pool_mode: str = "transaction") -> contextlib.AbstractContextManager[Pgbouncer]:  # fmt: skip
    return _or_missing(stack.start_pgbouncer(pg, pool_size, pool_mode))


def start_redis(port: int | None = None) -> contextlib.AbstractContextManager[Redis]:
    return _or_missing(stack.start_redis(port))


def restart_postgres(pg: Postgres) -> None:
    pg_ctl = pg_bin("pg_ctl")
    assert pg_ctl
    # -l: the restarted server must not inherit (and hold open) our stdout pipe
    subprocess.run(
        stack.as_postgres([pg_ctl, "-D", pg.datadir, "-m", "fast", "-l", f"{pg.datadir}/log", "-w", "restart"]),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
