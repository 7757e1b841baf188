"""asyncpg's own pool (``asyncpg.create_pool()``, as many FastAPI apps use it without an ORM): in
use, idle, size, min and max, waiting requests, acquire wait, acquire timeouts, hold time by
owner, long holds with the holder's line, leaked connections, in the same ``db_pool_*`` series as
SQLAlchemy's pools, named ``host:port/db`` (``#2`` and so on for further pools on one address;
never with a user or password).

``Pool._acquire`` (behind ``acquire()``, ``async with pool.acquire()`` and the pool's own
``fetch``/``execute``) and ``Pool.release`` are wrapped at class level, so every pool is
covered, created before or after ``instrument()``. ``asyncio.TimeoutError`` from the acquire's
``timeout`` counts as a timeout. A pool created after ``instrument()`` names its connections
``service/pid@host`` (``server_settings``), unless the application named them; the server view
joins the held connections to their owners by backend pid and local address and port.

Statements on a pool's connections are tagged (``_core/sqltag.py``): ``Connection._get_statement``
(every statement with parameters, ``fetch``, ``prepare``, ``executemany``, cursors) and
``Connection.execute`` without arguments (the simple protocol: ``BEGIN``, scripts) are wrapped
at class level, for connections that belong to a pool (SQLAlchemy's asyncpg connections are
tagged by their dialect). With asyncpg's statement cache on (the default) the tag carries the
connection's token, so the cache keeps one text per statement; with it off
(``statement_cache_size=0``, behind a transaction pooler) the owner's name.

asyncpg's ``Pool`` has ``__slots__`` and no weak reference: the pools seen are kept in a bounded
table (``MAX_POOLS``) and dropped once closed.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import asyncpg.connection
import asyncpg.pool

from telemetry._core import peers as _peers
from telemetry._core import pools as _pools
from telemetry._core import sqltag as _sqltag
from telemetry._core.holds import HoldTable
from telemetry._core.log import hook_error
from telemetry._core.stats import REGISTRY, Sample

_perf = time.perf_counter
CONFIG = _pools.PoolConfig()
TABLE = HoldTable("db_connection_held_too_long")
Pool = asyncpg.pool.Pool
#: pools named per process; a further one reports as "other"
MAX_POOLS = 50


class AsyncpgPoolFigures(_pools.PoolFigures):
    """One named asyncpg pool: the common figures, and the pool's own gauges (``get_size()``,
    ``get_idle_size()``, ``get_min_size()``, ``get_max_size()``) read at collection."""

    __slots__ = ("pool",)

    def __init__(self, name: str) -> None:
        self.pool: Any = None  # the newest open pool of this name
        super().__init__(name, CONFIG.service)

    def samples(self) -> Iterable[Sample]:
        pool = self.pool
        yield from self.common_samples(TABLE, CONFIG.max_owners)
        if pool is not None and not pool._closed:
            lb, size, low = self.labels, pool.get_size(), pool.get_min_size()
            self.max_connections = pool.get_max_size()
            yield "db_pool_connections_idle", lb, pool.get_idle_size()
            yield "db_pool_size", lb, low
            yield "db_pool_overflow", lb, size - low
            yield "db_pool_connections_max", lb, self.max_connections


_figures: dict[str, AsyncpgPoolFigures] = {}
#: id(pool) -> (pool, its figures): the pools seen, until closed
_live: dict[int, tuple[Any, AsyncpgPoolFigures]] = {}
#: the pool of the last checkout and its figures (most processes have one pool): cleared with the rest
_last: list[tuple[Any, AsyncpgPoolFigures] | None] = [None]


def address(connect_args: Any, connect_kwargs: dict[str, Any]) -> str:
    """``host:port/db`` of a pool from its connect arguments (a DSN and keywords, then the
    libpq environment variables asyncpg reads, then its defaults); never a user or password."""
    host: Any = None
    port: Any = None
    database: Any = None
    dsn = connect_args[0] if connect_args else connect_kwargs.get("dsn")
    if isinstance(dsn, str) and "://" in dsn:
        parts = urllib.parse.urlsplit(dsn)
        host, database = parts.hostname, parts.path.lstrip("/") or None
        try:
            port = parts.port
        except ValueError:
            port = None
    host = connect_kwargs.get("host") or host or os.environ.get("PGHOST") or "localhost"
    port = connect_kwargs.get("port") or port or os.environ.get("PGPORT") or 5432
    database = (connect_kwargs.get("database") or database or os.environ.get("PGDATABASE")
                or connect_kwargs.get("user") or os.environ.get("PGUSER") or "postgres")  # fmt: skip
    if isinstance(host, (list, tuple)):
        host = host[0] if host else "localhost"
    if isinstance(port, (list, tuple)):
        port = port[0] if port else 5432
    return f"{host}:{port}/{database}"


def _state(pool: Any) -> AsyncpgPoolFigures:
    last = _last[0]
    if last is not None and last[0] is pool:
        return last[1]
    entry = _live.get(id(pool))
    if entry is not None and entry[0] is pool and _figures.get(entry[1].name) is entry[1]:
        _last[0] = entry
        return entry[1]
    for key, (other, _st) in list(_live.items()):
        if other._closed:
            del _live[key]
    base = address(pool._connect_args, pool._connect_kwargs)
    taken = {st.name for other, st in _live.values() if other is not pool}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    if name not in _figures and len(_figures) >= MAX_POOLS:
        name = "other"
    st = _figures.get(name)
    if st is None:
        st = _figures[name] = AsyncpgPoolFigures(name)
        REGISTRY.add(st)
    st.pool = pool
    if len(_live) < MAX_POOLS:
        _live[id(pool)] = (pool, st)
    _last[0] = (pool, st)
    return st


def _wrap_acquire(orig: Any) -> Any:
    async def _acquire(self: Any, timeout: Any) -> Any:
        try:
            last = _last[0]
            st = last[1] if last is not None and last[0] is self else _state(self)
        except Exception as exc:
            hook_error("asyncpg_pool.acquire", exc)
            return await orig(self, timeout)
        st.pending += 1
        t0 = _perf()
        try:
            proxy = await orig(self, timeout)
        except BaseException as exc:
            st.pending -= 1
            result = ("timeout" if isinstance(exc, asyncio.TimeoutError) else
                      "error" if isinstance(exc, Exception) else "cancelled")  # fmt: skip
            _pools.failed_checkout(st, _perf() - t0, result, TABLE, exc)
            raise
        t1 = _perf()
        st.pending -= 1
        try:
            _pools.checked_out(st, TABLE, proxy, t1 - t0, t1, self._loop)
        except Exception as exc:
            hook_error("asyncpg_pool.acquire", exc)
        return proxy

    _acquire.__wrapped__ = orig  # type: ignore[attr-defined]
    return _acquire


def _wrap_release(orig: Any) -> Any:
    """Not a coroutine of its own: the release is accounted when it is called, and asyncpg's
    coroutine is handed back for the caller to await (one coroutine frame less, about 0.4 us)."""

    def release(self: Any, connection: Any, *, timeout: Any = None) -> Any:
        try:
            _pools.released(TABLE, connection, CONFIG)
        except Exception as exc:
            hook_error("asyncpg_pool.release", exc)
        return orig(self, connection) if timeout is None else orig(self, connection, timeout=timeout)

    release.__wrapped__ = orig  # type: ignore[attr-defined]
    return release


def _wrap_init(orig: Any) -> Any:
    """A pool created from now on names its connections ``service/pid@host``."""

    def __init__(self: Any, *connect_args: Any, **kwargs: Any) -> None:
        try:
            settings = dict(kwargs.get("server_settings") or {})
            if CONFIG.application_name and "application_name" not in settings and not os.environ.get("PGAPPNAME") \
                    and not any("application_name" in str(a) for a in connect_args):  # fmt: skip
                settings["application_name"] = _peers.application_name(CONFIG.service)
                kwargs["server_settings"] = settings
        except Exception as exc:
            hook_error("asyncpg_pool.application_name", exc)
        orig(self, *connect_args, **kwargs)

    __init__.__wrapped__ = orig  # type: ignore[attr-defined]
    return __init__


def _tagged(conn: Any, query: Any) -> Any:
    """``query`` with its tag, on a pool's connection (``_proxy`` is set while a pool lends it)."""
    try:
        if _sqltag.CONFIG.tag and conn._proxy is not None and type(query) is str:
            return _sqltag.conn_tag(conn, conn._stmt_cache_enabled) + query
    except Exception as exc:
        hook_error("asyncpg_pool.tag", exc)
    return query


