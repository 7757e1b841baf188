"""The shared view under faults and odd inputs, against a real PostgreSQL and a real pgbouncer:
a session from another address on one of our ports is not ours, a hung pgbouncer fails its
view within the timeout while the server view goes on, a pgbouncer without some SHOW columns
still publishes the rest, and a password given as a URL parameter is never logged."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

import telemetry
from telemetry.integrations.sqlalchemy import peers as _pool_peers
from telemetry.server_view import poller as _shared
from telemetry.testing import capture_events

from .. import hostview, services
from ..forwarder import Forwarder

pytestmark = pytest.mark.integration

_host, _value, _wait_for = hostview.host, hostview.value, hostview.wait_for


@pytest.fixture(scope="module")
def item(pg: services.Postgres) -> str:
    pg.psql("create table if not exists fault_item (id int primary key, n int); "
            "insert into fault_item values (1, 0) on conflict do nothing")  # fmt: skip
    return "fault_item"


def _labels(name: str) -> list[dict[str, str]]:
    return [dict(lb) for (n, lb), _v in _host(None).items() if n == name]


def test_a_session_from_another_address_on_one_of_our_ports_is_not_ours(pg: services.Postgres, item: str) -> None:
    """Owners are joined on address and port: a psql-like session from 127.0.0.2 whose local
    port equals that of our held connection, holding a row lock, is named as not ours."""
    telemetry.instrument(service="api", server_view_url=pg.url().replace("+psycopg", ""),
                         shared_view_interval_seconds=0.2)  # fmt: skip
    engine = create_engine(pg.url(), pool_size=2, max_overflow=0)
    blocked = threading.Event()
    with telemetry.db_owner("/reports/{id}"), engine.connect() as ours:
        ours.execute(text("select 1"))  # idle in transaction, held by /reports/{id}
        rows = _pool_peers.owner_table()
        assert len(rows) == 1 and rows[0].local_address == "127.0.0.1"
        port = rows[0].local_port
        with Forwarder(pg.port, source=("127.0.0.2", port)) as fwd, \
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{fwd.port}/postgres") as foreign:  # fmt: skip
            foreign.execute(f"select n from {item} where id = 1 for update")
            # the server sees the foreign session on the same port number as ours
            assert pg.psql(f"select count(*) from pg_stat_activity where client_port = {port}") == "2"

            def victim() -> None:
                with telemetry.db_owner("victim"), engine.begin() as conn:
                    blocked.set()
                    conn.execute(text(f"update {item} set n = n + 1 where id = 1"))

            thread = threading.Thread(target=victim)
            thread.start()
            try:
                assert _wait_for(lambda: _labels("db_server_lock_blocking"), timeout=30)
                pairs = _labels("db_server_lock_blocking")
                owned = _value(_host(None), "db_server_connections_by_owner", owner="/reports/{id}")
            finally:
                foreign.rollback()
                thread.join(timeout=30)
    engine.dispose()
    assert pairs and all(p["blocker_owner"] == "unknown" and p["blocker_service"] != "api"
                         and p["blocked_owner"] == "victim" for p in pairs), pairs  # fmt: skip
    assert owned == 1  # ours alone, not the foreign session on the same port


@pytest.fixture
def own_bouncer(pg: services.Postgres) -> Iterator[services.Pgbouncer]:
    with services.start_pgbouncer(pg, pool_size=2) as server:
        yield server


def test_a_hung_pgbouncer_fails_its_view_and_the_server_view_goes_on(
    pg: services.Postgres, own_bouncer: services.Pgbouncer
) -> None:
    """pgbouncer stopped by SIGSTOP: its view fails with reason timeout (up 0) instead of
    freezing, and the server view keeps polling and stays fresh."""
    telemetry.instrument(service="api", pgbouncer_url=own_bouncer.admin_url, server_view_url=pg.url(),
                         shared_view_interval_seconds=0.3, shared_view_timeout_seconds=1.0)  # fmt: skip
    assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1
                     and _value(_host(None), "db_server_view_up") == 1)  # fmt: skip
    os.kill(own_bouncer.process.pid, signal.SIGSTOP)
    try:
        assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 0, timeout=30)
        assert (_value(_host(None), "pgbouncer_view_errors_total", reason="timeout") or 0) >= 1
        before = _value(_host(None), "db_server_view_polls_total") or 0
        assert _wait_for(lambda: (_value(_host(None), "db_server_view_polls_total") or 0) >= before + 3, timeout=60)
        host = _host(None)
        assert _value(host, "db_server_view_up") == 1
        assert (_value(host, "db_server_view_age_seconds") or 0) < 10  # polled, not frozen
        assert _value(host, "pgbouncer_view_up") == 0
    finally:
        os.kill(own_bouncer.process.pid, signal.SIGCONT)
    assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1, timeout=30)


def test_a_pgbouncer_without_some_columns_still_publishes_the_rest(
    pg: services.Postgres, own_bouncer: services.Pgbouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SHOW STATS`` without ``total_xact_count`` and ``SHOW POOLS`` without ``sv_tested`` (as
    other pgbouncer versions answer): those figures are left out and counted, the others and
    the server view are published."""
    real_rows = _shared.fetch_rows

    def rows(conn: Any, sql: str) -> list[dict[str, Any]]:
        out = real_rows(conn, sql)
        drop = {"SHOW STATS": "total_xact_count", "SHOW POOLS": "sv_tested"}.get(sql)
        return [{k: v for k, v in r.items() if k != drop} for r in out]

    monkeypatch.setattr(_shared, "fetch_rows", rows)
    engine = create_engine(own_bouncer.url(), pool_size=1, max_overflow=0)
    with engine.connect() as conn:  # the pooler has a pool for the database from now on
        conn.execute(text("select 1"))
    with capture_events("telemetry_pgbouncer_columns_missing") as events:
        telemetry.instrument(service="api", pgbouncer_url=own_bouncer.admin_url, server_view_url=pg.url(),
                             shared_view_interval_seconds=0.2)  # fmt: skip
        assert _wait_for(lambda: (_value(_host(None), "pgbouncer_view_errors_total", reason="missing_column") or 0) >= 2)
        host = _host(None)
    engine.dispose()
    assert _value(host, "pgbouncer_view_up") == 1 and _value(host, "db_server_view_up") == 1
    assert _value(host, "pgbouncer_transactions_total") is None
    assert _value(host, "pgbouncer_client_wait_seconds_total", database="postgres") is not None
    assert _value(host, "pgbouncer_servers", database="postgres", state="active") is not None
    assert _value(host, "pgbouncer_servers", state="tested") is None
    assert _value(host, "db_server_connections_max") is not None
    assert len(events) == 1, events  # logged once, counted every poll
    assert events[0]["columns"] == ["POOLS.sv_tested", "STATS.total_xact_count"]


