"""The shared view's pure parts, without a server: the owner join (address and port, never
port alone), one idle-in-transaction event per transaction whatever the poller's clock does,
literals hidden even when PostgreSQL cut the statement, passwords masked in every URL form,
and the pooler's figures from SHOW rows that lack columns."""

from __future__ import annotations

from typing import Any

from telemetry._core.settings import mask_url
from telemetry.server_view import model as _shared_model
from telemetry.server_view import poller as _shared
from telemetry.testing import capture_events


def _row(pid: int, port: int, owner: str, addr: str, service: str = "api") -> list[Any]:
    return [pid, port, service, owner, 0.0, "", addr]


def test_owners_are_joined_on_address_and_port() -> None:
    owners = _shared_model.Owners([_row(101, 45678, "/reports/{id}", "127.0.0.1"),
                             _row(202, 45678, "save-concept", "127.0.0.2", service="worker")])  # fmt: skip
    assert owners.peer("127.0.0.1", 45678).owner == "/reports/{id}"  # type: ignore[union-attr]
    assert owners.peer("127.0.0.2", "45678").owner == "save-concept"  # type: ignore[union-attr]
    assert owners.peer("127.0.0.3", 45678) is None  # a session from elsewhere on the same port
    assert owners.peer("", 45678) is None and owners.peer("127.0.0.1", None) is None
    # a row without an address (an older process file) is joined by its backend pid only
    legacy = _shared_model.Owners([[303, 5555, "api", "/old", 0.0, ""]])
    assert legacy.peer("127.0.0.1", 5555) is None and legacy.by_pid[303].owner == "/old"


class _Settings:
    idle_in_transaction_event_seconds = 1.0


def test_one_idle_in_transaction_event_per_transaction_however_late_the_poll() -> None:
    """The key is the server's own xact_start: a busy poller that reads xact_age late (so that
    'now minus age' moves) does not report the same transaction again."""
    poller = _shared._Poller(_Settings())
    row = {"pid": 7, "state": "idle in transaction", "xact_start": 1_700_000_000.123456,
           "xact_age": 5.0, "state_age": 4.0, "app": "api/1@h", "query": "select 1"}  # fmt: skip

    def owner_of(_row: dict[str, Any]) -> tuple[str, str, str, str]:
        return "api", "/export", "h", ""

    with capture_events("db_idle_in_transaction") as events:
        for age in (5.0, 7.3, 6.1, 12.0):  # as a loaded poller reads them
            poller._idle_events([dict(row, xact_age=age, state_age=age - 1)], owner_of)
            poller.emit_pending()
        # a new transaction on the same backend is a new event
        poller._idle_events([dict(row, xact_start=1_700_000_100.5, xact_age=3.0, state_age=2.0)], owner_of)
        poller.emit_pending()
    assert len(events) == 2, events
    assert events[0]["idle_owner"] == "/export"


def test_literals_are_hidden_even_when_the_statement_was_cut() -> None:
    assert _shared_model.statement("insert into tok values ('sk_live_abcdef") == "insert into tok values (?"
    assert _shared_model.statement("select E'it\\'s a sec") == "select ?"
    assert _shared_model.statement("select $q$secret body") == "select ?"
    assert _shared_model.statement("select 'a', 'b' where x = 'c") == "select ?, ? where x = ?"


def test_passwords_are_masked_in_every_url_form() -> None:
    assert mask_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("postgresql://u@h/db?sslmode=require&password=secret") == "postgresql://u@h/db?sslmode=require&password=***"
    assert mask_url("host=h user=u password=secret dbname=d") == "host=h user=u password=*** dbname=d"
    assert mask_url("host=h password='s e c' dbname=d") == "host=h password=*** dbname=d"
    assert mask_url("postgresql://h/db?application_name=x") == "postgresql://h/db?application_name=x"


