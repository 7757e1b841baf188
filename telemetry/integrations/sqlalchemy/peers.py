"""Who is who on the server: every PostgreSQL connection named ``service/pid@host``, its
server backend pid and local address and port read from the driver, the first statement of a
transaction and its end timed (from ``_sqltag``), and the owner table the shared view joins on."""

from __future__ import annotations

import time
from typing import Any

from telemetry._core import bounds as _bounds
from telemetry._core import calls as _calls
from telemetry._core import peers as _peers
from telemetry._core import sqltag as _sqltag
from telemetry._core.catalogue import WAIT_BUCKETS
from telemetry._core.holds import OwnerRow
from telemetry._core.log import hook_error, trace_ids
from telemetry._core.peers import has_application_name as _has_application_name
from telemetry._core.peers import peer_of
from telemetry._core.pools import owner_rows
from telemetry._core.stats import owner_histogram

from .state import CONFIG, TABLE, _held

_perf = time.perf_counter

def application_name(pid: int | None = None) -> str:
    """``service/pid@host`` of this process (``_core.peers``)."""
    return _peers.application_name(CONFIG.service, pid)


def _on_do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """Name every PostgreSQL connection after its service and process (a name the user set, in
    the URL, ``connect_args`` or ``PGAPPNAME``, is kept)."""
    try:
        if not CONFIG.application_name or dialect.name != "postgresql":
            return
        if dialect.driver == "asyncpg":
            settings = dict(cparams.get("server_settings") or {})
            if "application_name" not in settings:
                settings["application_name"] = application_name()
                cparams["server_settings"] = settings
        elif not _has_application_name(cargs, cparams):
            cparams["application_name"] = application_name()
    except Exception as exc:
        hook_error("pool.application_name", exc)


def _observe_server_wait(rec: Any, seconds: float) -> None:
    """The first statement of a transaction on a held connection took ``seconds`` (from
    ``_sqltag``): by owner, and into the request's account."""
    h = _held.get(rec)
    if h is None:
        return
    hist, _overflow = owner_histogram(h.state.server_wait, h.owner, WAIT_BUCKETS, CONFIG.max_owners)
    hist.observe(seconds)
    if h.account is not None:
        h.account.server_wait += seconds


#: an idle transaction this long names the call its trace's spans show it waited for
IDLE_CALL_SECONDS = 0.1


def _observe_transaction_idle(rec: Any, seconds: float) -> None:
    """The transaction that just ended on a held connection sat ``seconds`` idle between its
    statements (from ``_sqltag``): by owner, and by the call it awaited where a span shows it."""
    h = _held.get(rec)
    if h is None:
        return
    hist, _overflow = owner_histogram(h.state.transaction_idle, h.owner, WAIT_BUCKETS, CONFIG.max_owners)
    hist.observe(seconds)
    if seconds >= IDLE_CALL_SECONDS and _calls.RECENT.enabled and h.context is not None:
        trace_id = trace_ids(h.context).get("trace_id")
        since = time.time_ns() - int((_perf() - h.since) * 1e9)
        found = _calls.RECENT.awaited(int(trace_id, 16), since) if trace_id else None
        if found is not None:
            owner = h.owner if h.owner in h.state.transaction_idle else "other"
            key = (owner, _bounds.CALLS(found[0]))
            h.state.idle_calls[key] = h.state.idle_calls.get(key, 0) + 1


def _observe_transaction_end(rec: Any, seconds: float) -> None:
    h = _held.get(rec)
    if h is not None:
        h.state.transaction_end.observe(seconds)


def owner_table() -> list[OwnerRow]:
    """The connections held right now whose server identity is known, as :class:`OwnerRow`
    records (written to the process file; ``_shared_model.Owners`` joins server and pooler rows
    to owners through them)."""
    return owner_rows(TABLE, CONFIG.service, lambda rec: getattr(rec, "_telemetry_peer", None),
                      lambda rec: rec.__dict__.get(_sqltag.CURSOR, ""), _sqltag.token_of)  # fmt: skip


__all__ = ["peer_of"]  # re-exported: the SQLAlchemy pool reads the peer of each new connection
