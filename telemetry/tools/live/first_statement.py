"""What the first statements of transactions measured, concluded only as far as the evidence goes.

The client times the first statement of every transaction (``db_server_wait_seconds``). That time
is either a queue for a server connection (a transaction pooler holding the client until one
frees) or the statement's own work on the server (including its lock waits): the client alone
cannot tell them apart. So the finding is decided by what else is known:

* **waiting for a server connection** (kind ``server_wait``) only where a transaction pooler is in
  the path (its view is read, or the server sees connections named after a pooler, as a renaming
  pooler such as Supavisor does) and it queued: its clients waiting, or the service's checked-out
  connections mostly without a server connection on the server view;
* **slow statements** (kind ``slow_statement``) where no pooler is in the path and the server view
  is read (PostgreSQL queues no statement for a connection: the time is the statement's), or the
  pooler shows no client waiting, or the service's connections are ``active`` on the server; the
  owners active on the server are named;
* otherwise **unknown** (kind ``first_statement_unknown``), with what would tell them apart.

A finding needs a magnitude: most of the hold time (``SERVER_WAIT_SHARE``) and a p95 of the first
statements of at least ``FIRST_STATEMENT_FLOOR_SECONDS``.
"""

from __future__ import annotations

from telemetry.server_view.model import POOLER_NAMES
from telemetry.tools.findings import Finding, across_hosts, fmt_owners, merged, owners, rows
from telemetry.tools.samples import Samples, quantile

#: a service whose checked-out connections spent at least this share of their hold time in the
#: first statements of their transactions (beyond a plain round trip) is held up there, not by
#: its pool
SERVER_WAIT_SHARE = 0.5
#: below this p95 (seconds) the first statements are no finding: 20 ms is not a full pooler,
#: whatever share of a short hold it is. The p95, not the mean: a queue that meets one transaction
#: in ten is diluted in the mean by the nine that met none (the demo's renaming pooler: p95 0.37 s,
#: mean 0.04 s)
FIRST_STATEMENT_FLOOR_SECONDS = 0.1
#: what would tell a queue from the statements' own time, when nothing does
_WHAT_WOULD_TELL = ("the server view (TELEMETRY_SERVER_VIEW_URL: whether those connections are active on the "
                    "server) or the pooler's view (TELEMETRY_PGBOUNCER_URL or TELEMETRY_POOLER_METRICS_URL: "
                    "whether clients queue) would tell them apart")  # fmt: skip


