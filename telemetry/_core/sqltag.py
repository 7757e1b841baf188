"""Statement tags: who runs a statement, carried in the statement itself.

A transaction pooler that renames its clients (Supabase's Supavisor sets every server
connection's ``application_name`` to "Supavisor"; RDS Proxy and Neon's pooler hide theirs too)
and has no console leaves the server view nothing to join on. The statement text always gets
through: each statement a PostgreSQL engine runs starts with a comment in the sqlcommenter format
(``/*application='api%2F123%40host',owner='GET%20%2Fitems%2F%7Bid%7D'*/ select ...``, keys and
values URL-encoded), which ``pg_stat_activity.query`` shows and pganalyze, Datadog DBM, Cloud SQL
Insights and PostgreSQL's statement log read. At the start, not the end as sqlcommenter
writes it: PostgreSQL cuts ``query`` at ``track_activity_query_size``, and a long statement
would lose a trailing tag.

* How: the dialect's ``do_execute``, ``do_execute_no_params`` and ``do_executemany`` are wrapped
  on each PostgreSQL engine's dialect instance (every statement SQLAlchemy runs goes through
  them), never an engine-level event listener (SQLAlchemy never turns its ``_has_events`` path
  off again: about +30 us on every statement).
* Texts a prepared-statement cache can keep: where the connection's driver prepares statements
  and caches them by their text (SQLAlchemy's asyncpg adapter and its statement cache, psycopg 3
  with a ``prepare_threshold``), an owner in the text would make one prepared statement per
  statement and owner (2,000 Parse messages for 500 owners, against 1). Such a connection's tag
  carries a token instead, the connection's slot in this process (``conn='3'``), the same for
  every statement it runs: the process publishes which owner holds each slot (its owner rows)
  and the server view joins the two. Elsewhere (psycopg2, psycopg 3 with
  ``prepare_threshold=None``, asyncpg without its cache: each statement is parsed anyway) the tag
  carries the owner itself (route template, task name, ``db_owner``; capped like the owner
  label), which survives any pooler and host (``statement_tag_owner``; docs/hosted-poolers.md).
* Safe: URL-encoding leaves no quote, no ``*/``, no newline in a value; with the ``format`` and
  ``pyformat`` parameter styles (psycopg, psycopg2) a ``%`` is doubled when parameters are
  passed, as the driver expects.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
import weakref
from typing import Any

from .log import hook_error
from .loops import holder
from .owner import OWNER

_owner_get = OWNER.get
_ATTR = "_telemetry_sqltag"
#: distinct owners with a tag of their own; further ones share the "other" tag (texts stay bounded)
MAX_TAGGED_OWNERS = 1000


class _Config:
    application = ""  # service/pid@host, set by the SQLAlchemy integration (and after fork)
    trace = False
    tag = True  # statement tags (statement_tag); the first-statement timing is always on
    #: where the owner goes (statement_tag_owner): "auto" (a token on connections that cache
    #: prepared statements, the owner's name elsewhere), "text" (always the name), "token"
    owner_form = "auto"
    #: (connection record, seconds): the first statement of a transaction took that long
    observe_first: Any = None
    #: (connection record, seconds): its commit or rollback took that long (a plain round trip on
    #: the server connection the transaction already has: the baseline the first statement's
    #: wait is read against)
    observe_end: Any = None
    #: (connection record, seconds): the transaction that just ended sat idle that long between
    #: its statements (from its begin to its commit or rollback, its statements' time excluded)
    observe_idle: Any = None


CONFIG = _Config()
_tags: dict[str, tuple[str, str]] = {}
_lock = threading.Lock()
#: the dialects tagged, so that uninstrument() restores them all
_tagged: weakref.WeakSet[Any] = weakref.WeakSet()


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


#: the longest tag: PostgreSQL keeps the first ``track_activity_query_size`` bytes (1024 by
#: default) of a statement in ``pg_stat_activity.query``, and a tag cut there loses its ``*/``
#: and with it the owner; half of it leaves the statement's start readable too
MAX_TAG_BYTES = 512
#: ends an owner cut to fit (URL-encoded: 9 bytes)
CUT = "\u2026"


def _fit(owner: str, room: int) -> str:
    """``owner``, or its longest start whose encoding (with the cut mark) takes at most
    ``room`` bytes: a character is never split, an escape never cut."""
    if len(_quote(owner)) <= room:
        return owner
    lo, hi = 0, len(owner)
    while lo < hi:  # the longest prefix that fits
        mid = (lo + hi + 1) // 2
        if len(_quote(owner[:mid] + CUT)) <= room:
            lo = mid
        else:
            hi = mid - 1
    return owner[:lo] + CUT


def _make(owner: str) -> tuple[str, str]:
    """(tag, the same with ``%`` doubled) for ``owner``, cached (rare path). The process's
    ``service/pid@host`` is kept whole; an owner too long for ``MAX_TAG_BYTES`` is cut to fit
    (never dropped: the server view still names it, by its start)."""
    with _lock:
        key = owner if (owner in _tags or len(_tags) < MAX_TAGGED_OWNERS) else "other"
        tag = _tags.get(key)
        if tag is None:
            head, tail = f"/*application='{_quote(CONFIG.application)}',owner='", "'*/ "
            text = head + _quote(_fit(key, MAX_TAG_BYTES - len(head) - len(tail))) + tail
            tag = _tags[key] = (text, text.replace("%", "%%"))
        return tag


def load(settings: Any, application: str) -> None:
    """The settings of the tags, and this process's ``service/pid@host`` (at install, after fork)."""
    CONFIG.tag, CONFIG.trace = settings.statement_tag, settings.statement_tag_trace
    CONFIG.owner_form, CONFIG.application = settings.statement_tag_owner, application
    reset()


