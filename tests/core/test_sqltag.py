"""Statement tags on a real PostgreSQL: every driver (psycopg 3 with and without prepared
statements, psycopg2, asyncpg with its statement cache on and off, sync and async engines)
sends the tag the server shows in ``pg_stat_activity.query``, with any owner name escaped so it
can neither end the comment nor reach the SQL; a setting turns it off; ``uninstrument()``
removes it; the number of distinct texts stays bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import telemetry
from telemetry._core import sqltag as _sqltag

from .. import services

pytestmark = [pytest.mark.integration, pytest.mark.matrix("sqlalchemy")]

OWNER = "GET /a/{id}' or 1=1 */ -- 100% ;\n"
OWN_QUERY = "select query from pg_stat_activity where pid = pg_backend_pid()"


def _sync(url: str, **kwargs: Any) -> list[str]:
    engine = create_engine(url, **kwargs)
    try:
        with telemetry.db_owner(OWNER), engine.connect() as conn:
            plain = conn.execute(text(OWN_QUERY)).scalar()
            conn.commit()  # pg_stat_activity is a snapshot per transaction
            bound = conn.execute(text(OWN_QUERY + " and :x = 1"), {"x": 1}).scalar()
        return [plain, bound]
    finally:
        engine.dispose()


def _async(url: str, **kwargs: Any) -> list[str]:
    async def go() -> list[str]:
        engine = create_async_engine(url, **kwargs)
        try:
            with telemetry.db_owner(OWNER):
                async with engine.connect() as conn:
                    plain = (await conn.execute(text(OWN_QUERY))).scalar()
                    await conn.commit()  # pg_stat_activity is a snapshot per transaction
                    bound = (await conn.execute(text(OWN_QUERY + " and :x = 1"), {"x": 1})).scalar()
            return [plain, bound]
        finally:
            await engine.dispose()

    return asyncio.run(go())


#: (driver, engine arguments, run, whether the driver keeps prepared statements by their text)
DRIVERS = [
    ("psycopg", {}, _sync, True),  # prepare_threshold=5 by default
    ("psycopg", {"connect_args": {"prepare_threshold": 0}}, _sync, True),  # every statement prepared
    ("psycopg", {"connect_args": {"prepare_threshold": None}}, _sync, False),  # never (transaction poolers)
    ("psycopg2", {}, _sync, False),
    ("psycopg", {}, _async, True),
    ("asyncpg", {}, _async, True),  # SQLAlchemy's statement cache (prepared_statement_cache_size=100)
    ("asyncpg", {"connect_args": {"statement_cache_size": 0}}, _async, True),  # asyncpg's own cache only
    ("asyncpg", {"connect_args": {"prepared_statement_cache_size": 0}}, _async, False),
]


@pytest.mark.parametrize("driver, kwargs, run, prepares", DRIVERS)
def test_every_driver_sends_a_tag_the_server_shows(pg: services.Postgres, driver: str, kwargs: dict, run: Any,
                                                   prepares: bool) -> None:  # fmt: skip
    """``statement_tag_owner="text"``: the owner's name in every tag, whatever the driver."""
    telemetry.instrument(service="api", statement_tag_owner="text")
    queries = run(pg.url(driver), **kwargs)
    assert queries[0] != queries[1]  # both statements seen, each with its tag
    for query in queries:
        tag = _sqltag.parse(query)
        assert tag["owner"] == OWNER, query  # the whole name, escaped on the way, read back
        service, pid, host = tag["application"].partition("/")[0], *tag["application"].split("/")[1].split("@")
        assert service == "api" and int(pid) > 0 and host
        assert query.endswith("pg_backend_pid()") or query.endswith("= $1") or query.endswith("= 1")
        assert query.count("*/") == 1  # the owner's "*/" was escaped, not written


@pytest.mark.parametrize("driver, kwargs, run, prepares", DRIVERS)
def test_a_driver_that_caches_prepared_statements_gets_a_token(pg: services.Postgres, driver: str, kwargs: dict,
                                                               run: Any, prepares: bool) -> None:  # fmt: skip
    """The default (``auto``): a connection whose driver keeps prepared statements by their text
    carries its slot (one text per statement, whoever runs it); the others the owner's name."""
    telemetry.instrument(service="api")
    queries = run(pg.url(driver), **kwargs)
    for query in queries:
        tag = _sqltag.parse(query)
        assert tag["application"].startswith("api/"), query
        if prepares:
            assert "owner" not in tag and tag["conn"] == "0", query  # the process's first connection
        else:
            assert tag["owner"] == OWNER and "conn" not in tag, query


def test_the_setting_turns_it_off_and_uninstrument_removes_it(pg: services.Postgres) -> None:
    telemetry.instrument(service="api", statement_tag=False)
    assert [_sqltag.parse(q) for q in _sync(pg.url())] == [{}, {}]
    telemetry.uninstrument()
    telemetry.instrument(service="api")
    engine = create_engine(pg.url())
    with engine.connect() as conn:
        assert _sqltag.parse(conn.execute(text(OWN_QUERY)).scalar())
        conn.commit()
        telemetry.uninstrument()
        assert _sqltag.parse(conn.execute(text(OWN_QUERY)).scalar()) == {}
    engine.dispose()


def test_distinct_texts_stay_bounded() -> None:
    telemetry.instrument(service="api")
    for i in range(3 * _sqltag.MAX_TAGGED_OWNERS):
        _sqltag._make(f"owner-{i}")
    assert len(_sqltag._tags) == _sqltag.MAX_TAGGED_OWNERS + 1  # the rest share "other"
    assert "owner='other'" in _sqltag._make("owner-99999")[0]


def test_parse_reads_only_tags() -> None:
    assert _sqltag.parse("select 1") == {}
    assert _sqltag.parse("/* a comment */ select 1") == {}
    assert _sqltag.parse("/*application='api%2F1%40h',owner='x%27y'*/ select 1") == {"application": "api/1@h", "owner": "x'y"}


def test_token_slots_are_reused_as_connections_come_and_go(pg: services.Postgres) -> None:
    """Slots are the lowest free ones: 20 connections opened and closed one after another
    (``NullPool``) all carry slot 0, two held at once carry 0 and 1. The texts per process stay
    as many as its connections at once, whatever the pool's churn."""
    import gc

    from sqlalchemy.pool import NullPool

    telemetry.instrument(service="api")
    engine = create_engine(pg.url(), poolclass=NullPool)
    try:
        slots = set()
        for _ in range(20):
            with engine.connect() as conn:
                slots.add(_sqltag.parse(conn.execute(text(OWN_QUERY)).scalar())["conn"])
            gc.collect()  # the closed connection's record goes: its slot is free again
        assert slots == {"0"}
        with engine.connect() as a, engine.connect() as b:
            both = {_sqltag.parse(c.execute(text(OWN_QUERY)).scalar())["conn"] for c in (a, b)}
        assert both == {"0", "1"}
    finally:
        engine.dispose()
