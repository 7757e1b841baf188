"""Leaked connections: checked out by a request or task that ended without returning them.

The ASGI middleware and the Celery signals mark the end of each request and task; the
housekeeper counts a connection still checked out a second later
(``db_pool_connections_leaked_total``), and SQLAlchemy's garbage-collection return of a
connection nobody closed is counted where it happens (``db_pool_connections_gc_returned_total``).
Both carry the owner and, from an owner's second leak on, the line that checked it out.
"""

from __future__ import annotations

from telemetry.tools.findings import Finding
from telemetry.tools.findings import rows as _rows
from telemetry.tools.samples import Samples

LEAKED = "db_pool_connections_leaked_total"
GC_RETURNED = "db_pool_connections_gc_returned_total"


def _by_service(samples: Samples, name: str) -> dict[str, dict[tuple[str, str], float]]:
    out: dict[str, dict[tuple[str, str], float]] = {}
    for lb, v in _rows(samples, name):
        if v > 0:
            mine = out.setdefault(lb.get("service", ""), {})
            key = (lb.get("owner", ""), lb.get("call_site", "unknown"))
            mine[key] = mine.get(key, 0.0) + v
    return out


def _who(counts: dict[tuple[str, str], float]) -> str:
    """'GET /a' 3 (checked out at app.py:12 in order), ...: the owners with most first."""
    owners: dict[str, float] = {}
    sites: dict[str, dict[str, float]] = {}
    for (owner, site), n in counts.items():
        owners[owner] = owners.get(owner, 0.0) + n
        if site not in ("unknown", ""):
            sites.setdefault(owner, {})[site] = sites.setdefault(owner, {}).get(site, 0.0) + n
    parts = []
    for owner, n in sorted(owners.items(), key=lambda kv: -kv[1])[:3]:
        where = sorted(sites.get(owner, {}).items(), key=lambda kv: -kv[1])[:2]
        at = f", checked out at {' and '.join(site for site, _n in where)}" if where else ""
        parts.append(f"{owner!r} {n:.0f}{at}")
    return ", ".join(parts)


def leaks(samples: Samples) -> list[Finding]:
    """One finding per service whose connections outlived the request or task that took them,
    or that only the garbage collector returned."""
    leaked, collected = _by_service(samples, LEAKED), _by_service(samples, GC_RETURNED)
    out = []
    for service in sorted(set(leaked) | set(collected)):
        mine, gced = leaked.get(service, {}), collected.get(service, {})
        parts = []
        if mine:
            parts.append(f"{sum(mine.values()):.0f} of {service}'s connections were still checked out after the "
                         f"request or task that took them had ended ({_who(mine)})")  # fmt: skip
        if gced:
            parts.append(f"{sum(gced.values()):.0f} were returned only by the garbage collector, never closed by "
                         f"the code ({_who(gced)})")  # fmt: skip
        named = any(site not in ("unknown", "") for counts in (mine, gced) for _o, site in counts)
        text = ("Leaked connections: " + "; ".join(parts) + ". Each holds its connection, and any transaction "
                "on it, until the garbage collector finds it. Close the session on every path (with "
                "Session() as session:, async with, or a dependency that closes it in finally)")  # fmt: skip
        text += "." if named else ("; the line that checks them out is named from an owner's next leak on "
                                   "(db_connection_leaked events, call_site).")  # fmt: skip
        out.append(Finding("leak", text, service))
    return out
