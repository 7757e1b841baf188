"""Per-process accumulators and the snapshot every exposition path is built from.

The hot path never touches prometheus-client: it adds to plain ints and bucket lists owned by a
*source* (a pool's state, later a task or route table). A scrape, or the multiprocess flusher,
asks every source for its samples and turns them into a snapshot: a JSON-able dict with counters
and histograms (summed across processes) and gauges (one per process).
"""

from __future__ import annotations

import contextlib
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from .catalogue import CATALOGUE
from .snapshot import Snap, from_samples

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, Any]


class Histogram:
    """Fixed-bucket histogram: ``counts[i]`` counts observations in ``(bounds[i-1], bounds[i]]``."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def reset(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0


_owner_lock = threading.Lock()


def owner_histogram(table: dict[str, Histogram], owner: str, bounds: tuple[float, ...], limit: int) -> tuple[Histogram, bool]:
    """The histogram of ``owner`` in ``table``, created on first use; past ``limit`` owners the
    new one folds into ``"other"`` (returns True then, for the overflow counter). Creation is
    under a lock: two threads releasing the first connections of a new owner at once must not
    each create one (the count observed into the replaced one would be lost)."""
    with _owner_lock:
        hist = table.get(owner)
        if hist is not None:
            return hist, False
        overflow = len(table) >= limit and owner != "other"
        if overflow:
            owner = "other"
            hist = table.get(owner)
        if hist is None:
            hist = table[owner] = Histogram(bounds)
        return hist, overflow


class Source(Protocol):
    def samples(self) -> Iterable[Sample]: ...

    def reset(self) -> None: ...


class _Registry:
    """The sources of this process. Sources live as long as the process: dropping one would make
    its counters go backwards, so a source is only reset (after fork), never removed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[Source] = []

    def add(self, source: Source) -> None:
        with self._lock:
            self._sources.append(source)

    def sources(self) -> list[Source]:
        with self._lock:
            return list(self._sources)

    def discard(self, predicate: Any) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if not predicate(s)]

    def reset_all(self) -> None:
        for source in self.sources():
            source.reset()


REGISTRY = _Registry()

#: owner-table providers (the SQLAlchemy integration registers one), written to the process
#: file and joined by the shared view: ``_holds.OwnerRow`` records (JSON arrays in the file)
OWNER_SOURCES: list[Callable[[], Sequence[Sequence[Any]]]] = []


def owner_rows() -> list[Sequence[Any]]:
    rows: list[Sequence[Any]] = []
    for source in list(OWNER_SOURCES):
        try:
            rows.extend(source())
        except Exception:  # noqa: S112 - a provider's error must not stop a flush
            continue
    return rows


def after_fork_in_child() -> None:
    """A lock a parent thread held at fork time would never be released in the child."""
    global _owner_lock
    REGISTRY._lock = threading.Lock()
    _owner_lock = threading.Lock()


#: run once before the next collection (a scrape or a flush), then forgotten: work that need not
#: delay start-up but must be done before anyone reads the figures
BEFORE_COLLECT: list[Callable[[], None]] = []


def iter_samples() -> Iterator[Sample]:
    while BEFORE_COLLECT:
        try:
            hook = BEFORE_COLLECT.pop(0)
        except IndexError:  # another collecting thread took it
            break
        with contextlib.suppress(Exception):
            hook()
    for source in REGISTRY.sources():
        yield from source.samples()


def snapshot() -> Snap:
    """Everything this process has measured, in the JSON shape the multiprocess files use."""
    return from_samples(iter_samples())


def assert_kind(name: str, kind: str) -> None:
    if CATALOGUE[name].kind != kind:  # pragma: no cover - programming error
        raise TypeError(f"{name} is a {CATALOGUE[name].kind}, not a {kind}")


class LabeledStats:
    """A source for integrations off the pool hot path (tasks, requests, semaphores): metrics
    keyed by their label values, each name's labels in catalogue order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.generation = getattr(self, "generation", 0) + 1  # handles taken before are stale
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, Labels], float] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.hists: dict[tuple[str, Labels], Histogram] = {}
        #: handles for hot paths (a request, a task): one-element lists added to in place
        self.counter_cells: dict[tuple[str, Labels], list[float]] = {}
        self.gauge_cells: dict[tuple[str, Labels], list[float]] = {}

    def histogram(self, name: str, labels: Labels) -> Histogram:
        """The histogram of these labels, to observe into directly (valid until ``reset``:
        compare :attr:`generation`)."""
        key = (name, labels)
        with self._lock:
            hist = self.hists.get(key)
            if hist is None:
                hist = self.hists[key] = Histogram(CATALOGUE[name].buckets)
            return hist

    def counter_cell(self, name: str, labels: Labels) -> list[float]:
        """``cell[0] += n`` counts (valid until ``reset``)."""
        with self._lock:
            return self.counter_cells.setdefault((name, labels), [0])

    def gauge_cell(self, name: str, labels: Labels) -> list[float]:
        """``cell[0] += delta`` moves the gauge (valid until ``reset``)."""
        with self._lock:
            return self.gauge_cells.setdefault((name, labels), [0])

    @staticmethod
    def labels(name: str, *values: str) -> Labels:
        names = [n for n in CATALOGUE[name].labels if n != "pid"]
        return tuple(zip(names, values, strict=True))

    def inc(self, name: str, labels: Labels, n: float = 1) -> None:
        key = (name, labels)
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def add(self, name: str, labels: Labels, delta: float) -> None:
        key = (name, labels)
        with self._lock:
            self.gauges[key] = self.gauges.get(key, 0) + delta

    def set(self, name: str, labels: Labels, value: float) -> None:
        with self._lock:
            self.gauges[(name, labels)] = value

    def drop_zero(self, labels: Labels) -> None:
        """Forget the gauges with exactly these labels that read 0 (a series that moved)."""
        with self._lock:
            for key in [k for k, v in self.gauges.items() if k[1] == labels and v == 0]:
                del self.gauges[key]

    def observe(self, name: str, labels: Labels, value: float) -> None:
        key = (name, labels)
        hist = self.hists.get(key)
        if hist is None:
            with self._lock:
                hist = self.hists.setdefault(key, Histogram(CATALOGUE[name].buckets))
        hist.observe(value)

    def samples(self) -> Iterator[Sample]:
        with self._lock:
            items: list[tuple[tuple[str, Labels], Any]] = [
                *self.counters.items(), *self.gauges.items(), *self.hists.items()
            ]
            cells = [*self.counter_cells.items(), *self.gauge_cells.items()]
        for (name, labels), value in items:
            yield name, labels, value
        for (name, labels), cell in cells:
            yield name, labels, cell[0]