def test_pooler_rows_without_some_columns_publish_the_rest() -> None:
    poller = _shared._Poller(_Settings())
    cols = _shared_model.Columns()
    pools = [{"database": "app", "user": "u", "cl_active": 2, "cl_waiting": 3, "sv_active": 4,
              "sv_idle": 0, "sv_used": 0, "sv_login": 0, "maxwait": 1, "maxwait_us": 500000}]  # fmt: skip
    stats = [{"database": "app", "total_wait_time": 2_000_000}]
    servers = [{"database": "app", "remote_pid": 9}]  # no link column
    try:
        poller._publish_pooler(cols, pools, stats, [], servers, [], {})
        published = {(n, lb): v for n, lb, v in _shared.PUBLISHED.pooler}
    finally:
        _shared.PUBLISHED.reset()
    assert cols.missing == {"POOLS.sv_tested", "STATS.total_xact_count", "SERVERS.link"}
    lb = (("database", "app"), ("user", "u"))
    assert published[("pgbouncer_clients", lb + (("state", "waiting"),))] == 3
    assert published[("pgbouncer_client_maxwait_seconds", lb)] == 1.5
    assert published[("pgbouncer_client_wait_seconds_total", (("database", "app"),))] == 2.0
    assert not any(n == "pgbouncer_transactions_total" for n, _lb in published)


def test_a_tag_is_believed_only_where_it_can_be_ours():
    """The verdict on a tag read on a backend (``_shared_model.tag_verdict``)."""
    from telemetry.server_view.model import tag_verdict

    alive = {10: True, 11: False}.get
    ours = "api/10@h1"
    assert tag_verdict(ours, ours, "h1", alive) is None  # direct, or a pooler passing names through
    assert tag_verdict("psql", ours, "h1", alive) == "foreign_session"  # a copied statement
    assert tag_verdict("Supavisor", ours, "h1", alive) is None  # renamed by the pooler, alive here
    assert tag_verdict("Supavisor", "api/11@h1", "h1", alive) == "dead_process"
    assert tag_verdict("Supavisor", "api/11@h2", "h1", alive) is None  # another host: not checkable here
    assert tag_verdict("myapp", ours, "h1", alive, claimed=True) is None  # our owner rows claim the backend
    assert tag_verdict("Supavisor", "api", "h1", alive) == "malformed"


def test_a_lock_wait_is_one_episode_when_waitstart_appears_between_two_polls() -> None:
    """pg_locks.waitstart reads null for a moment after a wait begins (the statement's start stands
    in for it); the next poll reads it set. The same blocked statement is reported once."""
    import types

    from telemetry.server_view.poller import _Poller

    poller = _Poller(types.SimpleNamespace(lock_wait_event_seconds=0.5, shared_view_cluster=True))
    rows = {7: {"pid": 7, "query": "update items set n = n + 1", "state": "active", "xact_age": 1.0},
            8: {"pid": 8, "query": "select 1", "state": "idle in transaction", "xact_age": 3.0}}

    def owner_of(row: dict) -> tuple[str, str, str, str]:
        return ("api", "PUT /items", "h", "") if row["pid"] == 7 else ("worker", "task", "h", "")

    def lock(wait_started: float, waited: float) -> dict:
        return {"pid": 7, "blockers": [8], "waited": waited, "wait_started": wait_started,
                "statement_started": 100.0, "locktype": "tuple", "mode": "ExclusiveLock", "relation": "items"}

    poller._lock_events([lock(100.0, 0.6)], rows, owner_of)  # waitstart null: the statement's start
    poller._lock_events([lock(100.004, 0.8)], rows, owner_of)  # waitstart set, 4 ms later
    assert [event for event, _fields in poller.pending] == ["db_lock_wait"], poller.pending


