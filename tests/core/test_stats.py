"""The accumulators and the snapshot: histogram buckets are (lower, upper], handles taken on a
LabeledStats source count into the snapshot and go stale on reset, snapshots merge by adding
counters and buckets, and a dead process's "how many right now" gauges are remembered as gone."""

from __future__ import annotations

import pytest

from telemetry._core import snapshot as _snapshot
from telemetry._core.catalogue import HOLD_BUCKETS
from telemetry._core.stats import Histogram, LabeledStats


def test_histogram_buckets_are_upper_inclusive():
    hist = Histogram((1.0, 5.0))
    for value in (0.5, 1.0, 1.0001, 5.0, 7.0):
        hist.observe(value)
    assert hist.counts == [2, 2, 1]
    assert hist.count == 5 and hist.total == pytest.approx(14.5001)


def test_handles_count_into_the_snapshot_and_a_reset_makes_them_stale():
    stats = LabeledStats()
    labels = LabeledStats.labels("celery_tasks_in_progress", "worker", "t", "q")
    cell = stats.gauge_cell("celery_tasks_in_progress", labels)
    hist = stats.histogram("db_connection_hold_seconds", (("service", "api"), ("pool", "p"), ("owner", "o")))
    cell[0] += 2
    hist.observe(0.003)
    snap = _snapshot.from_samples(stats.samples())
    assert ["celery_tasks_in_progress", [list(p) for p in labels], 2] in snap["g"]
    [row] = snap["h"]
    assert row[0] == "db_connection_hold_seconds" and sum(row[2]) == 1
    generation = stats.generation
    stats.reset()
    assert stats.generation == generation + 1  # holders of handles rebuild them
    assert list(stats.samples()) == []


def test_total_adds_counters_and_buckets_and_remembers_gone_gauges():
    lb = [["service", "api"], ["pool", "p"]]
    counts = [0] * (len(HOLD_BUCKETS) + 1)
    counts[3] = 2
    a = {"c": [["db_pool_connects_total", lb, 3]], "g": [["db_pool_connections_in_use", lb, 1]],
         "h": [["db_connection_hold_seconds", lb + [["owner", "o"]], counts, 0.5]]}  # fmt: skip
    b = {"c": [["db_pool_connects_total", lb, 4]], "g": [["db_pool_size", lb, 5]],
         "h": [["db_connection_hold_seconds", lb + [["owner", "o"]], counts, 0.25]]}  # fmt: skip
    total = _snapshot.Total()
    total.add(a, dead=True)
    total.add(b)
    snap = total.snap()
    assert snap["c"] == [["db_pool_connects_total", lb, 7]]
    assert snap["h"][0][2][3] == 4 and snap["h"][0][3] == pytest.approx(0.75)
    assert snap["g"] == []  # gauges are per process: never summed into the archive
    assert snap["z"] == [["db_pool_connections_in_use", lb]]  # a count gauge of a dead process
    again = _snapshot.Total()
    again.add(snap)  # the archive read back keeps what it remembered
    assert again.snap()["z"] == snap["z"]
