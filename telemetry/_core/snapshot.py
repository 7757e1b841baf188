"""The snapshot: what one process has measured, in the JSON shape the multiprocess files use,
and the one place that merges snapshots (counters add, histogram buckets add).

A snapshot is ``{"c": counters, "g": gauges, "h": histograms, "z": gone}``, each a list of rows:

* ``"c"``: ``[name, labels, value]``: counters, summed across processes (dead ones included);
* ``"g"``: ``[name, labels, value]``: gauges, one per process (exposed with a ``pid`` label);
* ``"h"``: ``[name, labels, bucket_counts, sum]``: per-bucket (not cumulative) counts, summed;
* ``"z"``: ``[name, labels]``: "how many right now" gauge series whose processes are all gone,
  exposed at 0 (only in the archive of dead processes).

``labels`` is a list of ``[name, value]`` pairs in catalogue order. A :class:`Total` is the
merged, keyed form the archive and the exposition work on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .catalogue import CATALOGUE, COUNTER, EXTERNAL, GAUGE, HISTOGRAM, ZERO_WHEN_GONE

Snap = dict[str, list[list[Any]]]
Key = tuple[str, tuple[tuple[str, str], ...]]


def empty() -> Snap:
    return {"c": [], "g": [], "h": [], "z": []}


def add_counts(into: list[int], counts: Iterable[int]) -> list[int]:
    """Bucket counts of two histograms with the same bounds, added."""
    return [a + b for a, b in zip(into, counts, strict=True)]


def _key(name: str, labels: Iterable[Iterable[str]]) -> Key:
    return name, tuple((str(k), str(v)) for k, v in labels)


def _rows(keyed: dict[Key, Any]) -> list[list[Any]]:
    return [[n, [list(p) for p in lb], v] for (n, lb), v in keyed.items()]


def from_samples(samples: Iterable[tuple[str, Any, Any]]) -> Snap:
    """A process's snapshot from its sources' samples (histogram values are ``Histogram``)."""
    counters: dict[Key, float] = {}
    gauges: dict[Key, float] = {}
    hists: dict[Key, list[Any]] = {}
    for name, labels, value in samples:
        kind = CATALOGUE[name].kind
        key = (name, labels)
        if kind == COUNTER:
            counters[key] = counters.get(key, 0) + value
        elif kind == GAUGE:
            gauges[key] = gauges.get(key, 0) + value
        elif kind == HISTOGRAM:
            merged = hists.get(key)
            if merged is None:
                hists[key] = [list(value.counts), value.total]
            else:
                merged[0] = add_counts(merged[0], value.counts)
                merged[1] += value.total
    return {
        "c": _rows(counters),
        "g": _rows(gauges),
        "h": [[n, [list(p) for p in lb], c, s] for (n, lb), (c, s) in hists.items()],
    }


class Total:
    """Snapshots merged: counters and histograms summed, gone gauge series remembered."""

    def __init__(self) -> None:
        self.counters: dict[Key, float] = {}
        self.hists: dict[Key, list[Any]] = {}
        self.gone: set[Key] = set()

    def add(self, snap: Snap, *, dead: bool = False) -> None:
        """Add a snapshot's counters and histograms (gauges are per process; of a dead process
        only the keys of its "how many right now" gauges are kept, to read 0)."""
        for name, labels, *_ in snap.get("z", []):
            self.gone.add(_key(name, labels))
        if dead:
            for name, labels, _value in snap.get("g", []):
                if name in ZERO_WHEN_GONE:
                    self.gone.add(_key(name, labels))
        for name, labels, value in snap.get("c", []):
            key = _key(name, labels)
            if name in EXTERNAL:  # another system's total: the live reading, never summed
                if not dead:
                    self.counters[key] = max(self.counters.get(key, 0), value)
                continue
            self.counters[key] = self.counters.get(key, 0) + value
        for name, labels, counts, total_sum in snap.get("h", []):
            key = _key(name, labels)
            prev = self.hists.get(key)
            if prev is None:
                self.hists[key] = [list(counts), total_sum]
            else:
                prev[0] = add_counts(prev[0], counts)
                prev[1] += total_sum

    def snap(self) -> Snap:
        return {
            "c": _rows(self.counters),
            "g": [],
            "h": [[n, [list(p) for p in lb], c, s] for (n, lb), (c, s) in self.hists.items()],
            "z": [[n, [list(p) for p in lb]] for (n, lb) in sorted(self.gone)],
        }


def gauges(snap: Snap) -> Iterable[tuple[Key, float]]:
    for name, labels, value in snap.get("g", []):
        yield _key(name, labels), value
