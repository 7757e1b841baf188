"""Capacity advice from what was measured: the pool sizes, semaphore and server connections
that would have carried the load, per service, or the holder to release when size is not the
answer.

The load over a window (a Prometheus' range, or a series of scrapes of hosts' ``/metrics``):
checkouts per second ``λ`` (timeouts included: they were demand), hold time ``W`` (mean, p95),
connections in use per process (mean, p99, peak). Little's law gives the connections that load
keeps busy, ``L = λ W``; the advice sizes ``pool_size`` for the busiest process's mean and the
total (``pool_size + max_overflow``) for its bursts (the p99 seen, or ``L + 3 √L`` when the pool
was full and the p99 is only its ceiling), each with a stated margin. When one owner holds most
of the time for longer than the hold threshold (a stream keeping its session, a transaction
across a slow call), a bigger pool only queues more: the advice is to release it, by name.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from telemetry import thresholds as T
from telemetry.tools.samples import Samples, fetch_text, parse, quantile

from .limits import allocate, on_a_server
from .limits import render as render_limits

#: default headroom over the measured need
MARGIN = 0.25
#: an owner with this share of a service's hold time, its p95 hold past this many times the hold
#: threshold, is the cause (a slow write near the threshold is the work itself, not a holder)
DOMINANT_SHARE = 0.5
DOMINANT_HOLD_FACTOR = 2.0
Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, tuple(sorted((k, v) for k, v in labels.items() if k not in ("instance", "job", "__telemetry_host")))


@dataclass
class Window:
    """What a window measured: its length, each gauge's mean / p99 / peak per series, and the
    increase of each counter and histogram series."""

    seconds: float
    gauges: dict[Key, dict[str, float]] = field(default_factory=dict)
    increase: Samples = field(default_factory=list)

    def gauge(self, name: str, stat: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(lb), st[stat]) for (n, lb), st in self.gauges.items()
                if n == name and all(dict(lb).get(k) == v for k, v in labels.items())]  # fmt: skip

    def total(self, name: str, **labels: str) -> float:
        return sum(v for n, lb, v in self.increase if n == name and all(lb.get(k) == w for k, w in labels.items()))


GAUGES = ("db_pool_connections_in_use", "db_pool_connections_max", "db_pool_size", "db_pool_pending_requests",
          "db_pool_connections_held_too_long", "asyncio_semaphore_in_use", "asyncio_semaphore_waiters",
          "asyncio_semaphore_capacity", "db_server_connections_by_owner", "db_server_connection_limit",
          "pgbouncer_pool_size", "db_server_connections_max", "pgbouncer_max_client_connections")  # fmt: skip
COUNTERS = ("db_pool_checkouts_total", "db_pool_timeouts_total", "http_server_request_duration_seconds_count")
HISTOGRAMS = ("db_connection_hold_seconds", "asyncio_semaphore_wait_seconds")


def from_scrapes(scrapes: list[tuple[float, Samples]]) -> Window:
    """A window from successive scrapes ``(time, samples)`` of the same hosts: gauges over all
    of them, counters as last minus first (a series born in between counts from 0)."""
    if len(scrapes) < 2:
        raise ValueError("a window needs at least two scrapes")
    series: dict[Key, list[float]] = {}
    for _t, samples in scrapes:
        for n, lb, v in samples:
            if n in GAUGES:
                series.setdefault(_key(n, lb), []).append(v)
    gauges = {k: _stats(vs) for k, vs in series.items()}
    first = {_key(n, lb): v for n, lb, v in scrapes[0][1]}
    names = COUNTERS + tuple(f"{h}{p}" for h in HISTOGRAMS for p in ("_bucket", "_sum", "_count"))
    increase = [(n, dict(_key(n, lb)[1]), v - first.get(_key(n, lb), 0.0)) for n, lb, v in scrapes[-1][1] if n in names]
    return Window(scrapes[-1][0] - scrapes[0][0], gauges, increase)


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"avg": sum(values) / len(values), "p99": p99, "max": ordered[-1]}


def scrape_window(urls: list[str], seconds: float, every: float = 0.5,
                  read: Callable[[str], str] | None = None) -> Window:  # fmt: skip
    """Scrape ``urls`` every ``every`` seconds for ``seconds``: the window ``--metrics-url`` measures."""
    read = read or fetch_text
    scrapes: list[tuple[float, Samples]] = []
    deadline = time.monotonic() + seconds
    while True:
        now = time.monotonic()
        scrapes.append((now, [s for url in urls for s in parse(read(url))]))
        if now >= deadline:
            return from_scrapes(scrapes)
        time.sleep(min(every, max(0.0, deadline - now)))


def from_prometheus(url: str, window: str, seconds: float, timeout: float = 10.0) -> Window:
    """The same window from a Prometheus over the last ``window`` (``seconds`` long)."""
    base = url.rstrip("/") + "/api/v1/query?"

    def query(expr: str) -> list[tuple[dict[str, str], float]]:
        with urllib.request.urlopen(base + urllib.parse.urlencode({"query": expr}), timeout=timeout) as r:  # noqa: S310
            body = json.loads(r.read().decode())
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {expr!r}: {body.get('error')}")
        return [({k: v for k, v in row["metric"].items() if k != "__name__"}, float(row["value"][1]))
                for row in body["data"]["result"]]  # fmt: skip

    gauges: dict[Key, dict[str, float]] = {}
    for name in GAUGES:
        for stat, expr in (("avg", f"avg_over_time({name}[{window}])"), ("p99", f"quantile_over_time(0.99, {name}[{window}])"),
                           ("max", f"max_over_time({name}[{window}])")):  # fmt: skip
            for lb, v in query(expr):
                gauges.setdefault(_key(name, lb), {})[stat] = v
    increase: Samples = []
    names = COUNTERS + tuple(f"{h}{p}" for h in HISTOGRAMS for p in ("_bucket", "_sum", "_count"))
    for name in names:
        increase += [(name, dict(_key(name, lb)[1]), v) for lb, v in query(f"increase({name}[{window}])")]
    return Window(seconds, {k: v for k, v in gauges.items() if len(v) == 3}, increase)


# -- the arithmetic ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    owner: str
    seconds: float
    share: float
    p95: float | None


def holders(increase: Samples, service: str, pool: str | None = None) -> list[Holder]:
    """Who held ``service``'s connections, most hold time first: the share of all its hold time
    and each one's p95 hold."""
    sums: dict[str, float] = {}
    for n, lb, v in increase:
        if n == "db_connection_hold_seconds_sum" and lb.get("service") == service and (pool is None or lb.get("pool") == pool):
            sums[lb.get("owner", "")] = sums.get(lb.get("owner", ""), 0.0) + v
    total = sum(sums.values())
    extra = {"pool": pool} if pool is not None else {}
    return [Holder(owner, s, s / total if total else 0.0,
                   quantile(0.95, increase, "db_connection_hold_seconds", service=service, owner=owner, **extra))
            for owner, s in sorted(sums.items(), key=lambda kv: -kv[1]) if s > 0]  # fmt: skip


