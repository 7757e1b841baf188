"""``telemetry diagnose``: read one or more hosts' ``/metrics`` and say where the time goes and
who causes it: the pools (per process), the transaction pooler and the server (shared), each
named by service and owner (route template, task, ``db_owner``).

Works on any host's ``/metrics`` (a uvicorn worker's, the Celery parent's, ``telemetry
serve-metrics``). The shared-view figures are host-wide and every host's poller reports the same
server, so they are merged with max across hosts; owners named ``unknown`` on one host and named
on another (the blocker's host) are taken from the host that knows them.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from .. import thresholds as T
from .report import Samples, parse, quantile, usage_by_service


def fetch(url: str, timeout: float = 10.0) -> Samples:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--metrics-url {url!r}: expected an http:// or https:// URL")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - scheme checked
        return parse(response.read().decode())


def _rows(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(lb, v) for n, lb, v in samples if n == name]


def _merged(samples: Samples, name: str, keys: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Host-wide gauge, deduplicated across hosts (max)."""
    out: dict[tuple[str, ...], float] = {}
    for lb, v in _rows(samples, name):
        key = tuple(lb.get(k, "") for k in keys)
        out[key] = max(out.get(key, v), v)
    return out


def findings(samples: Samples) -> list[str]:
    """Plain sentences, most urgent first; empty when nothing is wrong."""
    out: list[str] = []
    out.extend(_pooler(samples))
    out.extend(_locks(samples))
    out.extend(_idle(samples))
    out.extend(_server(samples))
    out.extend(_pools(samples))
    out.extend(_redis(samples))
    out.extend(_celery(samples))
    out.extend(_views(samples))
    return out


def _redis(samples: Samples) -> list[str]:
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
        out.append(f"Redis: pool {pool} of {service} at {usage * 100:.0f}% in its busiest process, "
                   f"{failures.get(key, 0):.0f} checkouts failed (timeout or too many)"
                   + (f"; {holder!r} holds {share:.0f}% of its connection time" if holder else "") + ".")  # fmt: skip
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


def beyond_the_pools(samples: Samples) -> list[str]:
    """The findings a pool-only report lacks: pooler, locks, idle transactions, the server,
    Redis pools and Celery capacity (the demo's report adds them to its own diagnosis)."""
    out: list[str] = []
    for part in (_pooler, _locks, _idle, _server, _redis, _celery, _views):
        out.extend(part(samples))
    return out


def _owners(samples: Samples, state: str | None = None) -> dict[tuple[str, str], float]:
    by_owner = _merged(samples, "db_server_connections_by_owner", ("service", "owner", "state"))
    out: dict[tuple[str, str], float] = {}
    for (service, owner, st), n in by_owner.items():
        if state is None or st == state:
            out[(service, owner)] = out.get((service, owner), 0) + n
    return out


def _fmt_owners(owners: dict[tuple[str, str], float], limit: int = 5) -> str:
    top = sorted(owners.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{service} {owner!r} ({n:.0f})" for (service, owner), n in top)


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
        sentence += " Time spent there is not pool wait: shorten those transactions (PgbouncerClientsWaiting)."
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


def _server(samples: Samples) -> list[str]:
    usable = max((v for _lb, v in _rows(samples, "db_server_connections_max")), default=0.0)
    if not usable:
        return []
    used = sum(_merged(samples, "db_server_connections", ("application", "state")).values())
    if used / usable <= T.SERVER_CONNECTIONS_RATIO_WARNING:
        return []
    return [f"Server: {used:.0f} of {usable:.0f} usable connections are open ({used / usable * 100:.0f}%): "
            "the next pool growth gets refused (DbServerConnectionsNearMax)."]  # fmt: skip


def _pools(samples: Samples) -> list[str]:
    out = []
    for service, usage in sorted(usage_by_service(samples).items()):
        if usage >= T.POOL_USAGE_WARNING:
            p95 = quantile(0.95, samples, "db_pool_checkout_wait_seconds", service=service)
            out.append(f"Pool: the busiest {service} process has {usage * 100:.0f}% of its pool checked out "
                       f"(checkout wait p95 {p95 or 0:.2f} s since start).")  # fmt: skip
    blocked = {lb.get("service", ""): v for lb, v in _rows(samples, "event_loop_blocked_total") if v > 0}
    for service, n in sorted(blocked.items()):
        out.append(f"Event loop: {service} was blocked {n:.0f} times (sync work inside async def).")
    return out


def _views(samples: Samples) -> list[str]:
    out = []
    for target, label in (("db_server", "server"), ("pgbouncer", "pgbouncer")):
        ups = [v for _lb, v in _rows(samples, f"{target}_view_up")]
        if ups and min(ups) == 0:
            out.append(f"The {label} view is failing: its figures are stale ({target}_view_errors_total).")
    return out


def render(urls: list[str], per_url: list[Samples]) -> str:
    merged: Samples = [s for samples in per_url for s in samples]
    lines = [f"read {len(merged)} samples from {', '.join(urls)}"]
    found = findings(merged)
    lines.extend(f"- {f}" for f in found)
    if not found:
        lines.append("- nothing saturated: pools, pooler, locks and server all within their thresholds")
    return "\n".join(lines)


def run(urls: list[str]) -> tuple[str, list[str]]:
    per_url: list[Any] = [fetch(url) for url in urls]
    merged = [s for samples in per_url for s in samples]
    return render(urls, per_url), findings(merged)
