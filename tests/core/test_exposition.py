"""Snapshots to Prometheus families: counters summed over processes, gauges one per pid, series
of gone processes at 0 without a pid unless a live process reports them, histograms cumulative
with +Inf; the metrics ASGI app answers lifespan and serves text."""

from __future__ import annotations

import pytest
from prometheus_client.core import Metric

from telemetry._core import exposition as _exposition
from telemetry._core.catalogue import WAIT_BUCKETS

from .. import asgi_driver

pytestmark = pytest.mark.matrix("prometheus_client")

LB = [["service", "api"], ["pool", "p"]]


def _samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_families_sum_counters_and_keep_gauges_per_process():
    counts = [0] * (len(WAIT_BUCKETS) + 1)
    counts[0], counts[-1] = 1, 1
    live = [
        (11, {"c": [["db_pool_connects_total", LB, 2]], "g": [["db_pool_connections_in_use", LB, 1]],
              "h": [["db_pool_checkout_wait_seconds", LB, counts, 200.0]]}),  # fmt: skip
        (12, {"c": [["db_pool_connects_total", LB, 3]], "g": [["db_pool_connections_in_use", LB, 2]], "h": []}),
    ]
    archive = {"c": [["db_pool_connects_total", LB, 10]], "g": [], "h": [],
               "z": [["db_pool_connections_in_use", LB], ["db_pool_pending_requests", LB]]}  # fmt: skip
    got = _samples(_exposition.families(archive, live))
    key = (("pool", "p"), ("service", "api"))
    assert got[("db_pool_connects_total", key)] == 15
    assert got[("db_pool_connections_in_use", (("pid", "11"), *key))] == 1
    assert got[("db_pool_connections_in_use", (("pid", "12"), *key))] == 2
    # reported by a live process: no extra 0 row; reported by nobody alive: 0 without a pid
    assert ("db_pool_connections_in_use", (("pid", ""), *key)) not in got
    assert got[("db_pool_pending_requests", (("pid", ""), *key))] == 0
    assert got[("db_pool_checkout_wait_seconds_bucket", (("le", "0.0005"), *key))] == 1
    assert got[("db_pool_checkout_wait_seconds_bucket", (("le", "+Inf"), *key))] == 2
    assert got[("db_pool_checkout_wait_seconds_count", key)] == 2


async def test_metrics_app_serves_text_and_answers_lifespan():
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("probe", "a probe", registry=registry).inc()
    app = _exposition.asgi_app(registry)
    assert await asgi_driver.lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/")
    assert response.status_code == 200 and "probe_total 1.0" in response.text