def test_a_password_given_as_a_url_parameter_is_never_logged(pg: services.Postgres) -> None:
    closed = services.free_port()
    with capture_events("telemetry_shared_view_failed") as events:
        telemetry.instrument(service="api", shared_view_interval_seconds=0.2,
                             server_view_url=f"postgresql://monitor@127.0.0.1:{closed}/postgres?password=hunter2")  # fmt: skip
        assert _wait_for(lambda: _value(_host(None), "db_server_view_errors_total", reason="refused"))
    text_ = json.dumps(events)
    assert "hunter2" not in text_ and "password=***" in events[0]["url"]


def test_a_stopped_pgbouncer_leaves_no_process_behind(pg: services.Postgres) -> None:
    """The throwaway pgbouncer is our child itself (not a runuser wrapper that left it orphaned
    after the tests): stopping it ends pgbouncer and frees its port."""
    with services.start_pgbouncer(pg, pool_size=1) as bouncer:
        pid, port = bouncer.process.pid, bouncer.port
        with open(f"/proc/{pid}/comm") as fh:
            assert fh.read().strip() == "pgbouncer"
    assert not os.path.exists(f"/proc/{pid}")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


_LEADER = """
import sys, time
import telemetry
telemetry.instrument(service="worker", multiproc_dir=sys.argv[1], server_view_url=sys.argv[2],
                     shared_view_interval_seconds=0.2, flush_interval_seconds=0.1)
from telemetry.server_view import poller as _shared
while not _shared.PUBLISHED.polls.get("db_server"):
    time.sleep(0.05)
print("polling", flush=True)
time.sleep(120)
"""


