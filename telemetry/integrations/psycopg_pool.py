"""psycopg_pool's pools (``ConnectionPool``, ``AsyncConnectionPool`` and their null variants):
in use, idle, size, min and max, waiting requests, checkout wait, timeouts ("couldn't get a
connection after ..."), hold time by owner, long holds with the holder's line, leaked
connections, in the same ``db_pool_*`` series as SQLAlchemy's pools, named by the pool's
``name``. LangGraph's PostgreSQL checkpointer and services without an ORM use them.

``getconn`` and ``putconn`` are wrapped at class level (``connection()`` calls them), sync and
async, so every pool of the process is covered, created before or after ``instrument()``. A
pool created after it names its connections ``service/pid@host`` (unless the application set a
name), and the server view joins its held connections to their owners by backend pid and local
address and port, like any other pool's.

Statements on a connection the pool has lent are tagged (``_core/sqltag.py``): psycopg's cursor
``execute``, ``executemany``, ``stream`` and ``copy`` (sync, async, server-side) are wrapped at
class level and tag only while ``conn._pool`` is set (psycopg_pool sets it while it lends the
connection; SQLAlchemy's psycopg connections are tagged by their dialect). With a
``prepare_threshold`` (psycopg's default) the tag carries the connection's token, so prepared
statements stay one per text; with ``prepare_threshold=None`` (behind a transaction pooler) the
owner's name.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from typing import Any

import psycopg
import psycopg_pool

from telemetry._core import peers as _peers
from telemetry._core import pools as _pools
from telemetry._core import sqltag as _sqltag
from telemetry._core.holds import HoldTable
from telemetry._core.log import hook_error
from telemetry._core.stats import REGISTRY, Sample

_perf = time.perf_counter
CONFIG = _pools.PoolConfig()
TABLE = HoldTable("db_connection_held_too_long")
_ATTR = "_telemetry_figures"
_TIMEOUT = psycopg_pool.PoolTimeout


class PsycopgPoolFigures(_pools.PoolFigures):
    """One named psycopg_pool pool: the common figures, and the pool's own gauges read from
    ``get_stats()`` at collection."""

    __slots__ = ("pool_ref",)

    def __init__(self, name: str) -> None:
        self.pool_ref: Any = None
        super().__init__(name, CONFIG.service)

    def samples(self) -> Iterable[Sample]:
        pool = self.pool_ref() if self.pool_ref is not None else None
        stats = pool.get_stats() if pool is not None and not pool.closed else {}
        self.max_connections = stats.get("pool_max") or self.max_connections
        self.connects = max(self.connects, int(stats.get("connections_num", 0)))
        yield from self.common_samples(TABLE, CONFIG.max_owners)
        if stats:
            lb = self.labels
            yield "db_pool_connections_idle", lb, stats.get("pool_available", 0)
            yield "db_pool_size", lb, stats.get("pool_min", 0)
            yield "db_pool_overflow", lb, stats.get("pool_size", 0) - stats.get("pool_min", 0)
            yield "db_pool_connections_max", lb, stats.get("pool_max", 0)


_figures: dict[str, PsycopgPoolFigures] = {}


def _state(pool: Any) -> PsycopgPoolFigures:
    st = pool.__dict__.get(_ATTR)
    if st is None or _figures.get(st.name) is not st:  # new, or seen before an uninstrument()
        name = str(pool.name)
        st = _figures.get(name)
        if st is None:
            st = _figures[name] = PsycopgPoolFigures(name)
            REGISTRY.add(st)
        st.pool_ref = weakref.ref(pool)
        pool.__dict__[_ATTR] = st
    return st


def _failed(st: PsycopgPoolFigures, t0: float, exc: BaseException) -> None:
    st.pending -= 1
    result = "timeout" if isinstance(exc, _TIMEOUT) else "error" if isinstance(exc, Exception) else "cancelled"
    _pools.failed_checkout(st, _perf() - t0, result, TABLE, exc)


def _wrap_getconn(orig: Any) -> Any:
    def getconn(self: Any, timeout: float | None = None) -> Any:
        try:
            st = _state(self)
        except Exception as exc:
            hook_error("psycopg_pool.getconn", exc)
            return orig(self, timeout)
        st.pending += 1
        t0 = _perf()
        try:
            conn = orig(self, timeout)
        except BaseException as exc:
            _failed(st, t0, exc)
            raise
        t1 = _perf()
        st.pending -= 1
        try:
            _pools.checked_out(st, TABLE, conn, t1 - t0, t1)
        except Exception as exc:
            hook_error("psycopg_pool.getconn", exc)
        return conn

    getconn.__wrapped__ = orig  # type: ignore[attr-defined]
    return getconn


def _wrap_getconn_async(orig: Any) -> Any:
    async def getconn(self: Any, timeout: float | None = None) -> Any:
        try:
            st = self.__dict__.get(_ATTR)
            if st is None or _figures.get(st.name) is not st:
                st = _state(self)
        except Exception as exc:
            hook_error("psycopg_pool.getconn", exc)
            return await orig(self, timeout)
        st.pending += 1
        t0 = _perf()
        try:
            conn = await orig(self, timeout)
        except BaseException as exc:
            _failed(st, t0, exc)
            raise
        t1 = _perf()
        st.pending -= 1
        try:
            _pools.checked_out(st, TABLE, conn, t1 - t0, t1)
        except Exception as exc:
            hook_error("psycopg_pool.getconn", exc)
        return conn

    getconn.__wrapped__ = orig  # type: ignore[attr-defined]
    return getconn


def _release(conn: Any) -> None:
    try:
        _pools.released(TABLE, conn, CONFIG)
        if _open_cursors:
            _open_cursors.pop(id(conn), None)
    except Exception as exc:
        hook_error("psycopg_pool.putconn", exc)


def _wrap_putconn(orig: Any) -> Any:
    def putconn(self: Any, conn: Any) -> None:
        _release(conn)
        orig(self, conn)

    putconn.__wrapped__ = orig  # type: ignore[attr-defined]
    return putconn


def _wrap_putconn_async(orig: Any) -> Any:
    """Not a coroutine of its own: accounted when called, psycopg_pool's coroutine handed back
    for the caller to await (one coroutine frame less)."""

    def putconn(self: Any, conn: Any) -> Any:
        _release(conn)
        return orig(self, conn)

    putconn.__wrapped__ = orig  # type: ignore[attr-defined]
    return putconn


def _wrap_init(orig: Any) -> Any:
    """A pool created from now on names its connections ``service/pid@host`` (a name the
    application gave, in ``kwargs``, the conninfo or ``PGAPPNAME``, is kept)."""

    def __init__(self: Any, conninfo: str = "", *args: Any, **kw: Any) -> None:
        try:
            given = kw.get("kwargs")
            if CONFIG.application_name and (given is None or isinstance(given, dict)) and \
                    not _peers.has_application_name((conninfo,), dict(given or {})):  # fmt: skip
                kw["kwargs"] = {**(given or {}), "application_name": _peers.application_name(CONFIG.service)}
        except Exception as exc:
            hook_error("psycopg_pool.application_name", exc)
        orig(self, conninfo, *args, **kw)

    __init__.__wrapped__ = orig  # type: ignore[attr-defined]
    return __init__


#: id(a lent connection) -> the server-side cursor it declared last: its FETCH and CLOSE, issued by
#: psycopg, carry no tag, and the owner rows publish the name that joins them (bounded)
_open_cursors: dict[int, str] = {}
MAX_OPEN_CURSORS = 1000


def _tagged(cursor: Any, query: Any, with_params: bool) -> Any:
    """``query`` with its tag, on a connection a pool has lent (a ``str``; a ``sql.Composed`` is
    left alone); ``%`` doubled where parameters are passed."""
    try:
        conn = cursor._conn
        if _sqltag.CONFIG.tag and conn._pool is not None and type(query) is str:
            name = getattr(cursor, "name", None)  # a server-side cursor's
            if name:
                if len(_open_cursors) >= MAX_OPEN_CURSORS:
                    _open_cursors.clear()
                _open_cursors[id(conn)] = name
            tag = _sqltag.conn_tag(conn, conn.prepare_threshold is not None)
            return (tag.replace("%", "%%") if with_params else tag) + query
    except Exception as exc:
        hook_error("psycopg_pool.tag", exc)
    return query


def _wrap_statement(orig: Any) -> Any:
    """``execute``, ``stream``, ``copy`` (the query, then its parameters): the driver's call is
    handed back as it is (a coroutine, a generator, a context manager)."""

    def method(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._conn, "_pool", None) is None:  # not lent by a pool (SQLAlchemy's, a bare one)
            return orig(self, query, *args, **kwargs)
        params = args[0] if args else kwargs.get("params")
        return orig(self, _tagged(self, query, params is not None), *args, **kwargs)

    method.__wrapped__ = orig  # type: ignore[attr-defined]
    return method


def _wrap_many(orig: Any) -> Any:
    def executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._conn, "_pool", None) is None:
            return orig(self, query, *args, **kwargs)
        return orig(self, _tagged(self, query, True), *args, **kwargs)

    executemany.__wrapped__ = orig  # type: ignore[attr-defined]
    return executemany


_CURSORS = (psycopg.Cursor, psycopg.AsyncCursor, psycopg.ServerCursor, psycopg.AsyncServerCursor)
_PATCHES = tuple(
    (cls, name, _wrap_many if name == "executemany" else _wrap_statement)
    for cls in _CURSORS for name in ("execute", "executemany", "stream", "copy") if name in cls.__dict__
) + (
    (psycopg_pool.ConnectionPool, "getconn", _wrap_getconn),
    (psycopg_pool.ConnectionPool, "putconn", _wrap_putconn),
    (psycopg_pool.ConnectionPool, "__init__", _wrap_init),
    (psycopg_pool.AsyncConnectionPool, "getconn", _wrap_getconn_async),
    (psycopg_pool.AsyncConnectionPool, "putconn", _wrap_putconn_async),
    (psycopg_pool.AsyncConnectionPool, "__init__", _wrap_init),
)


class PsycopgPoolIntegration(_pools.LibraryPoolIntegration):
    """Every psycopg_pool pool of the process."""

    name = "psycopg_pool"
    config, table, figures, patches = CONFIG, TABLE, _figures, _PATCHES  # type: ignore[assignment]
    tags = True

    def token(self, key: Any) -> str:
        return _sqltag.conn_token(key)

    def cursor(self, key: Any) -> str:
        return _open_cursors.get(id(key), "")

    def forget(self) -> None:
        _open_cursors.clear()