def reset() -> None:
    """A new identity (service, fork): tags are rebuilt from now on, slots given anew."""
    global _generation
    with _lock:
        _tags.clear()
        _slot_tags.clear()
        _slots.clear()
        _conn_slots.clear()
        _generation += 1
    PINGS.clear()


# --------------------------------------------------------------------------- connection tokens

#: on a connection record: (generation, slot), slot -1 when its tag carries the owner's name
SLOT = "_telemetry_tag_slot"
_generation = 0
#: the slots of this process's live tokened connections (the lowest free one is given: a bounded
#: set of texts per process, whatever the pools' churn)
_slots: set[int] = set()
_slot_tags: dict[int, tuple[str, str]] = {}


def _prepares(rec: Any) -> bool:
    """Whether ``rec``'s driver prepares statements and keeps them by their text: SQLAlchemy's
    asyncpg adapter with its statement cache (``prepared_statement_cache_size``, 100 by default),
    psycopg 3 with a ``prepare_threshold`` (5 by default)."""
    adapter: Any = getattr(rec, "dbapi_connection", None)
    if hasattr(adapter, "_prepared_statement_cache"):
        return adapter._prepared_statement_cache is not None
    return getattr(getattr(rec, "driver_connection", None), "prepare_threshold", None) is not None


def _take_slot() -> tuple[int, int]:
    """(generation, the lowest free slot), taken."""
    with _lock:
        slot = next(n for n in range(len(_slots) + 1) if n not in _slots)
        _slots.add(slot)
        return _generation, slot


def _token(found: tuple[int, int] | None) -> str:
    """``service/pid@host#slot`` of a connection's (generation, slot), "" without a current one."""
    if not found or found[1] < 0 or found[0] != _generation:
        return ""
    return f"{CONFIG.application}#{found[1]}"


def _free(generation: int, slot: int) -> None:
    with _lock:
        if generation == _generation:
            _slots.discard(slot)


def _slot_of(rec: Any) -> tuple[int, int]:
    """(generation, slot) of ``rec``, decided at its first statement (rare path)."""
    form = CONFIG.owner_form
    if form == "text" or (form == "auto" and not _prepares(rec)):
        found = (_generation, -1)
    else:
        found = _take_slot()
        weakref.finalize(rec, _free, *found)
    rec.__dict__[SLOT] = found
    return found


def token_of(rec: Any) -> str:
    """``service/pid@host#slot`` of a tokened connection record (what its owner row carries and
    the server view joins the tag's ``application`` and ``conn`` on), else ""."""
    return _token(rec.__dict__.get(SLOT))


#: driver connections outside SQLAlchemy that carry a token (asyncpg's pool: its connections have
#: slots and no ``__dict__``): id(connection) -> (generation, slot), dropped when it is collected
_conn_slots: dict[int, tuple[int, int]] = {}


def _drop_conn(key: int, generation: int, slot: int) -> None:
    if _conn_slots.get(key, (None,))[0] == generation:
        del _conn_slots[key]
    _free(generation, slot)


def conn_tag(conn: Any, prepares: bool) -> str:
    """The tag of a statement on a driver connection outside SQLAlchemy (asyncpg's pool): its
    token where its driver caches prepared statements (``prepares``), else the owner's name."""
    form = CONFIG.owner_form
    if form == "token" or (form == "auto" and prepares):
        found = _conn_slots.get(id(conn))
        if found is None or found[0] != _generation:
            found = _conn_slots[id(conn)] = _take_slot()
            weakref.finalize(conn, _drop_conn, id(conn), *found)
        return (_slot_tags.get(found[1]) or _slot_tag(found[1]))[0]
    owner = _owner_get()
    text = (_tags.get(owner) or _make(owner))[0]
    return _traced(text) if CONFIG.trace else text