def test_a_new_leader_of_the_host_never_reports_what_the_last_one_reported(tmp_path) -> None:
    """The host's leader exited (a recycled worker) while an episode lasted; the next leader of the
    host was not listening when it was told to the other hosts: it reads the episodes from the
    multiprocess directory (a CI run saw two processes of one host report one lock wait)."""
    import types

    from telemetry.server_view.events import EPISODES_FILE
    from telemetry.server_view.poller import _Poller

    settings = types.SimpleNamespace(multiproc_dir=str(tmp_path), shared_view_cluster=True)
    first = _Poller(settings)
    told = ["lock|4242|1733412345.125", "idle|77|1733412000.5"]
    first.told = list(told)
    assert first.tell_sql() is not None
    assert (tmp_path / EPISODES_FILE).read_text().splitlines() == told
    second = _Poller(settings)
    second.recall()
    assert (4242, 1733412345.125) in second.locks_reported and (77, 1733412000.5) in second.idle_reported
    elsewhere = _Poller(types.SimpleNamespace(multiproc_dir=str(tmp_path / "other-host"), shared_view_cluster=True))
    elsewhere.recall()  # another host's directory holds none of them: it relies on NOTIFY
    assert not elsewhere.locks_reported and not elsewhere.idle_reported


def test_a_cursor_statement_is_joined_by_the_cursor_name_its_holder_published() -> None:
    """The driver's FETCH, MOVE and CLOSE carry no tag: the holder's published cursor name joins
    them; a name two holders publish (a fixed name in two processes) joins neither."""
    from telemetry._core.holds import OwnerRow
    from telemetry.server_view.model import Owners

    rows = [OwnerRow(None, None, "api", "GET /export", 0.0, "", "", "c_7f3a_1"),
            OwnerRow(None, None, "api", "GET /a", 0.0, "", "", "fixed"),
            OwnerRow(None, None, "worker", "nightly", 0.0, "", "", "fixed"),
            [11, 5432, "api", "old-row", 0.0, "", ""]]  # a row of an older version: no cursor  # fmt: skip
    owners = Owners(rows)
    for query in ('FETCH FORWARD 10 FROM "c_7f3a_1"', 'close "c_7f3a_1"', "MOVE 5 IN c_7f3a_1;"):
        found = owners.cursor(query)
        assert found is not None and found.owner == "GET /export", query
    assert owners.cursor('FETCH FORWARD 10 FROM "fixed"') is None
    assert owners.cursor("select * from c_7f3a_1") is None and owners.cursor(None) is None
    assert owners.by_pid[11].owner == "old-row"


def test_a_token_is_joined_to_the_row_its_process_published() -> None:
    """A token tag (``application`` and ``conn``, no owner) joins the row that carries the same
    ``service/pid@host#slot``: not another process's slot, not a row of an older version."""
    from telemetry._core.holds import OwnerRow
    from telemetry.server_view.model import Owners

    owners = Owners([OwnerRow(None, None, "api", "GET /a", 0.0, "t1", "", "", "api/7@h#0"),
                     OwnerRow(None, None, "api", "GET /b", 0.0, "", "", "", "api/8@h#0"),
                     [11, 5432, "api", "old-row", 0.0, "", "", ""]])  # fmt: skip
    found = owners.token({"application": "api/7@h", "conn": "0"})
    assert found is not None and found.owner == "GET /a" and found.trace_id == "t1"
    assert owners.token({"application": "api/7@h", "conn": "1"}) is None
    assert owners.token({"application": "api/9@h", "conn": "0"}) is None
    assert owners.by_pid[11].owner == "old-row"


