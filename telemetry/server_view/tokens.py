"""Connection tokens across hosts. A connection whose driver keeps prepared statements by their
text carries a token in its statement tags, not its owner (``_core/sqltag.py``); its process
publishes which owner holds the token in its owner rows, which only its own host reads. So each
host that follows tells the deployment's poller its tokened owner rows every interval, over the
server (``NOTIFY`` on ``TOKEN_CHANNEL``: nothing to create), and the poller joins them like its
own host's for a few intervals (docs/hosted-poolers.md)."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from telemetry._core import sqltag as _sqltag
from telemetry._core.holds import OwnerRow

#: where a following host tells the deployment's poller who holds its tokened connections
TOKEN_CHANNEL = "telemetry_shared_view_tokens"
#: a NOTIFY payload's limit is 8000 bytes: rows are sent in chunks below it
PAYLOAD_BYTES = 7000
#: rows told per round, and rows heard kept, at most (the oldest heard go first)
TELL_MAX = 500
HEARD_MAX = 10_000
OWNER_CHARS = 200


def _literal(text: str) -> str:
    """A standard SQL string literal of ASCII ``text`` (``json.dumps`` escapes the rest)."""
    return "'" + text.replace("'", "''") + "'"


def tell_sql(rows: list[Any]) -> str | None:
    """One statement telling the deployment's poller the tokened rows among ``rows``."""
    chunks: list[str] = []
    chunk: list[list[Any]] = []
    size = 2
    for raw in rows:
        row = OwnerRow.read(raw)
        if row is None or not row.conn:
            continue
        item = [str(row.conn), str(row.service), str(row.owner)[:OWNER_CHARS], str(row.trace_id or ""),
                float(row.since or 0.0)]  # fmt: skip
        text = json.dumps(item)
        if chunk and size + len(text) + 1 > PAYLOAD_BYTES:
            chunks.append(json.dumps(chunk))
            chunk, size = [], 2
        chunk.append(item)
        size += len(text) + 1
        if len(chunks) * 20 + len(chunk) >= TELL_MAX:
            break
    if chunk:
        chunks.append(json.dumps(chunk))
    if not chunks:
        return None
    values = ", ".join(_literal(c) for c in chunks)
    return f"select pg_notify('{TOKEN_CHANNEL}', v) from unnest(array[{values}]::text[]) v"


class TokenTable:
    """The tokened owner rows other hosts told, as a part of the poller (which provides
    ``settings`` and ``_query``)."""

    settings: Any

    def _query(self, target: str, url: str, sqls: list[str], *, admin: bool) -> list[list[dict[str, Any]]]:
        raise NotImplementedError

    def tell_tokens(self, rows: list[Any]) -> None:
        """This host follows: tell the deployment's poller who holds its tokened connections (a
        failure is the election's to report, next round)."""
        tell = tell_sql(rows)
        if tell and self.settings.server_view_url:
            with contextlib.suppress(Exception):
                self._query("db_server", self.settings.server_view_url, [tell], admin=False)

    def __init__(self) -> None:
        self.told_tokens: dict[str, tuple[OwnerRow, float]] = {}
        #: episodes whose event waits for a token's holder: key -> when it first could be reported
        self.awaiting: dict[Any, float] = {}

    def horizon(self) -> float:
        """How long a told row counts, and an event waits for one: three intervals and a timeout."""
        s = self.settings
        return 3 * s.shared_view_interval_seconds + s.shared_view_timeout_seconds

    def wait_for_token(self, key: Any, parties: list[tuple[dict[str, Any] | None, str]]) -> bool:
        """Whether an episode's event (a lock wait, an idle transaction) waits a round: one of its
        ``(row, owner)`` parties is unnamed and its tag carries a token, whose holder its host
        tells every interval. Past ``horizon()`` it is reported as it is (owner unknown)."""
        pending = getattr(self.settings, "statement_tag", True) and any(
            row is not None and not owner and row.get("state") != "idle"
            and "conn" in (tag := _sqltag.parse(row.get("query"))) and "owner" not in tag
            for row, owner in parties)  # fmt: skip
        if not pending:
            self.awaiting.pop(key, None)
            return False
        now = time.monotonic()
        first = self.awaiting.setdefault(key, now)
        if len(self.awaiting) > HEARD_MAX:  # episodes that ended while waiting
            for old in sorted(self.awaiting, key=self.awaiting.__getitem__)[: len(self.awaiting) - HEARD_MAX]:
                del self.awaiting[old]
        if now - first < self.horizon():
            return True
        del self.awaiting[key]
        return False

    def heard_tokens(self, payload: str) -> None:
        """A following host's rows: ``[[conn, service, owner, trace_id, since], ...]``."""
        try:
            items = json.loads(payload)
            now = time.monotonic()
            for conn, service, owner, trace_id, since in items[:TELL_MAX]:
                self.told_tokens[str(conn)] = (OwnerRow(None, None, str(service), str(owner)[:OWNER_CHARS],
                                                        float(since), str(trace_id), "", "", str(conn)), now)  # fmt: skip
        except (ValueError, TypeError):
            return  # not one of ours
        if len(self.told_tokens) > HEARD_MAX:
            for old in sorted(self.told_tokens, key=lambda k: self.told_tokens[k][1])[: len(self.told_tokens) - HEARD_MAX]:
                del self.told_tokens[old]

    def told_rows(self) -> list[OwnerRow]:
        """The rows heard within the last few intervals (a host tells every interval: a row not
        told again was released)."""
        horizon = time.monotonic() - self.horizon()
        for conn in [c for c, (_row, at) in self.told_tokens.items() if at < horizon]:
            del self.told_tokens[conn]
        return [row for row, _at in self.told_tokens.values()]
