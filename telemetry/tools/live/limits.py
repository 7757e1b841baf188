"""The two shared limits a deployment's pools meet, and the split of the one the demand exceeds.

* **Client connections**: what the transaction pooler accepts (pgbouncer's ``max_client_conn``,
  Supavisor's client limit), or the server's usable ``max_connections`` when no pooler stands in
  front. Every process's ``pool_size + max_overflow``, summed, must fit it.
* **Server connections**: the transaction pooler's pool size, or the usable ``max_connections``.
  The concurrent transactions must fit it: Little's law at the server (``λ W`` of each service's
  holds) at the advised concurrency, not today's.

The server limit is split: a margin kept free; the services that serve requests first (their
demand and its bursts, ``D + 3 √D``); the workers without a throttle next (their demand); the rest
to the workers that have a ``telemetry.Semaphore`` in front of their database work, in
proportion to their measured demand. A semaphore is a throttle: it is sized from its service's
share per process, never from the queue behind it, and that queue is where the excess waits (not
in the pool, whose timeout fails it, nor at the pooler, where it starves the API). Each pool is
sized from its own demand; the pool a semaphore guards holds at least its permits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the advice's records: capacity imports this module
    from .capacity import PoolAdvice, SemaphoreAdvice, Window


@dataclass(frozen=True)
class Limit:
    value: int | None
    source: str


@dataclass(frozen=True)
class Share:
    """One service's part of the server limit."""

    service: str
    processes: int
    serves_requests: bool
    demand: float  # concurrent transactions at the server, measured: λ W over its pools
    share: int  # server connections allotted
    semaphore: str | None  # the throttle in front of its database work
    semaphore_now: int | None
    semaphore_advised: int | None  # per process
    fewer_processes: int | None  # the processes its share carries at one permit each, when fewer than now
    pool: str  # the pool the numbers below are for (the service's busiest)
    pool_size: int
    max_overflow: int


@dataclass(frozen=True)
class Limits:
    server: Limit
    client: Limit
    margin: float
    kept_free: int
    shares: tuple[Share, ...]
    other_pools: tuple[tuple[str, str, int, int, int], ...]  # (service, pool, processes, size, overflow)
    client_worst: int  # processes x (pool_size + max_overflow), every pool advised
    server_at_advice: float  # concurrent transactions at the advised concurrency, at most
    server_today: float  # the same at today's semaphores and pools
    client_today: int

    @property
    def binds(self) -> str:
        """Which limit the demand presses hardest, as its share used: "server", "client" or ""."""
        s = self.server_today / self.server.value if self.server.value else 0.0
        c = self.client_today / self.client.value if self.client.value else 0.0
        return "" if max(s, c) == 0 else "server" if s >= c else "client"

    @property
    def fits(self) -> bool:
        server = self.server.value is None or self.server_at_advice <= self.server.value
        client = self.client.value is None or self.client_worst <= self.client.value
        return server and client

    @property
    def today_fits(self) -> bool:
        server = self.server.value is None or self.server_today <= self.server.value
        client = self.client.value is None or self.client_today <= self.client.value
        return server and client


def limits_of(w: Window, server: tuple[int, str] | None = None, client: tuple[int, str] | None = None) -> tuple[Limit, Limit]:
    """The limits told (``--server-limit``, ``--client-limit``), else read: the pooler's pool size
    and client limit, ``TELEMETRY_DB_CONNECTION_LIMIT``, the server's usable connections."""
    if server is None:
        found = [("pgbouncer default_pool_size", v) for _lb, v in w.gauge("pgbouncer_pool_size", "max")]
        found += [("TELEMETRY_DB_CONNECTION_LIMIT", v) for _lb, v in w.gauge("db_server_connection_limit", "max")]
        found += [("server max_connections (usable)", v) for _lb, v in w.gauge("db_server_connections_max", "max")]
        server = (int(min(found, key=lambda kv: kv[1])[1]), min(found, key=lambda kv: kv[1])[0]) if found else None
    if client is None:
        pooler = [v for _lb, v in w.gauge("pgbouncer_max_client_connections", "max")]
        direct = [v for _lb, v in w.gauge("db_server_connections_max", "max")]
        client = ((int(max(pooler)), "pgbouncer max_client_conn") if pooler else
                  (int(max(direct)), "server max_connections (usable)") if direct and not w.gauge("pgbouncer_pool_size", "max")
                  else None)  # fmt: skip
    return (Limit(server[0], server[1]) if server else Limit(None, "unknown"),
            Limit(client[0], client[1]) if client else Limit(None, "unknown"))  # fmt: skip


