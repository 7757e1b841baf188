"""The episode, not the process's life: ``telemetry diagnose --metrics-url`` scrapes the hosts for
a stated window and reads what happened in it, as ``--prometheus-url`` does over its window.

Counters and histogram series are read as their increase over the window (last scrape minus the
first; a series born in between counts from 0, a counter that went backwards, from a restarted
process, counts from its new value), gauges at their peak over the scrapes (the views' ``*_up`` at
their lowest). Traffic before the window no longer dilutes the episode. When nothing moved in the
window (an idle service, or a page saved during an incident and served again), the totals since
each process started are read instead, and the output says so. A host that cannot be read is
reported as such (its URL and why); the others are still diagnosed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from telemetry._core.catalogue import CATALOGUE, COUNTER, HISTOGRAM
from telemetry._core.urls import redact
from telemetry.tools.samples import Samples

Sample = tuple[str, dict[str, str], float]

#: series read as their increase over the window: counters, and histograms' parts
_CUMULATIVE = frozenset(
    [s.name for s in CATALOGUE.values() if s.kind == COUNTER]
    + [f"{s.name}{part}" for s in CATALOGUE.values() if s.kind == HISTOGRAM for part in ("_bucket", "_sum", "_count")]
)


@dataclasses.dataclass
class Episode:
    """What the window read: the samples (increases and peaks, or the totals when nothing moved),
    its length, how many scrapes, whether anything moved, and the hosts that could not be read
    (URL -> the error)."""

    samples: Samples
    seconds: float
    scrapes: int
    moved: bool
    unreadable: dict[str, str]

    def describe(self) -> str:
        if not self.moved:
            return (f"nothing moved in the {self.seconds:.0f} s window ({self.scrapes} scrapes): read the totals "
                    "since each process started instead")  # fmt: skip
        return (f"over a {self.seconds:.0f} s window ({self.scrapes} scrapes): counters as their increase, "
                "gauges at their peak")  # fmt: skip


def _key(sample: Sample) -> tuple[str, frozenset[tuple[str, str]]]:
    return sample[0], frozenset(sample[1].items())


def window(scrapes: list[Samples]) -> tuple[Samples, bool]:
    """The samples of a window from successive scrapes of the same hosts, and whether any counter
    or histogram moved in it (two scrapes at least)."""
    first = {_key(s): s[2] for s in scrapes[0]}
    peaks: dict[tuple[str, frozenset[tuple[str, str]]], Sample] = {}
    for samples in scrapes:
        for s in samples:
            if s[0] in _CUMULATIVE:
                continue
            k = _key(s)
            lowest = s[0].endswith("_view_up")
            if k not in peaks or (s[2] < peaks[k][2] if lowest else s[2] > peaks[k][2]):
                peaks[k] = s
    out: Samples = list(peaks.values())
    moved = False
    for s in scrapes[-1]:
        if s[0] in _CUMULATIVE:
            before = first.get(_key(s), 0.0)
            increase = s[2] - before if s[2] >= before else s[2]
            moved = moved or increase > 0
            out.append((s[0], s[1], increase))
    return out, moved


def read(urls: list[str], seconds: float, fetch: Callable[[str], Samples], every: float = 1.0) -> Episode:
    """Scrape ``urls`` every ``every`` seconds for ``seconds`` (two scrapes at least)."""
    unreadable: dict[str, str] = {}
    scrapes: list[dict[str, Samples]] = []
    start = time.monotonic()
    deadline = start + seconds
    while True:
        now = time.monotonic()
        got: dict[str, Samples] = {}
        for url in urls:
            if url in unreadable:
                continue
            try:
                got[url] = fetch(url)
            except (OSError, ValueError) as exc:
                why = str(exc) or type(exc).__name__
                unreadable[url] = redact(why if url in why else f"{url}: {why}", url)
        scrapes.append(got)
        if now >= deadline and len(scrapes) >= 2:
            break
        time.sleep(max(0.0, min(every, deadline - now)))
    took = time.monotonic() - start
    # a host read at the start but not at the end is unreadable, not idle: keep only whole runs
    whole = [url for url in urls if url not in unreadable]
    runs = [[s for url in whole for s in scrape.get(url, [])] for scrape in scrapes]
    if not whole:
        return Episode([], took, len(scrapes), False, unreadable)
    samples, moved = window(runs)
    if not moved:
        samples = runs[-1]
    return Episode(samples, took, len(scrapes), moved, unreadable)