def test_a_killed_poller_is_replaced_by_another_process_of_the_host(pg: services.Postgres, tmp_path: Any) -> None:
    """Two processes of one host (one multiprocess directory): only the leader polls; killed
    with SIGKILL, the other takes over (its record lock is released by the kernel)."""
    import subprocess
    import sys

    directory = str(tmp_path)
    leader = subprocess.Popen([sys.executable, "-c", _LEADER, directory, pg.url()], stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "polling"
        telemetry.instrument(service="api", multiproc_dir=directory, server_view_url=pg.url(),
                             shared_view_interval_seconds=0.2)  # fmt: skip
        assert _wait_for(lambda: (_value(_host(directory), "db_server_view_polls_total") or 0) >= 5)
        assert not _shared.PUBLISHED.polls.get("db_server")  # not the leader: no query of ours
        leader.kill()
        leader.wait(timeout=30)
        assert _wait_for(lambda: (_shared.PUBLISHED.polls.get("db_server") or 0) >= 2, timeout=30)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait(timeout=30)
        assert leader.stdout is not None
        leader.stdout.close()


def test_an_advisory_lock_held_by_psql_is_named_as_not_ours_and_cleared(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", server_view_url=pg.url(), shared_view_interval_seconds=0.2)
    engine = create_engine(pg.url(), pool_size=2, max_overflow=0)
    with psycopg.connect(pg.url().replace("+psycopg", ""), application_name="psql") as psql:
        psql.execute("select pg_advisory_lock(4242)")

        def waiter() -> None:
            with telemetry.db_owner("resume-step"), engine.connect() as conn:
                conn.execute(text("select pg_advisory_lock(4242)"))
                conn.execute(text("select pg_advisory_unlock(4242)"))

        thread = threading.Thread(target=waiter)
        thread.start()
        try:
            # the waiter is named from its statement's tag (the activity and the locks are read in
            # one snapshot); a poll under load has been seen to name it "unknown" once, before the
            # next poll named it: waited for, and the blocker checked on the same poll
            named = {"blocked_service": "api", "blocked_owner": "resume-step"}
            pairs = _wait_for(lambda: [p for p in _labels("db_server_lock_blocking") if p.items() >= named.items()],
                              timeout=30)  # fmt: skip
        finally:
            psql.execute("select pg_advisory_unlock(4242)")
            thread.join(timeout=30)
    assert pairs == [{"blocker_service": "psql", "blocker_owner": "unknown",
                      "blocked_service": "api", "blocked_owner": "resume-step"}]  # fmt: skip
    assert _wait_for(lambda: not _labels("db_server_lock_blocking"), timeout=30)  # cleared
    engine.dispose()


def test_connect_time_through_a_queueing_pooler_is_not_pool_wait(
    pg: services.Postgres, own_bouncer: services.Pgbouncer
) -> None:
    """Behind pgbouncer with its 2 server connections held by others, a checkout that opens a new
    connection waits in the pooler's queue while the dialect's set-up queries run: that time is
    connect time (db_pool_connect_seconds), not time waiting for the pool
    (db_pool_checkout_wait_seconds), which stays near zero: the pool had room."""
    import time

    telemetry.instrument(service="api")
    blockers = [psycopg.connect(own_bouncer.url().replace("+psycopg", "")) for _ in range(2)]
    for conn in blockers:
        conn.execute("select 1")  # inside a transaction: the server connection stays linked
    admin = psycopg.connect(own_bouncer.admin_url, autocommit=True, prepare_threshold=None)
    engine = create_engine(own_bouncer.url(), pool_size=2, max_overflow=0)
    start = time.time()
    thread = threading.Thread(target=lambda: engine.connect().close())
    thread.start()
    try:
        def waiting() -> bool:
            rows = admin.execute("SHOW POOLS").fetchall()
            names = [d.name for d in admin.execute("SHOW POOLS").description or []]
            return any(dict(zip(names, r, strict=True))["cl_waiting"] > 0 for r in rows)

        assert _wait_for(waiting, timeout=30)
    finally:
        released = time.time()
        for conn in blockers:
            conn.rollback()
            conn.close()
        thread.join(timeout=30)
    admin.close()
    engine.dispose()
    queued = released - start
    connect = telemetry.testing.sample("db_pool_connect_seconds_sum")
    wait = telemetry.testing.sample("db_pool_checkout_wait_seconds_sum")
    assert telemetry.testing.sample("db_pool_connect_seconds_count") == 1
    assert connect >= 0.5 * queued, (connect, queued)
    assert wait < 0.5 * connect, (wait, connect)
