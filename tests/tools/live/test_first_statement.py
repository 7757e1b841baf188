"""The first statements of transactions, diagnosed only as far as the evidence goes (issue 33):
a statement slow on a server with no pooler is named as slow statements with its owner, never as
a full pooler; without any view the answer is "unknown, because ..."; behind a real pgbouncer
whose console shows no queue, slow statements again; behind a full pgbouncer, the queue. Each
case asserts its sentence and the absence of its neighbours'."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from sqlalchemy import create_engine, text

import telemetry
from telemetry.tools.live import diagnose
from telemetry.tools.samples import parse

from ... import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("shared_view", "sqlalchemy")]
_host, _value, _wait_for = hostview.host, hostview.value, hostview.wait_for

QUEUE = "waiting for a server connection"
FULL = "the pooler or the server is full"
SLOW = "Slow statements: api's transactions spent"
UNKNOWN = "Unknown whether that is a queue for a server connection"


@pytest.fixture(scope="module")
def bouncer(pg: services.Postgres) -> Iterator[services.Pgbouncer]:
    with services.start_pgbouncer(pg, pool_size=2) as started:
        yield started


def _slow_route(url: str, clients: int, seconds: float, rounds: int) -> tuple[list[threading.Thread], threading.Event]:
    """``clients`` threads, each running ``rounds`` transactions whose one statement takes
    ``seconds`` on the server, owned by the route 'GET /slow-report'; the pool holds them all."""
    engine = create_engine(url, pool_size=clients, max_overflow=0)
    stop = threading.Event()

    def run() -> None:
        for _ in range(rounds):
            if stop.is_set():
                break
            with telemetry.db_owner("GET /slow-report"), engine.begin() as conn:
                conn.execute(text(f"select pg_sleep({seconds})"))

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads, stop


def _findings_when(ready: object) -> list[str]:
    assert _wait_for(ready, timeout=60), _host(None)
    return diagnose.findings(parse(generate_latest().decode()))


def _ended(n: int) -> bool:
    """``n`` transactions timed and their holds ended (the hold is measured at checkin, after the
    first statement's time: diagnose weighs one against the other)."""
    now = _host(None)
    return all((_value(now, name, service="api") or 0) >= n
               for name in ("db_server_wait_seconds_count", "db_connection_hold_seconds_count"))


def _active_on_server() -> bool:
    return _ended(3) and (_value(_host(None), "db_server_connections_by_owner", owner="GET /slow-report",
                                 state="active") or 0) >= 1  # fmt: skip


def _join(threads: list[threading.Thread], stop: threading.Event) -> None:
    stop.set()
    for t in threads:
        t.join(60)


def test_a_slow_statement_on_a_direct_server_is_named_not_a_full_pooler(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False, server_view_url=pg.url().replace("+psycopg", ""),
                         shared_view_interval_seconds=0.2)  # fmt: skip
    threads, stop = _slow_route(pg.url(), 3, 0.6, 8)
    try:
        found = _findings_when(_active_on_server)
    finally:
        _join(threads, stop)
    said = " ".join(found)
    assert SLOW in said, found
    assert "no transaction pooler is in the path" in said and "api 'GET /slow-report'" in said, found
    assert QUEUE not in said and FULL not in said and UNKNOWN not in said, found
    # the statement itself, from the server view (statement spans are off): its text without
    # literals and its run time, against the 0.6 s it takes
    running = said.split("Running: 'GET /slow-report' `select pg_sleep(?)` (")
    assert len(running) == 2, found
    seconds = float(running[1].split("the longest ")[1].split(" s)")[0])
    assert 0.0 < seconds <= 0.7, found


def test_without_any_view_the_first_statements_are_unknown_and_say_what_would_tell(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    threads, stop = _slow_route(pg.url(), 3, 0.6, 2)
    try:
        found = _findings_when(lambda: _ended(3))
    finally:
        _join(threads, stop)
    said = " ".join(found)
    assert UNKNOWN in said and "TELEMETRY_SERVER_VIEW_URL" in said, found
    assert QUEUE not in said.replace(UNKNOWN, "") and FULL not in said and SLOW not in said, found


def test_behind_pgbouncer_with_no_queue_a_slow_statement_is_not_the_pooler(pg: services.Postgres,
                                                                         bouncer: services.Pgbouncer) -> None:
    """2 clients on a pgbouncer pool of 2: a server connection is always there; the time is the
    statement's."""
    telemetry.instrument(service="api", tracing=False, pgbouncer_url=bouncer.admin_url,
                         server_view_url=pg.url().replace("+psycopg", ""), shared_view_interval_seconds=0.2)  # fmt: skip
    threads, stop = _slow_route(bouncer.url(), 2, 0.6, 6)
    try:
        found = _findings_when(lambda: _ended(3) and _value(_host(None), "pgbouncer_view_up") == 1)
    finally:
        _join(threads, stop)
    said = " ".join(found)
    assert SLOW in said and "no client waits in it" in said, found
    assert QUEUE not in said and FULL not in said and UNKNOWN not in said, found


def test_behind_a_full_pgbouncer_the_queue_is_named(pg: services.Postgres, bouncer: services.Pgbouncer) -> None:
    """6 clients on a pgbouncer pool of 2, each statement 0.4 s: four queue at any time."""
    telemetry.instrument(service="api", tracing=False, pgbouncer_url=bouncer.admin_url,
                         server_view_url=pg.url().replace("+psycopg", ""), shared_view_interval_seconds=0.2)  # fmt: skip
    threads, stop = _slow_route(bouncer.url(), 6, 0.4, 6)

    def queued() -> bool:
        return _ended(6) and (_value(_host(None), "pgbouncer_clients", state="waiting") or 0) >= 1

    try:
        found = _findings_when(queued)
    finally:
        _join(threads, stop)
    said = " ".join(found)
    assert "Server connections: api's transactions spent" in said and "its clients queue" in said, found
    assert FULL in said, found
    assert SLOW not in said and UNKNOWN not in said, found


def test_a_pooler_nothing_names_is_not_called_slow_statements(pg: services.Postgres, bouncer: services.Pgbouncer) -> None:
    """A full pgbouncer whose console is not configured and which keeps the clients' names: no
    pooler is seen, yet most checked-out connections have no server connection, so the answer is
    unknown, not slow statements."""
    telemetry.instrument(service="api", tracing=False, server_view_url=pg.url().replace("+psycopg", ""),
                         shared_view_interval_seconds=0.2)  # fmt: skip
    threads, stop = _slow_route(bouncer.url(), 6, 0.4, 6)
    try:
        found = _findings_when(lambda: _ended(6) and (_value(_host(None), "db_pool_connections_in_use") or 0) >= 5)
    finally:
        _join(threads, stop)
    said = " ".join(found)
    assert UNKNOWN in said and "no pooler is seen, yet" in said and "have no server connection" in said, found
    assert SLOW not in said and FULL not in said, found
