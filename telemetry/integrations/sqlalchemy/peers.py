"""Who is who on the server: every PostgreSQL connection named ``service/pid@host``, its
server backend pid and local address and port read from the driver, the first statement of a
transaction and its end timed (from ``_sqltag``), and the owner table the shared view joins on."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from telemetry._core.catalogue import WAIT_BUCKETS
from telemetry._core.holds import OwnerRow
from telemetry._core.log import hook_error, trace_ids
from telemetry._core.stats import owner_histogram

from .state import CONFIG, _held

_perf = time.perf_counter

_HOST = socket.gethostname().split(".", 1)[0]


def application_name(pid: int | None = None) -> str:
    """``service/pid@host``, at most 63 bytes (PostgreSQL's NAMEDATALEN - 1)."""
    name = f"{CONFIG.service}/{pid or os.getpid()}@{_HOST}"
    return name.encode()[:63].decode(errors="ignore")


def _has_application_name(cargs: Any, cparams: dict[str, Any]) -> bool:
    if "application_name" in cparams or os.environ.get("PGAPPNAME"):
        return True
    texts = [*(a for a in cargs if isinstance(a, str)), str(cparams.get("dsn") or ""),
             str(cparams.get("conninfo") or "")]  # fmt: skip
    return any("application_name" in t for t in texts)


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


def _observe_transaction_idle(rec: Any, seconds: float) -> None:
    """The transaction that just ended on a held connection sat ``seconds`` idle between its
    statements (from ``_sqltag``): by owner."""
    h = _held.get(rec)
    if h is not None:
        hist, _overflow = owner_histogram(h.state.transaction_idle, h.owner, WAIT_BUCKETS, CONFIG.max_owners)
        hist.observe(seconds)


def _observe_transaction_end(rec: Any, seconds: float) -> None:
    h = _held.get(rec)
    if h is not None:
        h.state.transaction_end.observe(seconds)


def _local_peer(fd: int) -> tuple[str, int | None]:
    dup = socket.socket(fileno=os.dup(fd))
    try:
        name = dup.getsockname()
    finally:
        dup.close()
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return "", None


def _peer(pid: int | None, local: Any) -> tuple[int | None, int | None, str]:
    if isinstance(local, tuple) and len(local) >= 2:
        return pid, int(local[1]), str(local[0])
    return pid, None, ""


def peer_of(dbapi_connection: Any) -> tuple[int | None, int | None, str] | None:
    """``(server backend pid, local TCP port, local address)`` of a new connection, from the
    driver without a round trip (psycopg 3, psycopg2, asyncpg); None for other drivers. Through
    pgbouncer the pid is the pooler's, and the local address and port are what join the
    connection to ``SHOW CLIENTS`` (both: a port alone is not unique across hosts)."""
    conn = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    info = getattr(conn, "info", None)
    if info is not None and hasattr(info, "backend_pid") and hasattr(conn, "pgconn"):  # psycopg 3
        addr, port = _local_peer(conn.pgconn.socket)
        return info.backend_pid, port, addr
    if hasattr(conn, "get_backend_pid") and hasattr(conn, "fileno"):  # psycopg2
        addr, port = _local_peer(conn.fileno())
        return conn.get_backend_pid(), port, addr
    if hasattr(conn, "get_server_pid"):  # asyncpg
        transport = getattr(conn, "_transport", None)
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        return _peer(conn.get_server_pid(), sockname)
    return None


def owner_table() -> list[OwnerRow]:
    """The connections held right now whose server identity is known, as :class:`OwnerRow`
    records (written to the process file; ``_shared_model.Owners`` joins server and pooler rows
    to owners through them)."""
    out: list[OwnerRow] = []
    now_wall, now = time.time(), _perf()
    for rec, h in list(_held.items()):
        peer = getattr(rec, "_telemetry_peer", None)
        if not peer:
            continue
        trace_id = ""
        if h.context is not None:
            trace_id = trace_ids(h.context).get("trace_id", "")
        out.append(OwnerRow(peer[0], peer[1], CONFIG.service, h.owner, round(now_wall - (now - h.since), 3),
                            trace_id, peer[2] if len(peer) > 2 else ""))  # fmt: skip
    return out
