"""``telemetry diagnose``: read one or more hosts' ``/metrics`` (or a Prometheus over a time
window) and say where the time goes and
who causes it: the pools (per process), the transaction pooler and the server (shared), each
named by service and owner (route template, task, ``db_owner``).

Works on any host's ``/metrics`` (a uvicorn worker's, the Celery parent's, ``telemetry
serve-metrics``). The shared-view figures are host-wide and every host's poller reports the same
server, so they are merged with max across hosts; owners named ``unknown`` on one host and named
on another (the blocker's host) are taken from the host that knows them.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from telemetry import thresholds as T
from telemetry._core.catalogue import CATALOGUE
from telemetry._core.urls import shown
from telemetry.tools.findings import HOST_LABEL, Finding, host_of
from telemetry.tools.findings import fmt_owners as _fmt_owners
from telemetry.tools.findings import merged as _merged
from telemetry.tools.findings import owners as _owners
from telemetry.tools.findings import rows as _rows
from telemetry.tools.samples import Samples, fetch_text, parse, quantile, usage_by_service

from . import episode
from .capacity import DOMINANT_HOLD_FACTOR, dominant, holders
from .first_statement import first_statements
from .leaks import leaks
from .open_transactions import open_transactions

#: what the findings read, by kind: gauges at their peak over the window (``*_view_up`` at
#: their lowest), counters and histogram series as their increase over it
USED_GAUGES = (
    "pgbouncer_clients", "pgbouncer_client_maxwait_seconds", "pgbouncer_servers_by_application",
    "pgbouncer_pool_size", "db_server_connections_by_owner", "db_server_lock_blocking",
    "db_server_lock_wait_longest_seconds", "db_server_oldest_idle_in_transaction_seconds",
    "db_server_connections_max", "db_server_connections", "db_pool_connections_in_use",
    "db_pool_connections_max", "redis_pool_connections_in_use", "redis_pool_connections_max",
    "celery_queue_length", "celery_queue_oldest_message_seconds", "celery_worker_busy",
    "celery_worker_reserved", "celery_worker_pool_size", "asyncio_semaphore_waiters",
    "asyncio_semaphore_capacity", "db_pool_connections_held_too_long", "db_server_lock_waiting",
    "db_pool_connections_in_use_by_owner", "db_server_connection_limit", "db_pool_pending_requests",
    "asyncio_thread_limiter_tokens", "asyncio_thread_limiter_borrowed", "db_server_statements_active",
    "db_server_statement_running_seconds",
)  # fmt: skip
USED_LOWEST = ("db_server_view_up", "pgbouncer_view_up")
USED_COUNTERS = ("event_loop_blocked_total", "redis_pool_checkouts_total", "db_pool_connects_refused_total",
                 "db_pool_connections_leaked_total", "db_pool_connections_gc_returned_total",
                 "db_transaction_idle_calls_total")
USED_HISTOGRAMS = ("db_pool_checkout_wait_seconds", "redis_connection_hold_seconds", "asyncio_semaphore_wait_seconds",
                   "db_server_wait_seconds", "db_connection_hold_seconds", "db_transaction_end_seconds",
                   "db_transaction_idle_seconds",
                   "http_server_db_server_wait_seconds", "http_server_request_duration_seconds")
_WINDOW = re.compile(r"^[1-9][0-9]*[smhd]$")


def from_prometheus(url: str, window: str, timeout: float = 10.0) -> Samples:
    """The samples the findings need, from a Prometheus HTTP API over the last ``window``
    (``15m``): gauges at their peak (views at their lowest), counters and histograms as their
    increase, so every finding describes that window."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--prometheus-url {url!r}: expected an http:// or https:// URL")
    if not _WINDOW.match(window):
        raise ValueError(f"--window {window!r}: expected a Prometheus duration such as 30s, 15m, 1h")
    queries = [(name, f"max_over_time({name}[{window}])") for name in USED_GAUGES]
    queries += [(name, f"min_over_time({name}[{window}])") for name in USED_LOWEST]
    queries += [(name, f"increase({name}[{window}])") for name in USED_COUNTERS]
    for name in USED_HISTOGRAMS:
        queries += [(f"{name}{part}", f"increase({name}{part}[{window}])") for part in ("_bucket", "_sum", "_count")]
    out: Samples = []
    base = url.rstrip("/") + "/api/v1/query?"
    for name, expr in queries:
        with urllib.request.urlopen(base + urllib.parse.urlencode({"query": expr}), timeout=timeout) as r:  # noqa: S310
            body = json.loads(r.read().decode())
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {expr!r}: {body.get('error')}")
        for row in body["data"]["result"]:
            labels = {k: v for k, v in row["metric"].items() if k != "__name__"}
            out.append((name, labels, float(row["value"][1])))
    return out