def dominant(hs: list[Holder], hold_threshold: float = T.HOLD_SECONDS_WARNING) -> Holder | None:
    """The owner whose holds are the cause (most of the hold time, p95 well past the threshold)."""
    top = hs[0] if hs else None
    if top and top.share >= DOMINANT_SHARE and (top.p95 or 0.0) > DOMINANT_HOLD_FACTOR * hold_threshold:
        return top
    return None


@dataclass(frozen=True)
class PoolAdvice:
    service: str
    pool: str
    processes: int
    checkouts_per_second: float
    hold_mean: float | None
    hold_p95: float | None
    busy_little: float  # λ W, all processes
    busy_measured: float  # mean in use, all processes
    busiest_mean: float
    busiest_p99: float
    busiest_peak: float
    saturated: bool
    now_pool_size: int | None
    now_max: int | None
    pool_size: int
    max_overflow: int
    release: Holder | None
    holders: tuple[Holder, ...]

    @property
    def grow(self) -> bool:
        """The advised pool is larger than the current one: size is (part of) the answer."""
        return self.now_max is None or self.pool_size + self.max_overflow > self.now_max

    @property
    def carries(self) -> bool:
        """The current configuration carries the measured load (and no owner must be released)."""
        if self.release is not None:
            return False
        return self.now_max is not None and self.now_max >= self.pool_size + self.max_overflow and not self.saturated


