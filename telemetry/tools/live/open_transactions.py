"""Transactions kept open across other work: an awaited HTTP or LLM call, a sleep, a computation
between two statements of one transaction. The connection (and behind a transaction pooler, its
server connection) is held the whole time, idle on the server ("idle in transaction"), usually
for less than the 5 s the idle-in-transaction event waits for.

The client measures it per transaction (``db_transaction_idle_seconds``: from the transaction's
begin to its commit or rollback, its statements' own time excluded). A finding needs a cause and
a magnitude: the idle time is most of the owner's hold time, and its p95 per transaction is at
least ``FIRST_STATEMENT_FLOOR_SECONDS`` (0.1 s).
"""

from __future__ import annotations

from telemetry.tools.findings import Finding
from telemetry.tools.findings import rows as _rows
from telemetry.tools.samples import Samples, quantile

from .first_statement import FIRST_STATEMENT_FLOOR_SECONDS

#: the share of an owner's hold time its transactions sat idle, from which it is the cause
IDLE_SHARE = 0.5


def _sums(samples: Samples, name: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for lb, v in _rows(samples, name):
        key = (lb.get("service", ""), lb.get("owner", ""))
        out[key] = out.get(key, 0.0) + v
    return out


def open_transactions(samples: Samples) -> list[Finding]:
    """One finding per owner whose transactions sat idle for most of its connections' hold."""
    idle, held = _sums(samples, "db_transaction_idle_seconds_sum"), _sums(samples, "db_connection_hold_seconds_sum")
    out = []
    for (service, owner), seconds in sorted(idle.items(), key=lambda kv: -kv[1]):
        hold = held.get((service, owner), 0.0)
        if hold <= 0 or seconds / hold < IDLE_SHARE:
            continue
        p95 = quantile(0.95, samples, "db_transaction_idle_seconds", service=service, owner=owner)
        if p95 is None or p95 < FIRST_STATEMENT_FLOOR_SECONDS:
            continue
        calls = {lb.get("call", ""): v for lb, v in _rows(samples, "db_transaction_idle_calls_total")
                 if (lb.get("service", ""), lb.get("owner", "")) == (service, owner) and v > 0}  # fmt: skip
        awaited = (" The call its traces show it awaited: " + ", ".join(f"{c!r} ({n:.0f} transactions)" for c, n in
                   sorted(calls.items(), key=lambda kv: -kv[1])[:2]) + ".") if calls else ""  # fmt: skip
        out.append(Finding("open_transaction", (
            f"Open transactions: {service}'s {owner!r} transactions sat idle between their statements for "
            f"{min(1.0, seconds / hold) * 100:.0f}% of its connections' hold time ({seconds:.1f} s of {hold:.1f} s; "
            f"p95 {p95:.2f} s per transaction): the code awaited or did something else (an HTTP or LLM call) inside "
            f"the transaction, holding its connection, and behind a transaction pooler its server connection, idle.{awaited} "
            "Commit (or end the session) before that call and begin a new transaction after it; a bigger pool "
            "would be held the same way."), service))  # fmt: skip
    return out