def test_tokens_told_across_hosts_are_quoted_chunked_and_bounded() -> None:
    """What a following host tells: any owner's quotes stay inside the literal, each payload fits
    a NOTIFY (8,000 bytes), at most ``TELL_MAX`` rows a round; what the poller keeps is bounded
    and ages out."""
    import json
    import re

    from telemetry._core.holds import OwnerRow
    from telemetry.server_view import tokens

    hostile = "GET /x'); drop table t; --" + "\u65e5" * 300
    rows = [OwnerRow(None, None, "api", f"{hostile}{i}", 1.0, "", "", "", f"api/7@h#{i}") for i in range(2000)]
    rows.append(OwnerRow(11, 5432, "api", "no token", 1.0, "", ""))  # joined by pid on its own host
    sql = tokens.tell_sql(rows)
    assert sql is not None
    literals = re.findall(r"'((?:[^']|'')*)'", sql.split("array[", 1)[1])
    payloads = [lit.replace("''", "'") for lit in literals]
    assert payloads and all(len(p.encode()) < 8000 for p in payloads)
    told = [item for p in payloads for item in json.loads(p)]
    assert len(told) <= tokens.TELL_MAX and told[0][2].startswith("GET /x'); drop")
    assert "no token" not in sql and tokens.tell_sql(rows[-1:]) is None

    class Settings:
        shared_view_interval_seconds, shared_view_timeout_seconds = 0.2, 0.1

    table = tokens.TokenTable()
    table.settings = Settings()
    for p in payloads:
        table.heard_tokens(p)
    table.heard_tokens("lock|12|3.5")  # another channel's payload, or not ours: ignored
    for start in range(0, tokens.HEARD_MAX + 2500, tokens.TELL_MAX):  # 12,500 tokens of many hosts
        table.heard_tokens(json.dumps([[f"w/1@h#{i}", "w", "o", "", 0.0] for i in range(start, start + tokens.TELL_MAX)]))
    assert len(table.told_tokens) == tokens.HEARD_MAX
    assert {row.owner for row in table.told_rows()} <= {"o"} | {r.owner[: tokens.OWNER_CHARS] for r in rows}
    for conn in table.told_tokens:  # heard long ago: a host that stopped telling released them
        row, _at = table.told_tokens[conn]
        table.told_tokens[conn] = (row, 0.0)
    assert table.told_rows() == []


def test_an_event_waits_for_a_tokens_holder_within_the_horizon() -> None:
    """A lock or idle episode whose party carries a token nobody told yet waits (its host tells
    every interval); a named party, an idle backend or a tag with the owner's name does not; past
    the horizon the event goes out with the owner unknown."""
    from telemetry.server_view import tokens

    class Settings:
        shared_view_interval_seconds, shared_view_timeout_seconds, statement_tag = 0.2, 0.1, True

    table = tokens.TokenTable()
    table.settings = Settings()
    token = {"state": "active", "query": "/*application='w%2F1%40h',conn='0'*/ update t set n = 1"}
    named = {"state": "active", "query": "/*application='w%2F1%40h',owner='x'*/ update t set n = 1"}
    assert table.wait_for_token("k", [(token, ""), (None, "")])
    assert not table.wait_for_token("k", [(token, "save-concept")]) and "k" not in table.awaiting  # told
    assert not table.wait_for_token("n", [(named, "")])  # the owner's name: nothing to wait for
    assert not table.wait_for_token("i", [({**token, "state": "idle"}, "")])
    Settings.statement_tag = False
    assert not table.wait_for_token("off", [(token, "")])  # tags off: no tag is read
    Settings.statement_tag = True
    assert table.wait_for_token("late", [(token, "")])
    table.awaiting["late"] -= table.horizon() + 0.01  # nobody told it within the horizon
    assert not table.wait_for_token("late", [(token, "")]) and "late" not in table.awaiting


def test_a_token_missing_from_the_rows_read_at_the_start_of_a_poll_is_read_again_once() -> None:
    """A statement that began after the poll read the owner rows carries a slot they do not show:
    the rows are read again, once per poll (a CI run named such a lock victim ``unknown``)."""
    from telemetry._core.holds import OwnerRow
    from telemetry.server_view.model import Owners

    reads: list[int] = []

    def refresh() -> list[Any]:
        reads.append(1)
        return [OwnerRow(None, None, "api", "victim", 0.0, "", "", "", "api/7@h#1")]

    owners = Owners([OwnerRow(None, None, "api", "GET /a", 0.0, "", "", "", "api/7@h#0")], refresh)
    assert owners.token({"application": "api/7@h", "conn": "0"}).owner == "GET /a" and reads == []  # type: ignore[union-attr]
    assert owners.token({"application": "api/7@h", "conn": "1"}).owner == "victim"  # type: ignore[union-attr]
    assert owners.token({"application": "api/7@h", "conn": "2"}) is None and reads == [1]  # once per poll