def advise_pool(w: Window, service: str, pool: str, margin: float = MARGIN,
                hold_threshold: float = T.HOLD_SECONDS_WARNING) -> PoolAdvice:  # fmt: skip
    in_use = w.gauge("db_pool_connections_in_use", "avg", service=service, pool=pool)
    pids = {lb.get("pid", "") for lb, _v in in_use}
    n = max(1, len(pids))
    checkouts = w.total("db_pool_checkouts_total", service=service, pool=pool)
    rate = checkouts / w.seconds if w.seconds > 0 else 0.0
    count = w.total("db_connection_hold_seconds_count", service=service, pool=pool)
    held = w.total("db_connection_hold_seconds_sum", service=service, pool=pool)
    mean = held / count if count else None
    busy_little = rate * (mean or 0.0)
    busy_measured = sum(v for _lb, v in in_use)
    busiest_mean = max((v for _lb, v in in_use), default=0.0)
    busiest_p99 = max((v for _lb, v in w.gauge("db_pool_connections_in_use", "p99", service=service, pool=pool)), default=0.0)
    busiest_peak = max((v for _lb, v in w.gauge("db_pool_connections_in_use", "max", service=service, pool=pool)), default=0.0)
    now_max_v = [v for _lb, v in w.gauge("db_pool_connections_max", "max", service=service, pool=pool)]
    now_size_v = [v for _lb, v in w.gauge("db_pool_size", "max", service=service, pool=pool)]
    now_max = int(max(now_max_v)) if now_max_v else None
    timeouts = w.total("db_pool_timeouts_total", service=service, pool=pool)
    # full: callers timed out, or the busiest process sat at its ceiling at least 1% of the time
    # (an instant at the ceiling, or a caller queued for a moment, is not a pool too small)
    saturated = bool(timeouts > 0 or (now_max is not None and busiest_p99 >= now_max))
    # the busiest process's share of the load: its mean over the mean of all (>= 1)
    skew = busiest_mean / (busy_measured / n) if busy_measured > 0 else 1.0
    steady = max(busiest_mean, busy_little / n * skew)
    burst = steady + 3 * math.sqrt(steady) if saturated else max(busiest_p99, steady)
    size = max(1, math.ceil(steady * (1 + margin)))
    total = max(size, math.ceil(burst * (1 + margin)))
    hs = holders(w.increase, service, pool)
    pressed = now_max is not None and busiest_peak >= T.POOL_USAGE_WARNING * now_max
    return PoolAdvice(service, pool, n, rate, mean, quantile(0.95, w.increase, "db_connection_hold_seconds", service=service, pool=pool),
                      busy_little, busy_measured, busiest_mean, busiest_p99, busiest_peak, saturated,
                      int(max(now_size_v)) if now_size_v else None, now_max, size, total - size,
                      # a holder is the cause only where the pool is under pressure
                      dominant(hs, hold_threshold) if saturated or pressed else None, tuple(hs[:3]))  # fmt: skip


@dataclass(frozen=True)
class SemaphoreAdvice:
    """A ``telemetry.Semaphore`` as measured (per process); ``capacity_needed`` is its share of the
    server limit per process (``limits``), never the queue behind it: a semaphore is a throttle."""

    service: str
    semaphore: str
    capacity: int
    waiters_peak: float
    in_use_peak: float
    acquisitions_per_second: float
    capacity_needed: int

    @property
    def is_the_cap(self) -> bool:
        """Tasks queued behind it: where a throttled service's excess waits, by design."""
        return self.waiters_peak > 0


def advise_semaphores(w: Window) -> list[SemaphoreAdvice]:
    out = []
    keys = {(lb.get("service", ""), lb.get("semaphore", "")) for lb, _v in w.gauge("asyncio_semaphore_capacity", "max")}
    for service, sem in sorted(keys):
        cap = max(v for _lb, v in w.gauge("asyncio_semaphore_capacity", "max", service=service, semaphore=sem))
        waiters = max((v for _lb, v in w.gauge("asyncio_semaphore_waiters", "max", service=service, semaphore=sem)), default=0.0)
        in_use = max((v for _lb, v in w.gauge("asyncio_semaphore_in_use", "max", service=service, semaphore=sem)), default=0.0)
        acq = w.total("asyncio_semaphore_wait_seconds_count", service=service, semaphore=sem)
        out.append(SemaphoreAdvice(service, sem, int(cap), waiters, in_use, acq / w.seconds if w.seconds else 0.0, int(cap)))
    return out


@dataclass(frozen=True)
class Advice:
    window_seconds: float
    margin: float
    pools: tuple[PoolAdvice, ...]
    semaphores: tuple[SemaphoreAdvice, ...]
    limits: Any  # limits.Limits: the server and client limits and each service's share

    @property
    def carries(self) -> bool:
        """Every pool carries its own measured load and today's configuration fits both limits
        (tasks queued behind a semaphore are its throttle working, not a failure)."""
        return all(p.carries for p in self.pools) and self.limits.today_fits