def _wrap_get_statement(orig: Any) -> Any:
    def _get_statement(self: Any, query: Any, timeout: Any, **kwargs: Any) -> Any:
        return orig(self, _tagged(self, query), timeout, **kwargs)  # asyncpg's coroutine, awaited by the caller

    _get_statement.__wrapped__ = orig  # type: ignore[attr-defined]
    return _get_statement


def _wrap_execute(orig: Any) -> Any:
    def execute(self: Any, query: Any, *args: Any, timeout: Any = None) -> Any:
        # with arguments asyncpg prepares it: _get_statement tags it
        return orig(self, query if args else _tagged(self, query), *args, timeout=timeout)

    execute.__wrapped__ = orig  # type: ignore[attr-defined]
    return execute


Connection = asyncpg.connection.Connection
_PATCHES = ((Pool, "_acquire", _wrap_acquire), (Pool, "release", _wrap_release), (Pool, "__init__", _wrap_init),
            (Connection, "_get_statement", _wrap_get_statement), (Connection, "execute", _wrap_execute))


class AsyncpgPoolIntegration(_pools.LibraryPoolIntegration):
    """Every asyncpg pool of the process."""

    name = "asyncpg_pool"
    config, table, figures, patches = CONFIG, TABLE, _figures, _PATCHES  # type: ignore[assignment]

    tags = True

    def token(self, key: Any) -> str:
        return _sqltag.conn_token(getattr(key, "_con", None))

    def forget(self) -> None:
        _live.clear()  # a forked child's pools are the parent's, not its own to use
        _last[0] = None
