"""Holders from what is held now (issue 33): a route that streams while holding its session never
ends a hold, so the hold histogram cannot name it; the connections checked out right now, by
owner, do."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import generate_latest
from sqlalchemy import create_engine, text

import telemetry
from telemetry.tools.live import diagnose
from telemetry.tools.samples import parse

from ... import hostview, services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("sqlalchemy")]


def test_a_stream_holding_its_session_is_named_before_any_hold_ends(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False)
    engine = create_engine(pg.url(), pool_size=2, max_overflow=0, pool_timeout=30)
    release = threading.Event()
    holding = threading.Barrier(3)

    def stream() -> None:
        with telemetry.db_owner("GET /items/{item_id}/stream"), engine.connect() as conn:
            conn.execute(text("select 1"))
            holding.wait()
            release.wait(60)

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        holding.wait(30)
        page = parse(generate_latest().decode())
        held = hostview.value(hostview.host(None), "db_connection_hold_seconds_count", service="api")
        found = diagnose.findings(page)
    finally:
        release.set()
        for t in threads:
            t.join(30)
        engine.dispose()
    assert not held, held  # no hold has ended: the histogram knows nobody
    pool = [f for f in found if f.startswith("Pool: the busiest api")]
    assert pool and "Held now by 'GET /items/{item_id}/stream' (2)." in pool[0], found
    assert "of the hold time" not in pool[0], found


def test_held_now_caps_owners_like_the_hold(pg: services.Postgres) -> None:
    """Past max_owners owners, a new holder counts as 'other', as its hold will."""
    telemetry.instrument(service="api", tracing=False, max_owners=1)
    engine = create_engine(pg.url(), pool_size=2, max_overflow=0)
    with telemetry.db_owner("first"), engine.connect() as conn:
        conn.execute(text("select 1"))  # 'first' ends a hold: the one owner the cap admits
    with telemetry.db_owner("first"), engine.connect() as a, telemetry.db_owner("second"), engine.connect() as b:
        a.execute(text("select 1"))
        b.execute(text("select 1"))
        now = hostview.host(None)
        first = hostview.value(now, "db_pool_connections_in_use_by_owner", owner="first")
        second = hostview.value(now, "db_pool_connections_in_use_by_owner", owner="second")
        other = hostview.value(now, "db_pool_connections_in_use_by_owner", owner="other")
    engine.dispose()
    assert (first, second, other) == (1, None, 1)


def test_connects_refused_for_the_servers_limit_are_the_budget_not_a_route() -> None:
    """A pool that can open 15 connections against a server accepting 7: the refused connects are
    counted by reason and diagnose says the sum of the pools does not fit, blaming no route."""
    from sqlalchemy.exc import OperationalError

    with services.start_postgres(max_connections=10) as small:  # 10 - 3 reserved = 7 usable
        telemetry.instrument(service="api", tracing=False, server_view_url=small.url().replace("+psycopg", ""),
                             shared_view_interval_seconds=0.2)  # fmt: skip
        engine = create_engine(small.url(), pool_size=5, max_overflow=10, pool_timeout=5)
        release, refused = threading.Event(), []

        def hold() -> None:
            try:
                with telemetry.db_owner("GET /reports/{rid}"), engine.connect() as conn:
                    conn.execute(text("select 1"))
                    release.wait(60)
            except OperationalError as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=hold) for _ in range(12)]
        for t in threads:
            t.start()
        try:
            assert hostview.wait_for(lambda: len(refused) >= 3 and (hostview.value(
                hostview.host(None), "db_server_connections_max") or 0) > 0, timeout=30), refused
            page = parse(generate_latest().decode())
            counted = hostview.value(hostview.host(None), "db_pool_connects_refused_total", reason="too_many_clients")
            found = diagnose.findings(page)
        finally:
            release.set()
            for t in threads:
                t.join(30)
            engine.dispose()
    assert counted and counted >= 3, (counted, refused[:1])
    said = " ".join(found)
    budget = [f for f in found if f.startswith("Connection budget:")]
    assert budget, found
    # this pool's 15, and any other pool still alive in this test process (the sentence sums them)
    most = sum(v for n, lb, v in page if n == "db_pool_connections_max" and lb.get("service") == "api")
    assert most >= 15 and "too_many_clients" in budget[0], (most, budget)
    assert f"can open {most:.0f} connections at most (api 1 process: {most:.0f})" in budget[0], budget
    assert "more than the 7 the server accepts" in budget[0] and "no route is to blame" in budget[0], budget
    assert "Shorten those transactions" not in said and "GET /reports" not in budget[0], found


def test_without_refused_connects_there_is_no_budget_sentence(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", tracing=False, server_view_url=pg.url().replace("+psycopg", ""),
                         shared_view_interval_seconds=0.2)  # fmt: skip
    engine = create_engine(pg.url(), pool_size=5, max_overflow=10)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert hostview.wait_for(lambda: hostview.value(hostview.host(None), "db_server_connections_max"), timeout=30)
    found = diagnose.findings(parse(generate_latest().decode()))
    engine.dispose()
    assert not [f for f in found if f.startswith("Connection budget")], found