def _by_service(samples: Samples, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lb, v in rows(samples, name):
        out[lb.get("service", "")] = out.get(lb.get("service", ""), 0.0) + v
    return out


def waiting_for_server(samples: Samples) -> dict[str, tuple[float, float | None]]:
    """Services whose checked-out connections spent most of their hold time in the first
    statements of their transactions: service -> (share of their hold time, p95 of those
    statements). The time counted is what the first statements took beyond a plain round trip on
    the same connections (the mean commit or rollback, ``db_transaction_end_seconds``): for a short
    transaction the ordinary round trip is most of the hold time, and is no wait."""
    first_sum = _by_service(samples, "db_server_wait_seconds_sum")
    first_count = _by_service(samples, "db_server_wait_seconds_count")
    end_sum = _by_service(samples, "db_transaction_end_seconds_sum")
    end_count = _by_service(samples, "db_transaction_end_seconds_count")
    holds = _by_service(samples, "db_connection_hold_seconds_sum")
    out = {}
    for service, waited in first_sum.items():
        n = first_count.get(service, 0.0)
        baseline = end_sum.get(service, 0.0) / end_count[service] if end_count.get(service) else 0.0
        excess = waited - n * baseline
        held = holds.get(service, 0.0)
        if not (n and held > 0 and excess / held >= SERVER_WAIT_SHARE and waited / n >= 3 * baseline):
            continue
        p95 = quantile(0.95, samples, "db_server_wait_seconds", service=service)
        if (p95 if p95 is not None else excess / n) >= FIRST_STATEMENT_FLOOR_SECONDS:
            out[service] = (min(1.0, excess / held), p95)
    return out


def pooler_in_path(samples: Samples) -> str:
    """Why a transaction pooler is known to be in the path, or "" when nothing shows one."""
    if any(name.startswith("pgbouncer_") for name, _lb, _v in samples):
        return "the pooler's view is read"
    named = sorted({lb.get("application", "") for lb, v in rows(samples, "db_server_connections")
                    if v > 0 and lb.get("application", "").strip().lower() in POOLER_NAMES - {""}})  # fmt: skip
    return f"the server sees connections named {named[0]!r}" if named else ""


def _pooler_queue(samples: Samples) -> bool | None:
    """Whether the pooler's view shows clients queued (None: no pooler view)."""
    clients = merged(samples, "pgbouncer_clients", ("database", "user", "state"))
    maxwait = merged(samples, "pgbouncer_client_maxwait_seconds", ("database", "user"))
    if not clients and not maxwait:
        return None
    return any(v > 0 for (_d, _u, st), v in clients.items() if st == "waiting") or any(v > 0 for v in maxwait.values())


def _server_view(samples: Samples) -> bool:
    return any(v >= 1 for _lb, v in rows(samples, "db_server_view_up"))


def _request_share(samples: Samples, service: str) -> str:
    """The first statements' share of the service's request time, when it serves requests."""
    waited = _by_service(samples, "http_server_db_server_wait_seconds_sum").get(service, 0.0)
    total = _by_service(samples, "http_server_request_duration_seconds_sum").get(service, 0.0)
    return f", {waited / total * 100:.0f}% of its request time" if total > 0 and waited > 0 else ""


def _kind(samples: Samples, service: str, pooler: str, named: dict[tuple[str, str], float],
          running: dict[tuple[str, str], float]) -> tuple[str, str]:
    """(kind, the evidence in words) for one service's first statements; ``named``: the owners the
    server view joined to server connections, ``running``: those of them ``active``."""
    in_use = _by_service(samples, "db_pool_connections_in_use").get(service, 0.0)
    on_server = sum(n for k, n in named.items() if k[0] == service)
    active = sum(n for k, n in running.items() if k[0] == service)
    viewed = _server_view(samples)
    # the server view can say which checked-out connections are on the server only where it names
    # owners at all (statement tags, pids or the pooler's clients joined)
    compared = viewed and bool(named) and in_use > 0
    missing = compared and in_use - on_server >= in_use / 2
    busy = compared and active >= in_use / 2
    seen = (f"{in_use - on_server:.0f} of its {in_use:.0f} checked-out connections have no server connection on "
            f"the server view" if missing else f"{active:.0f} of its {in_use:.0f} checked-out connections are "
            "active on the server")  # fmt: skip
    if pooler:
        queued = _pooler_queue(samples)
        if queued is not None:
            return ("server_wait", f"{pooler} and its clients queue") if queued else (
                "slow_statement", f"{pooler} and no client waits in it")  # fmt: skip
        if missing or busy:
            return ("server_wait" if missing else "slow_statement"), f"{pooler}; {seen}"
    elif viewed and not (missing and not busy):
        return "slow_statement", ("no transaction pooler is in the path (no pooler view, no pooler-named "
                                  "connection on the server), and PostgreSQL queues no statement for a connection")  # fmt: skip
    elif viewed:  # checked out, yet missing on the server: a pooler that neither renames nor is viewed
        return "unknown", f"no pooler is seen, yet {seen}"
    if not viewed:
        return "unknown", f"{pooler or 'nothing shows whether a pooler is in the path'}, and neither the pooler's queue nor the server is viewed"
    if not named:
        return "unknown", f"{pooler}, and the server view names no owner (statement tags off?)"
    if in_use <= 0:
        return "unknown", f"{pooler}, and none of {service}'s connections was checked out when read"
    return "unknown", f"{pooler}, and only {seen}, {on_server:.0f} on the server"


def _statements(samples: Samples, service: str, limit: int = 3) -> str:
    """What ``service``'s backends ran on the server (the server view: the text without literals,
    the longest run), the longest first: " Running: 'GET /r' `select ...` (3 backends, 0.58 s)."."""
    count = across_hosts(samples, "db_server_statements_active", ("service", "owner", "statement"))
    longest = merged(samples, "db_server_statement_running_seconds", ("service", "owner", "statement"))
    mine = sorted(((longest.get(k, 0.0), n, k) for k, n in count.items() if k[0] == service and n > 0), reverse=True)
    if not mine:
        return ""
    return " Running: " + "; ".join(f"{k[1]!r} `{k[2]}` ({n:.0f} backend{'s' if n != 1 else ''}, the longest "
                                      f"{seconds:.2f} s)" for seconds, n, k in mine[:limit]) + "."  # fmt: skip


def first_statements(samples: Samples) -> list[Finding]:
    """One finding per service held up in its first statements: a queue for a server connection,
    slow statements, or unknown (see the module's docstring)."""
    out = []
    pooler = pooler_in_path(samples)
    named, running = owners(samples), owners(samples, "active")
    for service, (share, p95) in sorted(waiting_for_server(samples).items()):
        kind, evidence = _kind(samples, service, pooler, named, running)
        measured = (f"{service}'s transactions spent {share * 100:.0f}% of their connections' hold time in their "
                    f"first statements beyond a plain round trip (p95 {p95 or 0:.2f} s{_request_share(samples, service)})")  # fmt: skip
        if kind == "server_wait":
            others = {k: n for k, n in named.items() if k[0] != service and n > 0}
            own = {k: n for k, n in named.items() if k[0] == service and n > 0}
            who = (f" Server connections are held by {fmt_owners(others)}." if others else
                   f" Server connections are held by {service} itself: {fmt_owners(own)}." if own else "")  # fmt: skip
            out.append(Finding("server_wait", f"Server connections: {measured}, waiting for a server connection "
                               f"({evidence}): the pooler or the server is full, not {service}'s pool.{who} Shorten "
                               "those transactions; a bigger pool would only queue more (DbServerWaitHigh).", service))  # fmt: skip
        elif kind == "slow_statement":
            active = {k: n for k, n in running.items() if k[0] == service and n > 0}
            who = f" Active on the server now: {fmt_owners(active)}." if active else ""
            who += _statements(samples, service)
            locks = sum(v for lb, v in rows(samples, "db_server_lock_waiting") if lb.get("application") == service)
            lock = " Some of them wait for locks: see Locks." if locks > 0 else ""
            out.append(Finding("slow_statement", f"Slow statements: {measured}, and {evidence}: that is the "
                               f"statements' own time on the server, not a wait for a connection.{who}{lock} Make "
                               "those statements faster (pg_stat_statements or TELEMETRY_SQL_SPANS show which; "
                               "EXPLAIN ANALYZE); a bigger pool or pooler would not help.", service))  # fmt: skip
        else:
            out.append(Finding("first_statement_unknown", f"First statements: {measured}. Unknown whether that is a "
                               "queue for a server connection (a full pooler or server) or the statements' own "
                               f"time on the server, because {evidence}; {_WHAT_WOULD_TELL}.", service))  # fmt: skip
    return out
