from __future__ import annotations

from collections.abc import Iterator

import pytest

import telemetry

from . import services


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
    """Every test starts and ends with nothing instrumented."""
    telemetry.uninstrument()
    yield
    telemetry.uninstrument()


def sample(name: str, **labels: str) -> float:
    """Sum of the exposed samples named ``name`` whose labels include ``labels``."""
    from prometheus_client import REGISTRY

    total, found = 0.0, False
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    if not found:
        raise KeyError(f"no sample {name} {labels}")
    return total
