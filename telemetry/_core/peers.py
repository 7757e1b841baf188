"""Who a PostgreSQL connection is, read from the driver without a round trip: the name every
connection of the package's pools carries (``service/pid@host``) and a connection's server
backend pid and local address and port (what the shared view joins server and pooler rows on).
psycopg 3, psycopg2 and asyncpg."""

from __future__ import annotations

import os
import socket
from typing import Any

_HOST = socket.gethostname().split(".", 1)[0]


def application_name(service: str, pid: int | None = None) -> str:
    """``service/pid@host``, at most 63 bytes (PostgreSQL's NAMEDATALEN - 1)."""
    name = f"{service}/{pid or os.getpid()}@{_HOST}"
    return name.encode()[:63].decode(errors="ignore")


def has_application_name(cargs: Any, cparams: dict[str, Any]) -> bool:
    if "application_name" in cparams or os.environ.get("PGAPPNAME"):
        return True
    texts = [*(a for a in cargs if isinstance(a, str)), str(cparams.get("dsn") or ""),
             str(cparams.get("conninfo") or "")]  # fmt: skip
    return any("application_name" in t for t in texts)


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