#: exit codes of ``telemetry diagnose`` (docs/runbooks/README.md): nothing found, findings, and
#: the source could not be read or holds no telemetry metrics
EXIT_HEALTHY, EXIT_FINDINGS, EXIT_UNREADABLE = 0, 1, 2


def fetch(url: str, timeout: float = 10.0) -> Samples:
    samples = parse(fetch_text(url, timeout))
    return [(name, {**labels, HOST_LABEL: url}, value) for name, labels, value in samples]


def ours(samples: Samples) -> bool:
    """Whether any sample is one of the package's metrics (a 200 answer can be empty, or another
    exporter's page)."""
    names = {spec.name for spec in CATALOGUE.values()}
    for name, _lb, _v in samples:
        base = name
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            base = base.removesuffix(suffix)
        if name in names or base in names:
            return True
    return False


def all_findings(samples: Samples, *, pools: bool = True) -> list[Finding]:
    """Every finding, the one that explains most of the waiting first (``rank``); ``pools=False``:
    those a pool-only report lacks."""
    out: list[Finding] = []
    for kind, part, beyond in PARTS:
        if beyond or pools:
            out.extend(f if isinstance(f, Finding) else Finding(kind, f) for f in part(samples))
    return rank(out, samples)


def rank(found: list[Finding], samples: Samples) -> list[Finding]:
    """The findings by the seconds of waiting each explains in the window, most first; ties keep
    the order of ``PARTS`` (a cause before the pool it fills). Refused connects come first: they
    are failures, not waits. What each explains: its service's checkout wait for the causes inside
    a pool (a leak, an open transaction, the pool's holders, the thread limiter); its first
    statements' time for a queue at the pooler or slow statements; the pooler's clients times
    their oldest wait; the lock waiters times the longest wait; the semaphore's waits."""

    def by_service(name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lb, v in _rows(samples, name):
            out[lb.get("service", "")] = out.get(lb.get("service", ""), 0.0) + v
        return out

    checkout, first = by_service("db_pool_checkout_wait_seconds_sum"), by_service("db_server_wait_seconds_sum")
    waiting = sum(v for (_d, _u, state), v in _merged(samples, "pgbouncer_clients", ("database", "user", "state")).items()
                  if state == "waiting")  # fmt: skip
    oldest = max(_merged(samples, "pgbouncer_client_maxwait_seconds", ("database", "user")).values(), default=0.0)
    blocked = sum(_merged(samples, "db_server_lock_waiting", ("application",)).values())
    longest = max((v for _lb, v in _rows(samples, "db_server_lock_wait_longest_seconds")), default=0.0)
    weights = {
        "budget": float("inf"), "pooler": waiting * oldest, "locks": blocked * longest,
        "semaphore": sum(by_service("asyncio_semaphore_wait_seconds_sum").values()),
    }  # fmt: skip

    def weight(f: Finding) -> float:
        if f.kind in ("leak", "open_transaction", "pool", "threads"):
            return checkout.get(f.service, 0.0)
        if f.kind in ("server_wait", "slow_statement", "first_statement_unknown"):
            return first.get(f.service, 0.0)
        return weights.get(f.kind, 0.0)

    return sorted(found, key=lambda f: -weight(f))


def findings(samples: Samples) -> list[str]:
    """Plain sentences, most urgent first; empty when nothing is wrong."""
    return [f.text for f in all_findings(samples)]


def _semaphores(samples: Samples) -> list[str]:
    """A telemetry.Semaphore with tasks queued in front of it (MAX_DB_CONCURRENT)."""
    waiters: dict[tuple[str, str], float] = {}
    capacity: dict[tuple[str, str], float] = {}
    for lb, v in _rows(samples, "asyncio_semaphore_waiters"):
        key = (lb.get("service", ""), lb.get("semaphore", ""))
        waiters[key] = max(waiters.get(key, 0), v)
    for lb, v in _rows(samples, "asyncio_semaphore_capacity"):
        key = (lb.get("service", ""), lb.get("semaphore", ""))
        capacity[key] = max(capacity.get(key, 0), v)
    out = []
    for (service, name), n in sorted(waiters.items()):
        if n <= 0:
            continue
        p95 = quantile(0.95, samples, "asyncio_semaphore_wait_seconds", service=service, semaphore=name)
        out.append(f"Semaphore: up to {n:.0f} tasks of {service} queued for {name} (capacity "
                   f"{capacity.get((service, name), 0):.0f}, wait p95 {p95 or 0:.2f} s): throughput is "
                   "capped there, not at the pool (SemaphoreConvoy).")  # fmt: skip
    return out


def _redis(samples: Samples) -> list[Finding]:
    """The busiest process of each Redis pool, and who holds its connections."""
    in_use = {(lb["service"], lb["pool"], lb["pid"]): v for lb, v in _rows(samples, "redis_pool_connections_in_use")}
    out = []
    busiest: dict[tuple[str, str], float] = {}
    for lb, limit in _rows(samples, "redis_pool_connections_max"):
        proc = (lb["service"], lb["pool"], lb["pid"])
        if limit > 0 and proc in in_use:
            busiest[proc[:2]] = max(busiest.get(proc[:2], 0.0), in_use[proc] / limit)
    failures: dict[tuple[str, str], float] = {}
    for lb, v in _rows(samples, "redis_pool_checkouts_total"):
        if lb.get("result") in ("timeout", "too_many") and v > 0:
            failures[(lb["service"], lb["pool"])] = failures.get((lb["service"], lb["pool"]), 0) + v
    for key in sorted(set(busiest) | set(failures)):
        usage = busiest.get(key, 0.0)
        if usage < T.POOL_USAGE_WARNING and not failures.get(key):
            continue
        service, pool = key
        holds: dict[str, float] = {}
        for lb, v in _rows(samples, "redis_connection_hold_seconds_sum"):
            if lb.get("service") == service and lb.get("pool") == pool:
                holds[lb.get("owner", "")] = holds.get(lb.get("owner", ""), 0) + v
        holder = max(holds, key=lambda k: holds[k]) if holds else ""
        share = holds[holder] / sum(holds.values()) * 100 if holds and sum(holds.values()) else 0
        out.append(Finding("redis", f"Redis: pool {pool} of {service} at {usage * 100:.0f}% in its busiest process, "
                           f"{failures.get(key, 0):.0f} checkouts failed (timeout or too many)"
                           + (f"; {holder!r} holds {share:.0f}% of its connection time" if holder else "") + ".",
                           service, severe=bool(failures.get(key))))  # fmt: skip
    return out


def _celery(samples: Samples) -> list[str]:
    out = []
    lengths = _merged(samples, "celery_queue_length", ("broker", "queue"))
    ages = _merged(samples, "celery_queue_oldest_message_seconds", ("broker", "queue"))
    busy: dict[tuple[str, str], float] = {}
    size: dict[tuple[str, str], float] = {}
    reserved: dict[tuple[str, str], float] = {}
    for lb, v in _rows(samples, "celery_worker_busy"):
        busy[(lb["service"], lb["worker"])] = busy.get((lb["service"], lb["worker"]), 0) + v
    for lb, v in _rows(samples, "celery_worker_reserved"):
        reserved[(lb["service"], lb["worker"])] = reserved.get((lb["service"], lb["worker"]), 0) + v
    for lb, v in _rows(samples, "celery_worker_pool_size"):
        size[(lb["service"], lb["worker"])] = max(size.get((lb["service"], lb["worker"]), 0), v)
    for key, slots in sorted(size.items()):
        if slots and busy.get(key, 0) >= slots:
            out.append(f"Celery: every slot of {key[1]} ({key[0]}) is busy ({busy[key]:.0f} of {slots:.0f}), "
                       f"{reserved.get(key, 0):.0f} tasks reserved behind them (CeleryWorkerSlotsSaturated).")  # fmt: skip
    for (broker, queue), n in sorted(lengths.items(), key=lambda kv: -kv[1]):
        if n > 0 and (n >= T.CELERY_BACKLOG_WARNING or ages.get((broker, queue), 0) >= 60):
            out.append(f"Celery: {n:.0f} messages wait in queue {queue} ({broker}), the oldest "
                       f"{ages.get((broker, queue), 0):.0f} s.")  # fmt: skip
    return out


def beyond_the_pools(samples: Samples) -> list[Finding]:
    """The findings a pool-only report lacks: pooler, locks, idle transactions, the server,
    Redis pools and Celery capacity (the demo's report adds them to its own diagnosis)."""
    return all_findings(samples, pools=False)


def _pooler(samples: Samples) -> list[str]:
    out = []
    clients = _merged(samples, "pgbouncer_clients", ("database", "user", "state"))
    maxwait = _merged(samples, "pgbouncer_client_maxwait_seconds", ("database", "user"))
    holders = _merged(samples, "pgbouncer_servers_by_application", ("database", "application"))
    size = _merged(samples, "pgbouncer_pool_size", ("database",))
    for (database, user, state), waiting in sorted(clients.items()):
        if state != "waiting" or waiting <= 0:
            continue
        held = {app: n for (db, app), n in holders.items() if db == database and n > 0}
        who = ", ".join(f"{app} ({n:.0f})" for app, n in sorted(held.items(), key=lambda kv: -kv[1]))
        sentence = (f"pgbouncer: {waiting:.0f} clients of {database}/{user} queue for a server connection "
                    f"(oldest {maxwait.get((database, user), 0):.1f} s); the pool's "
                    f"{size.get((database,), 0):.0f} server connections are held by {who or 'nobody known'}.")  # fmt: skip
        owners = _owners(samples)
        if owners:
            sentence += f" Holding owners: {_fmt_owners(owners)}."
        sentence += (" Time spent there is not pool wait: it shows as connect time (db_pool_connect_seconds) "
                     "for new connections and as statement time, never as db_pool_checkout_wait_seconds; "
                     "shorten those transactions (PgbouncerClientsWaiting).")
        out.append(sentence)
    return out


def _locks(samples: Samples) -> list[str]:
    pairs = _merged(samples, "db_server_lock_blocking",
                    ("blocker_service", "blocker_owner", "blocked_service", "blocked_owner"))  # fmt: skip
    if not pairs:
        return []
    # the blocker's own host names its owner; other hosts say "unknown" for the same pair
    named = {(bs, bo) for (bs, bo, _ws, _wo) in pairs if bo != "unknown"}
    longest = max((v for _lb, v in _rows(samples, "db_server_lock_wait_longest_seconds")), default=0.0)
    by_blocker: dict[tuple[str, str], list[str]] = {}
    for (bs, bo, ws, wo), n in sorted(pairs.items(), key=lambda kv: -kv[1]):
        if bo == "unknown" and any(s == bs for s, _o in named):
            continue
        by_blocker.setdefault((bs, bo), []).append(f"{ws} {wo!r} ({n:.0f})")
    out = []
    for (bs, bo), victims in by_blocker.items():
        out.append(f"Locks: {bs} {bo!r} holds a lock that blocks {', '.join(victims)}; longest wait "
                   f"{longest:.1f} s. Blocked transactions keep their connections: they look like long "
                   "holders in the pool view. db_lock_wait has the statements (DbLockWaitLong).")  # fmt: skip
    return out


def _idle(samples: Samples) -> list[str]:
    ages = _merged(samples, "db_server_oldest_idle_in_transaction_seconds", ("application",))
    owners = _owners(samples, "idle in transaction")
    out = []
    for (app,), age in sorted(ages.items(), key=lambda kv: -kv[1]):
        if age < T.IDLE_IN_TRANSACTION_EVENT_SECONDS:
            continue
        mine = {k: v for k, v in owners.items() if k[0] == app}
        who = f" ({_fmt_owners(mine)})" if mine else ""
        out.append(f"Idle in transaction: a backend of {app}{who} has sat idle inside a transaction for "
                   f"{age:.1f} s, holding its server connection and locks (DbIdleInTransactionLong).")  # fmt: skip
    return out


def _threads(samples: Samples) -> list[Finding]:
    """Sync routes admitted by anyio's thread limiter beyond the pools their threads queue on: in
    a process whose pools ran full with checkouts queued, more threads were busy than those pools
    hold connections, so the rest queued for one inside the pool, each holding its thread."""
    def per(name: str, pool: bool) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for lb, v in _rows(samples, name):
            key = (lb.get("service", ""), host_of(lb), lb.get("pid", "")) + ((lb.get("pool", ""),) if pool else ())
            out[key] = out.get(key, 0.0) + v
        return out

    tokens, borrowed = per("asyncio_thread_limiter_tokens", False), per("asyncio_thread_limiter_borrowed", False)
    top, used, queued = (per(n, True) for n in ("db_pool_connections_max", "db_pool_connections_in_use",
                                                "db_pool_pending_requests"))  # fmt: skip
    full: dict[tuple[str, ...], float] = {}  # process -> connections of its pools that ran full with a queue
    for key, most in top.items():
        if most and used.get(key, 0.0) >= most and queued.get(key, 0.0) > 0:
            full[key[:3]] = full.get(key[:3], 0.0) + most
    worst: dict[str, tuple[float, float, float, float]] = {}
    for key, busy in borrowed.items():
        pool = full.get(key, 0.0)
        if pool and busy > pool:
            over = (busy - pool, busy, tokens.get(key, 0.0), pool)
            worst[key[0]] = max(worst.get(key[0], over), over)
    return [Finding("threads", f"Thread pool: in the busiest {service} process, {busy:.0f} threads of anyio's limiter "
                    f"({limit:.0f} per process) ran sync code at once against a pool of {pool:.0f} connections that "
                    f"ran full with checkouts queued: up to {over:.0f} threads waited for a connection, each holding "
                    f"its thread. Make the limiter fit the pool (anyio.to_thread.current_default_thread_limiter()"
                    f".total_tokens = {pool:.0f}) or the database routes async; a bigger pool only moves the queue "
                    "to the server.", service)
            for service, (over, busy, limit, pool) in sorted(worst.items())]  # fmt: skip


def _budget(samples: Samples) -> list[Finding]:
    """Connects refused for the server's (or pooler's) connection limit: the services' worst case
    (each process's pool_size + max_overflow, summed) against the limit, in one sentence. No route
    is blamed: the pools' sizes are."""
    refused: dict[str, float] = {}
    for lb, v in _rows(samples, "db_pool_connects_refused_total"):
        if v > 0:
            refused[lb.get("reason", "")] = refused.get(lb.get("reason", ""), 0.0) + v
    if not refused:
        return []
    worst: dict[str, float] = {}
    processes: dict[str, set[tuple[str, str]]] = {}
    for lb, v in _rows(samples, "db_pool_connections_max"):
        service = lb.get("service", "")
        worst[service] = worst.get(service, 0.0) + v
        processes.setdefault(service, set()).add((host_of(lb), lb.get("pid", "")))
    total = sum(worst.values())
    each = ", ".join(f"{svc} {len(processes[svc])} process{'es' if len(processes[svc]) > 1 else ''}: {n:.0f}"
                     for svc, n in sorted(worst.items(), key=lambda kv: -kv[1]))  # fmt: skip
    why = ", ".join(f"{n:.0f} {reason}" for reason, n in sorted(refused.items(), key=lambda kv: -kv[1]))
    text = (f"Connection budget: {sum(refused.values()):.0f} connects were refused for a connection limit ({why}). "
            f"The pools seen can open {total:.0f} connections at most ({each})")  # fmt: skip
    usable = max((v for _lb, v in _rows(samples, "db_server_connections_max")), default=0.0)
    configured = max((v for _lb, v in _rows(samples, "db_server_connection_limit")), default=0.0)
    limit, source = (usable, "max_connections minus the reserved") if usable else (configured, "TELEMETRY_DB_CONNECTION_LIMIT")
    if not limit:
        text += ("; the limit is not known here (TELEMETRY_SERVER_VIEW_URL or TELEMETRY_DB_CONNECTION_LIMIT would "
                 "tell). Make the sum fit the limit (telemetry budget sizes the pools).")  # fmt: skip
    elif total > limit:
        text += (f", more than the {limit:.0f} the server accepts ({source}). Lower pool_size + max_overflow so that "
                 "the sum fits (telemetry budget sizes them), or put a transaction pooler in front; no route is to "
                 "blame, and a bigger pool makes it worse (DbConnectionBudgetExceeded).")  # fmt: skip
    else:
        text += (f", within the {limit:.0f} the server accepts ({source}): other clients hold the rest of the "
                 "server's connections (db_server_connections by application).")  # fmt: skip
    return [Finding("budget", text)]


def _server(samples: Samples) -> list[str]:
    usable = max((v for _lb, v in _rows(samples, "db_server_connections_max")), default=0.0)
    if not usable:
        return []
    used = sum(_merged(samples, "db_server_connections", ("application", "state")).values())
    if used / usable <= T.SERVER_CONNECTIONS_RATIO_WARNING:
        return []
    return [f"Server: {used:.0f} of {usable:.0f} usable connections are open ({used / usable * 100:.0f}%): "
            "the next pool growth gets refused (DbServerConnectionsNearMax)."]  # fmt: skip


def _pools(samples: Samples) -> list[Finding]:
    out = []
    starved = {f.service for f in first_statements(samples) if f.kind == "server_wait"}
    for service, usage in sorted(usage_by_service(samples).items()):
        if usage >= T.POOL_USAGE_WARNING and service not in starved:
            p95 = quantile(0.95, samples, "db_pool_checkout_wait_seconds", service=service)
            out.append(Finding("pool", f"Pool: the busiest {service} process has {usage * 100:.0f}% of its pool checked "
                               f"out (checkout wait p95 {p95 or 0:.2f} s).{_holders(samples, service)}", service))  # fmt: skip
    blocked = {lb.get("service", ""): v for lb, v in _rows(samples, "event_loop_blocked_total") if v > 0}
    for service, n in sorted(blocked.items()):
        out.append(Finding("pool", f"Event loop: {service} was blocked {n:.0f} times (sync work inside async def).", service))
    return out


def _holders(samples: Samples, service: str) -> str:
    """Who holds ``service``'s connections now (checked out at the peak, by owner: a holder that
    never lets go shows here before any hold of it ends), who held them (the top owners by hold
    time, their p95 hold, the connections held past the threshold at the peak), and "release it"
    when one owner is the cause."""
    now: dict[str, float] = {}
    for lb, v in _rows(samples, "db_pool_connections_in_use_by_owner"):
        if lb.get("service") == service and v > 0:
            now[lb.get("owner", "")] = now.get(lb.get("owner", ""), 0.0) + v
    hs = holders(samples, service)
    if not hs and not now:
        return ""
    text = (" Held now by " + ", ".join(f"{o!r} ({n:.0f})" for o, n in sorted(now.items(), key=lambda kv: -kv[1])[:5])
            + ".") if now else ""  # fmt: skip
    long_held = sum(v for lb, v in _rows(samples, "db_pool_connections_held_too_long") if lb.get("service") == service)
    if hs:
        who = ", ".join(f"{h.owner!r} {h.share * 100:.0f}% (p95 {h.p95 or 0:.2f} s)" for h in hs[:3])
        text += f" Held by {who} of the hold time"
    text += (f"{';' if hs else ''} {long_held:.0f} connections held past the hold threshold at the peak" if long_held
             else "") + ("." if hs or long_held else "")  # fmt: skip
    top = dominant(hs)
    if top is not None:
        text += (f" {top.owner!r} holds most of the time, p95 over {DOMINANT_HOLD_FACTOR * T.HOLD_SECONDS_WARNING:g} s: release it "
                 "(keep the session only around its queries); a bigger pool would be held too.")  # fmt: skip
    return text


def _views(samples: Samples) -> list[str]:
    out = []
    for target, label in (("db_server", "server"), ("pgbouncer", "pgbouncer")):
        ups = [v for _lb, v in _rows(samples, f"{target}_view_up")]
        if ups and min(ups) == 0:
            out.append(f"The {label} view is failing: its figures are stale ({target}_view_errors_total).")
    return out


#: the findings in order of urgency: (kind, its function, whether a pool-only report lacks it)
PARTS: tuple[tuple[str, Callable[[Samples], list[Any]], bool], ...] = (
    ("budget", _budget, True), ("leak", leaks, True), ("pooler", _pooler, True), ("locks", _locks, True), ("idle", _idle, True), ("server", _server, True),
    ("first_statement", first_statements, True), ("open_transaction", open_transactions, True), ("threads", _threads, True), ("pool", _pools, False), ("semaphore", _semaphores, True),
    ("redis", _redis, True), ("celery", _celery, True), ("view", _views, True),
)  # fmt: skip


def render(urls: list[str], per_url: list[Samples], how: str = "", unreadable: dict[str, str] | None = None) -> str:
    merged: Samples = [s for samples in per_url for s in samples]
    lines = [f"read {len(merged)} samples from {', '.join(urls)}" + (f" {how}" if how else "")]
    lines.extend(f"- unreadable: {why}; the other hosts are diagnosed without it" for why in (unreadable or {}).values())
    found = findings(merged)
    lines.extend(f"- {f}" for f in found)
    if not found:
        lines.append("- nothing saturated: pools, pooler, locks and server all within their thresholds")
    return "\n".join(lines)


class Unreadable(ValueError):
    """The source answered, but not with what the findings need."""


def seconds_of(window: str) -> float:
    """A Prometheus duration (``30s``, ``15m``) in seconds; ValueError naming ``--window`` otherwise."""
    if not _WINDOW.match(window):
        raise ValueError(f"--window {window!r}: expected a Prometheus duration such as 30s, 15m, 1h")
    return float(window[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[window[-1]]


def _telemetry_page(url: str) -> Samples:
    samples = fetch(url)
    if not ours(samples):
        raise Unreadable(f"no telemetry metrics found at {url}: is it the /metrics of a process that called "
                         "telemetry.instrument() (or telemetry serve-metrics)?")  # fmt: skip
    return samples


def run(urls: list[str], prometheus: str | None = None, window: str | None = None) -> tuple[str, list[str], int]:
    """From hosts' ``/metrics`` scraped over ``window`` (default 10s: increases and peaks, see
    ``episode``) or a Prometheus over the last ``window`` (default 15m). Returns the text, the
    findings and how many hosts could not be read. Raises ``Unreadable`` (a sentence) when no host
    is readable, no telemetry metric is there or a sample lacks a label."""
    how, unreadable = "", {}
    if prometheus:
        window = window or "15m"
        per_url: list[Any] = [from_prometheus(prometheus, window)]
        sources = [f"{prometheus} (last {window})"]
        if not ours(per_url[0]):
            raise Unreadable(f"no telemetry metrics found in {sources[0]}: does it scrape the hosts' /metrics?")
    else:
        got = episode.read(urls, seconds_of(window or "10s"), _telemetry_page)
        unreadable = got.unreadable
        if len(unreadable) == len(urls):
            raise Unreadable("; ".join(unreadable.values()))
        per_url, sources, how = [got.samples], [shown(u) for u in urls if u not in unreadable], got.describe()
    merged = [s for samples in per_url for s in samples]
    try:
        return render(sources, per_url, how, unreadable), findings(merged), len(unreadable)
    except KeyError as exc:
        raise Unreadable(f"a sample lacks the label {exc.args[0]!r} that the package's metrics carry: "
                         f"is {', '.join(sources)} a telemetry /metrics of this version?") from None
