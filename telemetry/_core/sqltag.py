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
* Bounded texts: the tag holds the process's ``service/pid@host`` and the owner (route template,
  task name, ``db_owner``; capped like the owner label), no per-request id unless the user asks
  for the trace id (``statement_tag_trace``), so prepared-statement caches (asyncpg's,
  psycopg's, pgbouncer's ``max_prepared_statements``) see a bounded set of texts per process.
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
from .owner import OWNER

_owner_get = OWNER.get
_ATTR = "_telemetry_sqltag"
#: distinct owners with a tag of their own; further ones share the "other" tag (texts stay bounded)
MAX_TAGGED_OWNERS = 1000


class _Config:
    application = ""  # service/pid@host, set by the SQLAlchemy integration (and after fork)
    trace = False
    tag = True  # statement tags (statement_tag); the first-statement timing is always on
    #: (connection record, seconds): the first statement of a transaction took that long
    observe_first: Any = None
    #: (connection record, seconds): its commit or rollback took that long (a plain round trip on
    #: the server connection the transaction already has: the baseline the first statement's
    #: wait is read against)
    observe_end: Any = None


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


def reset() -> None:
    """A new identity (service, fork): tags are rebuilt from now on."""
    with _lock:
        _tags.clear()


def _traced(text: str) -> str:
    """``statement_tag_trace``: the active span's ``traceparent`` too (one text per request)."""
    from .log import trace_ids

    ids = trace_ids()
    if not ids:
        return text
    parent = _quote(f"00-{ids['trace_id']}-{ids['span_id']}-01")
    return text[:-3] + f",traceparent='{parent}'*/ "


#: set on a connection record when its transaction begins; the first statement takes it
_FIRST = "_telemetry_first_statement"
_perf = time.perf_counter


def _first(context: Any) -> Any:
    """The connection record if this statement is the first of its transaction, else None."""
    rec = getattr(getattr(context, "_dbapi_connection", None), "_connection_record", None)
    if rec is not None and rec.__dict__.pop(_FIRST, False):
        return rec
    return None


def _timed(rec: Any, t0: float, what: str = "first") -> None:
    """Hand ``rec``'s round trip since ``t0`` to ``CONFIG.observe_<what>`` (first or end)."""
    try:
        observe = getattr(CONFIG, f"observe_{what}")
        if observe is not None:
            observe(rec, _perf() - t0)
    except Exception as exc:
        hook_error(f"sqltag.{what}", exc)


def tag_dialect(dialect: Any) -> None:
    """Tag every statement this dialect runs from now on, and time the first statement of each
    transaction: behind a transaction pooler that is when a server connection is assigned
    (idempotent; PostgreSQL only)."""
    if getattr(dialect, "name", None) != "postgresql" or dialect.__dict__.get(_ATTR):
        return
    percent = getattr(dialect, "paramstyle", "") in ("format", "pyformat")
    do_execute, no_params, many = dialect.do_execute, dialect.do_execute_no_params, dialect.do_executemany
    do_begin = dialect.do_begin
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

    def ended(end: Any, dbapi_connection: Any) -> Any:
        rec = getattr(dbapi_connection, "_connection_record", None)
        if rec is None or rec.__dict__.get(_FIRST):  # no statement ran: no round trip to time
            return end(dbapi_connection)
        t0 = _perf()
        try:
            return end(dbapi_connection)
        finally:
            _timed(rec, t0, "end")

    def commit(dbapi_connection: Any) -> Any:
        return ended(do_commit, dbapi_connection)

    def rollback(dbapi_connection: Any) -> Any:
        return ended(do_rollback, dbapi_connection)

    def begin(dbapi_connection: Any) -> Any:
        rec = getattr(dbapi_connection, "_connection_record", None)
        if rec is not None:
            rec.__dict__[_FIRST] = True
        return do_begin(dbapi_connection)

    def tagged(statement: str, with_params: bool) -> str:
        if not CONFIG.tag:
            return statement
        try:
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
        rec = _first(context)
        if rec is None:
            return do_execute(cursor, tagged(statement, parameters is not None), parameters, context)
        t0 = _perf()
        try:
            return do_execute(cursor, tagged(statement, parameters is not None), parameters, context)
        finally:
            _timed(rec, t0)

    def execute_no_params(cursor: Any, statement: str, context: Any = None) -> Any:
        rec = _first(context)
        if rec is None:
            return no_params(cursor, tagged(statement, False), context)
        t0 = _perf()
        try:
            return no_params(cursor, tagged(statement, False), context)
        finally:
            _timed(rec, t0)

    def executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> Any:
        rec = _first(context)
        if rec is None:
            return many(cursor, tagged(statement, True), parameters, context)
        t0 = _perf()
        try:
            return many(cursor, tagged(statement, True), parameters, context)
        finally:
            _timed(rec, t0)

    dialect.do_execute, dialect.do_execute_no_params, dialect.do_executemany = execute, execute_no_params, executemany
    dialect.do_begin, dialect.do_commit, dialect.do_rollback = begin, commit, rollback
    dialect.__dict__[_ATTR] = True
    _tagged.add(dialect)


def untag_dialect(dialect: Any) -> None:
    if dialect.__dict__.pop(_ATTR, None):
        for name in ("do_execute", "do_execute_no_params", "do_executemany", "do_begin", "do_commit", "do_rollback"):
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