def advise(w: Window, margin: float = MARGIN, hold_threshold: float = T.HOLD_SECONDS_WARNING,
           server: tuple[int, str] | None = None, client: tuple[int, str] | None = None,
           shared: Callable[[str], bool] = on_a_server) -> Advice:  # fmt: skip
    """The advice for the window; ``server`` / ``client``: the limits when told (``--server-limit``,
    the demo's stand-in for the report's pooler), else read from the window; ``shared``: which
    pools meet them (by name; default: all but SQLite's)."""
    if not 0 <= margin <= 4:
        raise ValueError(f"--margin {margin!r}: expected a fraction in [0, 4], e.g. 0.25 for 25% headroom")
    import dataclasses

    keys = sorted({(lb.get("service", ""), lb.get("pool", "")) for lb, _v in w.gauge("db_pool_connections_max", "max")})
    pools = [advise_pool(w, s, p, margin, hold_threshold) for s, p in keys]
    sems = advise_semaphores(w)
    lim = allocate(w, pools, sems, margin, server, client, shared)
    advised = {sh.service: sh.semaphore_advised for sh in lim.shares if sh.semaphore_advised is not None}
    sems = [dataclasses.replace(s, capacity_needed=advised.get(s.service, s.capacity)) for s in sems]
    return Advice(w.seconds, margin, tuple(pools), tuple(sems), lim)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _short(pool: str) -> str:
    """A pool named by its URL (a SQLite file's path) by its last part."""
    return pool.rsplit("/", 1)[-1] if "/" in pool else pool


def render(a: Advice) -> list[str]:
    """The advice as the settings to change, one line per decision, then the figures behind it."""
    out = [f"measured over {a.window_seconds:.0f} s; margin {a.margin * 100:.0f}% over the measured need"]
    for p in a.pools:
        now = f"now {p.now_pool_size}+{(p.now_max or 0) - (p.now_pool_size or 0)}" if p.now_pool_size is not None else f"now max {p.now_max}"
        head = f"{p.service} (pool {_short(p.pool)}, {p.processes} process{'es' if p.processes != 1 else ''})"
        if p.release is not None:
            out.append(f"{head}: release it, do not grow the pool: {p.release.owner!r} holds {p.release.share * 100:.0f}% of the "
                       f"hold time, p95 {_s(p.release.p95)} (over {DOMINANT_HOLD_FACTOR:g} x the hold threshold); keep its session "
                       "only around its queries (a bigger pool would only be held too).")  # fmt: skip
        elif not p.carries and not p.grow:
            out.append(f"{head}: the pool ran full, but the measured load needs only {p.pool_size + p.max_overflow} "
                       f"({now}): size is not the answer; what stretches the holds is (a blocked event loop, "
                       "lock waits, a slow server: see telemetry diagnose)")  # fmt: skip
        else:
            verdict = "carries the load" if p.carries else "cannot carry the measured load"
            guard = next((sh for sh in a.limits.shares if (sh.service, sh.pool) == (p.service, p.pool)
                          and sh.semaphore_advised is not None), None)  # fmt: skip
            with_sem = (f"; with {guard.semaphore}={guard.semaphore_advised} it holds those permits: pool_size="
                        f"{guard.pool_size} max_overflow={guard.max_overflow}") if guard and (
                        guard.pool_size, guard.max_overflow) != (p.pool_size, p.max_overflow) else ""  # fmt: skip
            out.append(f"{head}: pool_size={p.pool_size} max_overflow={p.max_overflow} ({now}: {verdict}){with_sem}")
        who = ", ".join(f"{h.owner!r} {h.share * 100:.0f}% (p95 {_s(h.p95)})" for h in p.holders) or "-"
        out.append(f"  load: {p.checkouts_per_second:.1f} checkouts/s x hold {_s(p.hold_mean)} mean (p95 {_s(p.hold_p95)}) = "
                   f"{p.busy_little:.1f} connections busy (Little), measured mean {p.busy_measured:.1f}; busiest process mean "
                   f"{p.busiest_mean:.1f}, p99 {p.busiest_p99:.0f}, peak {p.busiest_peak:.0f}"
                   + (" (the pool was full: demand is above what it shows)" if p.saturated else "") + f"; held by {who}")  # fmt: skip
    tops = {p.service: (p.holders[0].owner, p.holders[0].share) for p in a.pools if p.holders}
    out.extend(render_limits(a.limits, tops))
    out.append("verdict: " + ("the current configuration carries the measured load" if a.carries else
                              "the current configuration cannot carry the measured load: change the settings above"))  # fmt: skip
    return out


def as_dict(a: Advice) -> dict[str, Any]:
    import dataclasses

    lim = a.limits
    return {**dataclasses.asdict(a), "carries": a.carries,
            "limits_verdict": {"binds": lim.binds, "fits": lim.fits, "today_fits": lim.today_fits}}  # fmt: skip
