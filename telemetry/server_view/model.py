"""The shared view's pure model: names, statements, lock chains, the owner join, SHOW columns.
No I/O: unit-tested without a server (``tests/server_view/test_shared_model.py``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from telemetry._core import bounds as _bounds
from telemetry._core.holds import OwnerRow

_APP_RE = re.compile(r"^(?P<service>.+)/(?P<pid>\d+)@(?P<host>.*)$")

def parse_application(name: str) -> tuple[str, str, str]:
    """``service/pid@host`` -> (service, pid, host); another name -> (name, "", "")."""
    m = _APP_RE.match(name or "")
    if m is None:
        return (name or "unnamed")[:60], "", ""
    return m["service"], m["pid"], m["host"]


#: the names transaction poolers give every server connection instead of the client's (Supabase's
#: Supavisor; pgbouncer, PgCat and Odyssey where configured to; none at all)
POOLER_NAMES = frozenset({"supavisor", "pgbouncer", "pgcat", "odyssey", ""})


def tag_verdict(backend_app: str, tag_app: str, this_host: str, alive: Callable[[int], bool],
                claimed: bool = False) -> str | None:
    """Whether a statement tag read on a backend is ours: None when it is, else why not.

    Believed: the backend carries the tag's own ``service/pid@host`` (a direct connection, or a
    pooler that passes names through); or a pooler renamed the backend and the tag names a
    process that is alive, where this host can tell (its own host); or one of this host's
    processes claims the backend (its owner rows). Not believed: a session of another client
    (``psql`` running a statement copied from ``pg_stat_activity``: ``foreign_session``), a tag
    naming a process of this host that is gone (``dead_process``)."""
    if backend_app == tag_app or claimed:
        return None
    _service, pid, host = parse_application(tag_app)
    if not pid:
        return "malformed"
    if (backend_app or "").strip().lower() not in POOLER_NAMES:
        return "foreign_session"
    if host == this_host and not alive(int(pid)):
        return "dead_process"
    return None


def app_label(name: str) -> str:
    """The ``application`` label of a client: the service of our ``service/pid@host`` names,
    else the foreign name itself, each kind capped (``_bounds``): a client that rotates its
    ``application_name`` does not churn series."""
    service, pid, _host = parse_application(name)
    return _bounds.SERVICES(service) if pid else _bounds.FOREIGN(service)


#: a literal's closing quote may be missing: PostgreSQL cuts ``query`` at
#: ``track_activity_query_size`` bytes, and what is left of the literal must not show
_LITERAL = re.compile(
    r"\$(?P<tag>[A-Za-z_]*)\$.*?(?:\$(?P=tag)\$|\Z)"  # dollar-quoted
    r"|[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z)"  # escape strings: E'it\'s'
    r"|[bBxXnN]?'(?:[^']|'')*(?:'|\Z)"  # string literals
    r"|(?<![\w$.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w$])",  # numbers
    re.S,
)


_LEADING_COMMENTS = re.compile(r"^\s*(?:/\*.*?\*/\s*)+", re.S)


def statement(text: str | None, limit: int = 300) -> str:
    """The statement without its parameters: literals (interpolated by client-side binding
    drivers such as psycopg2) become ``?``; ``$1`` placeholders stay; leading comments (our
    statement tag among them: its fields are reported on their own) go."""
    if not text:
        return ""
    text = _LEADING_COMMENTS.sub("", text)
    return " ".join(_LITERAL.sub("?", text).split())[:limit]


def chain_root(blockers: list[int], chain: dict[int, list[int]]) -> int:
    """The blocker that matters: the first one up the chain holding its lock without waiting
    itself (a row's second waiter waits for the first waiter, which waits for the holder)."""
    seen: set[int] = set()
    queue = list(blockers)
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        if pid not in chain:
            return pid
        queue.extend(chain[pid])
    return blockers[0]


#: a driver's statement on a server-side cursor: FETCH FORWARD 10 FROM "c_7f_1", CLOSE "c_7f_1"
_CURSOR_STATEMENT = re.compile(r'(?is)^\s*(?:fetch|move|close)\b[^"]*?"?([A-Za-z_][\w$]*)"?\s*;?\s*$')


class Owners:
    """The host's held connections, joined by the keys a server or pooler row carries: the
    backend pid (a direct connection) or the client's address *and* port (the pooler's
    ``SHOW CLIENTS addr/port``, the server's ``client_addr/client_port``). Never by port alone:
    another host, or a psql session on another address, can use the same port number."""

    def __init__(self, rows: list[Any], refresh: Callable[[], list[Any]] | None = None) -> None:
        #: read the rows again, once, when a token is missing: a statement that began after
        #: ``rows`` were read carries a slot they do not show yet
        self.refresh = refresh
        self.by_pid: dict[Any, OwnerRow] = {}
        self.by_peer: dict[tuple[str, int], OwnerRow] = {}
        self.by_cursor: dict[str, OwnerRow | None] = {}
        self.by_conn: dict[str, OwnerRow] = {}
        ambiguous: set[str] = set()
        for raw in rows:
            row = OwnerRow.read(raw)
            if row is None:
                continue
            if row.backend_pid:
                self.by_pid[row.backend_pid] = row
            if row.local_port and row.local_address:
                self.by_peer[(str(row.local_address), int(row.local_port))] = row
            if row.conn:
                self.by_conn[str(row.conn)] = row
            if row.cursor:  # a name two holders use (a fixed name in two processes) joins neither
                name = str(row.cursor)
                self.by_cursor[name] = row if name not in self.by_cursor and name not in ambiguous else None
                if self.by_cursor[name] is None:
                    ambiguous.add(name)

    def cursor(self, query: str | None) -> OwnerRow | None:
        """The holder of the server-side cursor a driver's ``FETCH``, ``MOVE`` or ``CLOSE`` names
        (they carry no statement tag: the cursor's name, published by its holder, joins them)."""
        match = _CURSOR_STATEMENT.match(query or "")
        return self.by_cursor.get(match.group(1)) if match else None

    def token(self, tag: dict[str, str]) -> OwnerRow | None:
        """The holder of the connection a token tag (``application`` and ``conn``, no owner)
        names: its process publishes the slot with its owner."""
        key = f"{tag.get('application', '')}#{tag.get('conn', '')}"
        if key not in self.by_conn and self.refresh is not None:
            refresh, self.refresh = self.refresh, None
            for raw in refresh():
                row = OwnerRow.read(raw)
                if row is not None and row.conn:
                    self.by_conn.setdefault(str(row.conn), row)
        return self.by_conn.get(key)

    def peer(self, addr: Any, port: Any) -> OwnerRow | None:
        if not addr or not port:
            return None
        try:
            return self.by_peer.get((str(addr), int(port)))
        except (TypeError, ValueError):
            return None


class Columns:
    """Reads SHOW rows by column name. pgbouncer versions differ in their columns (1.18 has
    ``sv_tested`` and ``total_xact_count``; others add or drop some): a missing column is noted
    and its figures left out, never fatal to the rest of the view."""

    def __init__(self) -> None:
        self.missing: set[str] = set()

    def get(self, command: str, row: dict[str, Any], name: str) -> Any:
        if name in row:
            return row[name]
        self.missing.add(f"{command}.{name}")
        return None

    def num(self, command: str, row: dict[str, Any], name: str) -> float | None:
        value = self.get(command, row, name)
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            self.missing.add(f"{command}.{name}")
            return None


def wait_seconds(cols: Columns, command: str, row: dict[str, Any], seconds: str, micros: str) -> float | None:
    whole = cols.num(command, row, seconds)
    if whole is None:
        return None
    return whole + (float(row.get(micros) or 0) / 1e6)
