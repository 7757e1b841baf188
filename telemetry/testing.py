"""Helpers for your own tests: capture the package's events and read its metrics without a
server (as structlog ships ``capture_logs``)::

    import telemetry
    from telemetry.testing import capture_events, sample

    def test_no_pool_timeouts(app_client):
        telemetry.instrument(service="api")
        with capture_events("db_pool_timeout") as events:
            app_client.get("/items/1")
        assert events == []
        assert sample("db_pool_checkouts_total", result="ok") >= 1

Metrics are read from prometheus-client's default registry, where ``instrument()`` registers the
package in single-process mode (pass ``registry=`` for another one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["capture_events", "metrics", "sample"]


@contextlib.contextmanager
def capture_events(*names: str) -> Iterator[list[dict[str, Any]]]:
    """Collect the structured events logged inside the block (only ``names`` when given), as
    dicts with ``event``, ``log_level`` and the event's fields."""
    from structlog.testing import capture_logs

    captured: list[dict[str, Any]] = []
    with capture_logs() as logs:
        try:
            yield captured
        finally:
            captured.extend(dict(e) for e in logs if not names or e.get("event") in names)


def metrics(registry: Any = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every exposed sample: ``(name, frozenset(labels.items())) -> value``."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(name: str, registry: Any = None, **labels: str) -> float:
    """Sum of the exposed samples named ``name`` whose labels include ``labels``; ``KeyError``
    when there is none (absent is not 0)."""
    total, found = 0.0, False
    for (sample_name, sample_labels), value in metrics(registry).items():
        if sample_name == name and all((k, v) in sample_labels for k, v in labels.items()):
            total += value
            found = True
    if not found:
        raise KeyError(f"no sample {name} {labels}")
    return total