def conn_token(conn: Any) -> str:
    """``service/pid@host#slot`` of a tokened driver connection (its owner row), else ""."""
    return _token(_conn_slots.get(id(conn)))


def _slot_tag(slot: int) -> tuple[str, str]:
    with _lock:
        tag = _slot_tags.get(slot)
        if tag is None:
            text = f"/*application='{_quote(CONFIG.application)}',conn='{slot}'*/ "
            tag = _slot_tags[slot] = (text, text.replace("%", "%%"))
        return tag


def _traced(text: str) -> str:
    """``statement_tag_trace``: the active span's ``traceparent`` too (one text per request)."""
    from .log import trace_ids

    ids = trace_ids()
    if not ids:
        return text
    parent = _quote(f"00-{ids['trace_id']}-{ids['span_id']}-01")
    return text[:-3] + f",traceparent='{parent}'*/ "


#: set on a connection record when its transaction begins: True, the first statement takes it;
#: EACH on an autocommit connection, where every statement is a transaction of its own
_FIRST = "_telemetry_first_statement"
EACH = "each"
#: while a transaction is open: when its last statement ended (or it began), and the seconds it
#: sat idle between statements so far (the code doing something else, an awaited call)
_LAST = "_telemetry_statement_end"
_IDLE = "_telemetry_transaction_idle"
#: the name of the server-side cursor a statement declared on the record (psycopg's ServerCursor,
#: psycopg2's named cursor): its FETCH and CLOSE, issued by the driver, carry no tag
CURSOR = "_telemetry_cursor"
_perf = time.perf_counter


def _rec(context: Any) -> Any:
    """The connection record a statement runs on."""
    return getattr(getattr(context, "_dbapi_connection", None), "_connection_record", None)


def _after(rec: Any, t0: float) -> None:
    """A statement on ``rec`` ran from ``t0`` to now: the first of its transaction (or any, in
    autocommit) is timed; inside a transaction, the gap before it counts as idle."""
    t1 = _perf()
    d = rec.__dict__
    first = d.get(_FIRST)
    if first:
        if first is True:
            del d[_FIRST]
        _timed(rec, t1 - t0)
    last = d.get(_LAST)
    if last is not None:
        d[_IDLE] = d.get(_IDLE, 0.0) + (t0 - last)
        d[_LAST] = t1


def _timed(rec: Any, seconds: float, what: str = "first") -> None:
    """Hand ``rec``'s ``seconds`` to ``CONFIG.observe_<what>`` (first, end or idle)."""
    try:
        observe = getattr(CONFIG, f"observe_{what}")
        if observe is not None:
            observe(rec, seconds)
    except Exception as exc:
        hook_error(f"sqltag.{what}", exc)


#: pool_pre_ping's round trip (seconds) by the checking-out thread or asyncio task, until that
#: checkout takes it: behind a transaction pooler the ping waits for a server connection, and
#: it is that wait, not the pool's (bounded: a checkout that fails after its ping leaves one)
PINGS: dict[Any, float] = {}
MAX_PINGS = 1000


def holder_key() -> Any:
    """The checking-out thread, or the asyncio task (SQLAlchemy's greenlet runs inside it)."""
    thread, task = holder()
    return thread if task is None else task


def _autocommit(dbapi_connection: Any) -> bool:
    """Whether the driver connection runs each statement in its own transaction (psycopg,
    psycopg2, SQLAlchemy's asyncpg adapter all say so in ``autocommit``)."""
    driver = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)  # a pool's fairy
    return getattr(driver, "autocommit", False) is True