def on_a_server(pool: str) -> bool:
    """Whether a pool's connections go to a database server (and so meet its limits): all but
    SQLite's (a file, no server, no pooler)."""
    return not pool.startswith("sqlite")


def allocate(w: Window, pools: list[PoolAdvice], semaphores: list[SemaphoreAdvice], margin: float,
             server: tuple[int, str] | None = None, client: tuple[int, str] | None = None,
             shared: Callable[[str], bool] = on_a_server) -> Limits:  # fmt: skip
    """Split the limits among ``pools`` whose connections meet them (``shared(pool name)``)."""
    srv, cli = limits_of(w, server, client)
    pools = [p for p in pools if shared(p.pool)]
    requests = {lb.get("service", "") for n, lb, v in w.increase if n == "http_server_request_duration_seconds_count" and v > 0}
    busiest: dict[str, PoolAdvice] = {}
    demand: dict[str, float] = {}
    for p in pools:
        demand[p.service] = demand.get(p.service, 0.0) + max(p.busy_little, p.busy_measured)
        if p.service not in busiest or p.checkouts_per_second > busiest[p.service].checkouts_per_second:
            busiest[p.service] = p
    throttle = {s.service: s for s in semaphores}
    kept = math.ceil(srv.value * margin / (1 + margin)) if srv.value else 0
    firm: dict[str, int] = {}
    for service, d in demand.items():
        if service in requests:
            firm[service] = max(1, math.ceil(d + 3 * math.sqrt(d)))
        elif service not in throttle:
            firm[service] = max(1, math.ceil(d))
    rest = (srv.value - kept - sum(firm.values())) if srv.value else None
    weights = {s: max(demand.get(s, 0.0), 0.1) for s in throttle if s in busiest}
    shares: list[Share] = []
    for service in sorted(busiest, key=lambda s: (s not in requests, s in throttle, s)):
        p, sem = busiest[service], throttle.get(service)
        n = p.processes
        if service in firm or sem is None:
            share = firm.get(service, 0)
            advised = fewer = None
            size, overflow = p.pool_size, p.max_overflow
        else:
            share = (max(0, math.floor(rest * weights[service] / sum(weights.values()))) if rest is not None
                     else sem.capacity * n)  # fmt: skip
            advised = max(1, share // n)
            fewer = max(1, share) if share < n else None
            # the permits, and what the service used beyond today's permits (work outside the semaphore)
            total = advised + max(0, p.pool_size + p.max_overflow - sem.capacity)
            size, overflow = min(p.pool_size, total), total - min(p.pool_size, total)
        shares.append(Share(service, n, service in requests, demand.get(service, 0.0), share, sem.semaphore if sem else None,
                            sem.capacity if sem else None, advised, fewer, p.pool, size, overflow))  # fmt: skip
    chosen = {(s.service, s.pool) for s in shares}
    others = tuple((p.service, p.pool, p.processes, p.pool_size, p.max_overflow) for p in pools
                   if (p.service, p.pool) not in chosen)  # fmt: skip
    worst = sum(s.processes * (s.pool_size + s.max_overflow) for s in shares) + sum(n * (a + b) for _s, _p, n, a, b in others)
    now_worst = sum(p.processes * (p.now_max or 0) for p in pools)
    at_advice = sum((s.fewer_processes or s.processes) * s.semaphore_advised if s.semaphore_advised
                    else firm.get(s.service, s.demand) for s in shares)  # fmt: skip
    today = sum(min(s.processes * s.semaphore_now, s.processes * (busiest[s.service].now_max or s.semaphore_now))
                if s.semaphore_now else max(s.demand, firm.get(s.service, 0)) for s in shares)  # fmt: skip
    return Limits(srv, cli, margin, kept, tuple(shares), others, worst, at_advice, today, now_worst)


def render(lim: Limits, holders: dict[str, tuple[str, float]]) -> list[str]:
    """The limits, each service's share and the sizes, where the excess queues and what would need
    less; ``holders``: per service, its top holder and that holder's share of the hold time."""
    s, c = lim.server, lim.client
    out = [f"limits: server connections {s.value if s.value is not None else 'unknown'} ({s.source}), client "
           f"connections {c.value if c.value is not None else 'unknown'} ({c.source})"
           + (f"; the {lim.binds} limit binds (today: {lim.server_today:.0f} concurrent transactions at most against "
              f"the server's, {lim.client_today} client connections)" if lim.binds else "")]  # fmt: skip
    if s.value is not None:
        out.append(f"  of the {s.value} server connections, {lim.kept_free} kept free (margin {lim.margin * 100:.0f}%), "
                   "the services that serve requests first, then the workers by measured demand")  # fmt: skip
    for sh in lim.shares:
        head = f"  {sh.service} ({sh.processes} process{'es' if sh.processes != 1 else ''}): {sh.demand:.1f} concurrent transactions measured"
        sizes = f"pool {sh.pool.rsplit('/', 1)[-1]}: pool_size={sh.pool_size} max_overflow={sh.max_overflow}"
        if sh.semaphore_advised is None:
            why = "first: it serves requests" if sh.serves_requests else "no throttle: its demand"
            out.append(f"{head}; needs {sh.share} server connections ({why}); {sizes}")
        else:
            out.append(f"{head}; share {sh.share}: {sh.semaphore}={sh.semaphore_advised} per process (now {sh.semaphore_now}); "
                       f"{sizes}. Its excess queues at {sh.semaphore}, by design: not in the pool (its timeout fails it), "
                       "not at the pooler (where it starves the requests)")  # fmt: skip
            if sh.fewer_processes is not None:
                many = f"{sh.fewer_processes} process{'es' if sh.fewer_processes != 1 else ''}"
                out.append(f"    its share carries {many} at one permit each: run {many}, not {sh.processes}")
        top = holders.get(sh.service)
        short = (sh.fewer_processes is not None or (sh.semaphore_advised is not None and sh.demand > sh.share)
                 or (not lim.fits and sh.demand >= 1))  # fmt: skip
        if top is not None and not sh.serves_requests and short:
            out.append(f"    to need less: shorten {top[0]!r}'s holds ({top[1] * 100:.0f}% of {sh.service}'s hold time: "
                       "release the session across slow calls, batch the saves) or run fewer processes")  # fmt: skip
    if c.value is not None:
        out.append(f"  client connections: every process at its advised maximum opens {lim.client_worst} of {c.value}: "
                   + ("fits" if lim.client_worst <= c.value else "too many: lower max_overflow or run fewer processes"))  # fmt: skip
    if s.value is not None:
        firm = sum(sh.share for sh in lim.shares if sh.semaphore_advised is None)
        over = (f"does not fit: the services that serve requests and the workers without a throttle already need "
                f"{firm} of the {s.value - lim.kept_free} left after the margin (a service's wait at the pooler "
                "lengthens its holds, and so its measured need): shorten their holds, or raise the limit")  # fmt: skip
        out.append(f"  server connections: at the advised concurrency at most {lim.server_at_advice:.0f} concurrent "
                   f"transactions of {s.value}: " + ("fits" if lim.server_at_advice <= s.value else over))  # fmt: skip
    return out
