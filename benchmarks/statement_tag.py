"""Cost of the statement tag per statement, side by side in one run.

Against a real PostgreSQL (``--database-url``, psycopg 3 and asyncpg, their defaults: both
prepare statements): a parameterised ``select`` executed ``--n`` times on one checked-out
connection, in a fresh process per configuration, the configurations alternating over
``--rounds``, best round kept:

* bare: no telemetry;
* tag-off: ``instrument(statement_tag=False)`` (the dialect's execute methods are still
  wrapped: the first statement of each transaction is timed);
* tag-text: ``statement_tag_owner="text"``: the owner's name in every tag;
* tag-auto: ``instrument()`` (the default: on these drivers the connection's token).

Two tables of round trips: one owner for every statement, then 500 owners taking turns (the
owner's name in the text makes a prepared statement per owner: issue 34).

    python benchmarks/statement_tag.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import asyncio, contextlib, json, sys, time
from sqlalchemy import create_engine, text
config, url, driver, n, owners = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
owner = contextlib.nullcontext
if config != "bare":
    import telemetry
    telemetry.instrument(service="bench", statement_tag=(config != "tag-off"), tracing=False,
                         statement_tag_owner="text" if config == "tag-text" else "auto")
    owner = telemetry.db_owner
names = [f"GET /route/{i}" for i in range(owners)]
stmt = text("select cast(:x as int)")
if driver == "asyncpg":
    from sqlalchemy.ext.asyncio import create_async_engine

    async def go():
        engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
        async with engine.connect() as conn:
            for i in range(200):
                with owner(names[i % owners]):
                    await conn.execute(stmt, {"x": i})
            t0 = time.perf_counter()
            for i in range(n):
                with owner(names[i % owners]):
                    await conn.execute(stmt, {"x": i})
            elapsed = time.perf_counter() - t0
        await engine.dispose()
        return elapsed

    elapsed = asyncio.run(go())
else:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        for i in range(200):
            with owner(names[i % owners]):
                conn.execute(stmt, {"x": i})
        t0 = time.perf_counter()
        for i in range(n):
            with owner(names[i % owners]):
                conn.execute(stmt, {"x": i})
        elapsed = time.perf_counter() - t0
    engine.dispose()
print(json.dumps({"us": elapsed / n * 1e6}))
"""

CONFIGS = ("bare", "tag-off", "tag-text", "tag-auto")

MICRO = r"""
import json, sys, time
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
config, n = sys.argv[1], int(sys.argv[2])

class Cursor:
    def execute(self, statement, parameters=None):
        pass

class Driver:  # the DBAPI connection, in a transaction
    autocommit = False

class Adapter:  # SQLAlchemy's asyncpg adapter, with its statement cache
    _prepared_statement_cache = {}

class Record:  # SQLAlchemy's connection record
    dbapi_connection = Adapter()

class Fairy:  # what SQLAlchemy's execution context holds: the checked-out connection
    def __init__(self):
        self.dbapi_connection, self._connection_record = Driver(), Record()

class Context:
    def __init__(self):
        self._dbapi_connection = Fairy()

dialect = PGDialect_psycopg()
if config != "bare":
    import telemetry
    from telemetry._core import sqltag as _sqltag
    telemetry.instrument(service="bench", statement_tag=(config != "tag-off"), tracing=False,
                         statement_tag_owner="text" if config == "tag-text" else "auto")
    _sqltag.tag_dialect(dialect)
cursor, params, context = Cursor(), {"x": 1}, Context()
dialect.do_begin(context._dbapi_connection)  # inside a transaction: its idle time is measured
with __import__("telemetry").db_owner("GET /items/{id}") if config != "bare" else __import__("contextlib").nullcontext():
    for _ in range(10000):
        dialect.do_execute(cursor, "select %(x)s", params, context)
    t0 = time.perf_counter()
    for _ in range(n):
        dialect.do_execute(cursor, "select %(x)s", params, context)
    elapsed = time.perf_counter() - t0
print(json.dumps({"us": elapsed / n * 1e6}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True, help="postgresql://user@127.0.0.1:PORT/db")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "OTEL_"))}
    print("the package's own cost: the dialect's do_execute inside a transaction, on a cursor that does nothing, "
          "200,000 calls")  # fmt: skip
    print(f"{'configuration':<10} {'us/statement':>13} {'vs bare':>9}")
    micro = {c: float("inf") for c in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            out = subprocess.run([sys.executable, "-c", MICRO, config, "200000"], capture_output=True, text=True,
                                 env=env, check=True, timeout=600)  # fmt: skip
            micro[config] = min(micro[config], json.loads(out.stdout.strip().splitlines()[-1])["us"])
    for config in CONFIGS:
        print(f"{config:<10} {micro[config]:>13.3f} {micro[config] - micro['bare']:>+9.3f}")
    for owners in (1, 500):
        print()
        print(f"round trips: {args.n} x a parameterised select per round, {owners} owner(s) taking turns, "
              f"{args.rounds} rounds, best round (microseconds per statement)")  # fmt: skip
        print(f"{'driver':<9} {'configuration':<13} {'us/statement':>13} {'vs tag-off':>11}")
        print("-" * 49)
        for driver in ("psycopg", "asyncpg"):
            best = {c: float("inf") for c in CONFIGS}
            for _ in range(args.rounds):
                for config in CONFIGS:
                    out = subprocess.run([sys.executable, "-c", CHILD, config, args.database_url, driver, str(args.n),
                                          str(owners)], capture_output=True, text=True, env=env, check=True,
                                         timeout=600)  # fmt: skip
                    best[config] = min(best[config], json.loads(out.stdout.strip().splitlines()[-1])["us"])
            for config in CONFIGS:
                print(f"{driver:<9} {config:<13} {best[config]:>13.2f} {best[config] - best['tag-off']:>+11.2f}")

if __name__ == "__main__":
    main()