def tag_dialect(dialect: Any) -> None:
    """Tag every statement this dialect runs from now on; time the first statement of each
    transaction (behind a transaction pooler that is when a server connection is assigned; in
    autocommit every statement), each commit or rollback, and the time a transaction sat idle
    between its statements (idempotent; PostgreSQL only)."""
    if getattr(dialect, "name", None) != "postgresql" or dialect.__dict__.get(_ATTR):
        return
    percent = getattr(dialect, "paramstyle", "") in ("format", "pyformat")
    do_execute, no_params, many = dialect.do_execute, dialect.do_execute_no_params, dialect.do_executemany
    do_begin = dialect.do_begin
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback
    do_ping = dialect.do_ping

    def ping(dbapi_connection: Any) -> Any:
        t0 = _perf()
        try:
            return do_ping(dbapi_connection)
        finally:
            try:
                if len(PINGS) >= MAX_PINGS:
                    PINGS.clear()
                PINGS[holder_key()] = _perf() - t0
            except Exception as exc:
                hook_error("sqltag.ping", exc)

    def ended(end: Any, dbapi_connection: Any) -> Any:
        rec = getattr(dbapi_connection, "_connection_record", None)
        if rec is None:
            return end(dbapi_connection)
        d = rec.__dict__
        last, idle = d.pop(_LAST, None), d.pop(_IDLE, 0.0)
        if d.get(_FIRST):  # no statement ran (or autocommit): no round trip to time
            return end(dbapi_connection)
        t0 = _perf()
        try:
            return end(dbapi_connection)
        finally:
            _timed(rec, _perf() - t0, "end")
            if last is not None:
                _timed(rec, idle + (t0 - last), "idle")

    def commit(dbapi_connection: Any) -> Any:
        return ended(do_commit, dbapi_connection)

    def rollback(dbapi_connection: Any) -> Any:
        return ended(do_rollback, dbapi_connection)

    def begin(dbapi_connection: Any) -> Any:
        rec = getattr(dbapi_connection, "_connection_record", None)
        if rec is not None:
            try:
                d = rec.__dict__
                if _autocommit(dbapi_connection):
                    d[_FIRST] = EACH
                    d.pop(_LAST, None)
                else:
                    d[_FIRST] = True
                    d[_LAST] = _perf()
                    d[_IDLE] = 0.0
            except Exception as exc:
                hook_error("sqltag.begin", exc)
        return do_begin(dbapi_connection)

    def tagged(statement: str, with_params: bool, rec: Any = None) -> str:
        if not CONFIG.tag:
            return statement
        try:
            if rec is not None:
                found = rec.__dict__.get(SLOT)
                if found is None or found[0] != _generation:
                    found = _slot_of(rec)
                if found[1] >= 0:  # a token: the same text for every owner (no trace id either)
                    pair = _slot_tags.get(found[1]) or _slot_tag(found[1])
                    return (pair[1] if (percent and with_params) else pair[0]) + statement
            owner = _owner_get()
            pair = _tags.get(owner) or _make(owner)
            text = pair[1] if (percent and with_params) else pair[0]
            if CONFIG.trace:
                text = _traced(text)
            return text + statement
        except Exception as exc:
            hook_error("sqltag.tag", exc)
            return statement

    def execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> Any:
        rec = _rec(context)
        if rec is None:
            return do_execute(cursor, tagged(statement, parameters is not None), parameters, context)
        name = getattr(cursor, "name", None)
        if name:  # a server-side cursor: its FETCH and CLOSE are joined to the owner by this name
            rec.__dict__[CURSOR] = name
        t0 = _perf()
        try:
            return do_execute(cursor, tagged(statement, parameters is not None, rec), parameters, context)
        finally:
            _after(rec, t0)

    def execute_no_params(cursor: Any, statement: str, context: Any = None) -> Any:
        rec = _rec(context)
        if rec is None:
            return no_params(cursor, tagged(statement, False), context)
        name = getattr(cursor, "name", None)
        if name:
            rec.__dict__[CURSOR] = name
        t0 = _perf()
        try:
            return no_params(cursor, tagged(statement, False, rec), context)
        finally:
            _after(rec, t0)

    def executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> Any:
        rec = _rec(context)
        if rec is None:
            return many(cursor, tagged(statement, True), parameters, context)
        t0 = _perf()
        try:
            return many(cursor, tagged(statement, True, rec), parameters, context)
        finally:
            _after(rec, t0)

    dialect.do_execute, dialect.do_execute_no_params, dialect.do_executemany = execute, execute_no_params, executemany
    dialect.do_begin, dialect.do_commit, dialect.do_rollback = begin, commit, rollback
    dialect.do_ping = ping
    dialect.__dict__[_ATTR] = True
    _tagged.add(dialect)


def untag_dialect(dialect: Any) -> None:
    if dialect.__dict__.pop(_ATTR, None):
        for name in ("do_execute", "do_execute_no_params", "do_executemany", "do_begin", "do_commit", "do_rollback",
                     "do_ping"):  # fmt: skip
            dialect.__dict__.pop(name, None)


def untag_all() -> None:
    for dialect in list(_tagged):
        untag_dialect(dialect)
    _tagged.clear()
    reset()


# --------------------------------------------------------------------------- reading tags

_TAG = re.compile(r"/\*(?P<body>[^*]*(?:\*(?!/)[^*]*)*)\*/")
_PAIR = re.compile(r"(\w+)='([^']*)'")


def parse(query: str | None) -> dict[str, str]:
    """The sqlcommenter pairs of the first comment of ``query`` that carries an
    ``application``; ``{}`` when there is none (a session that is not ours)."""
    if not query or "/*" not in query:
        return {}
    for match in _TAG.finditer(query[:2048]):
        pairs = {k: urllib.parse.unquote(v) for k, v in _PAIR.findall(match.group("body"))}
        if "application" in pairs:
            return pairs
    return {}
