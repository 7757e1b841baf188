"""Reading what a host's ``/metrics`` would show, for the tests of host-wide figures."""

from __future__ import annotations

import time
from typing import Any

import telemetry.testing
from telemetry._core import exposition as _exposition

Host = dict[tuple[str, frozenset[tuple[str, str]]], float]


def host(directory: str | None) -> Host:
    """Every sample of the host aggregate of ``directory`` (this process alone without one)."""
    if directory is None:
        return telemetry.testing.metrics()
    out = {}
    for fam in _exposition.host_registry(directory).collect():
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Host, name: str, **labels: str) -> float | None:
    """Sum of the samples named ``name`` with these labels; None when there is none."""
    found = [v for (n, lb), v in samples.items() if n == name and all((k, w) in lb for k, w in labels.items())]
    return sum(found) if found else None


def wait_for(predicate: Any, timeout: float = 20.0, step: float = 0.1) -> Any:
    """The first truthy result of ``predicate`` within ``timeout`` seconds, else its last one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(step)
    return predicate()
