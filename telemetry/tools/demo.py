"""``telemetry demo``: run the incident report's backend with real processes, its plans and
planted suspects, and diagnose each from the package's own metrics and events.

For each scenario it starts the reference pipeline (``telemetry/tools/pipeline``): uvicorn with
``UVICORN_WORKERS`` workers and the report's three prefork Celery worker groups (logs, content,
workflow). Stacks: the embedded default (SQLite, kombu's SQLAlchemy transport: nothing to install,
and it says what it cannot show), ``--stack real`` (throwaway PostgreSQL behind pgbouncer in
transaction mode, and Redis, from the installed binaries), or the user's own servers
(``--database-url``, ``--broker``). It drives K generations, each watched by a status stream, plus
a steady stream of ordinary pages; shows pool usage live; serves the host's ``/metrics``
(Prometheus can scrape it); and ends with the report, computed only from the package's metrics
(gauges at their peak over the run) and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import thresholds as T
from . import alerting as _alerting
from . import capacity as _capacity
from . import demo_advice as _demo_advice
from . import report as _report
from ._proc import DemoError, free_ports, tail

#: the incident report's configuration (its knobs by their names); every scenario starts here
SEED: dict[str, str] = {
    "DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "2", "MAX_DB_CONCURRENT": "3", "UVICORN_WORKERS": "4",
    "CELERY_CONTENT_CONCURRENCY": "6", "CELERY_LOGS_CONCURRENCY": "4", "CELERY_WORKFLOW_CONCURRENCY": "4",
    "BATCH_SIZE": "0",
}  # fmt: skip
_PLAN1 = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "5", "MAX_DB_CONCURRENT": "8", "UVICORN_WORKERS": "2",
          "CELERY_CONTENT_CONCURRENCY": "3"}  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    kind: str  # "report" (its configuration), "plan" (its plans), "suspect" (planted), "remedy"
    about: str
    env: dict[str, str] = field(default_factory=dict)
    real_only: bool = False  # needs the pooler, PostgreSQL's row locks or Redis


SCENARIOS: dict[str, Scenario] = {
    "seed": Scenario("report", "the incident report's configuration and code, nothing planted"),
    "fixed": Scenario("plan", "the report's plan 1: pools 5+5, semaphore 8, 2 API workers, content concurrency 3", _PLAN1),
    "batched": Scenario("plan", "the report's plan 2: plan 1 plus saves of 5 concepts per session", {**_PLAN1, "BATCH_SIZE": "5"}),
    "stream-session": Scenario("suspect", "PLANTED: each status stream polls the database on one session for its life",
                               {"STREAM_HOLDS_SESSION": "1"}),
    "stream-session-remedy": Scenario("remedy", "the diagnosis's fix: a short session per poll", {"STREAM_SESSION_PER_POLL": "1"}),
    "sync-call": Scenario("suspect", "PLANTED: /roadmaps makes a 0.6 s synchronous call inside async def",
                          {"SYNC_CALL_SECONDS": "0.6"}),
    "sync-call-remedy": Scenario("remedy", "the diagnosis's fix: the call runs in a thread (asyncio.to_thread)",
                                 {"SYNC_CALL_SECONDS": "0.6", "SYNC_CALL_OFFLOADED": "1"}),
    "worker-transactions": Scenario("suspect", "PLANTED: each concept's transaction opens before its LLM steps",
                                    {"TX_ACROSS_LLM": "1"}, real_only=True),
    "worker-transactions-remedy": Scenario("remedy", "the diagnosis's fix: the transaction around the write only", {}, real_only=True),
    "redis-subscriptions": Scenario("suspect", "PLANTED: status streams subscribe through the API's shared Redis pool "
                                    "(the report's max_connections 50 scaled to 2 per process)",
                                    {"SUBSCRIBE_ON_SHARED_POOL": "1", "REDIS_MAX_CONNECTIONS": "2"}, real_only=True),
    "redis-subscriptions-remedy": Scenario("remedy", "the diagnosis's fix: subscriptions on a pool of their own",
                                           {"SUBSCRIBE_DEDICATED": "1", "REDIS_MAX_CONNECTIONS": "2"}, real_only=True),
    "row-lock": Scenario("suspect", "PLANTED: the content task locks its task row across 8 LLM steps (its outline)",
                         {"ROW_LOCK_ACROSS_LLM": "1"}, real_only=True),
    "row-lock-remedy": Scenario("remedy", "the diagnosis's fix: no lock across the model call", {}, real_only=True),
}  # fmt: skip
#: the worker groups of the report: (queue, concurrency knob)
GROUPS = (("content", "CELERY_CONTENT_CONCURRENCY"), ("logs", "CELERY_LOGS_CONCURRENCY"),
          ("workflow", "CELERY_WORKFLOW_CONCURRENCY"))  # fmt: skip
#: the report's ~50 server connections behind the pooler, scaled to the demo's client count
POOLER_SERVER_CONNECTIONS = 12


def choose(names: str, stack: str) -> list[str]:
    """The scenarios ``--scenario a,b,...`` (or ``all``) runs on ``stack``, in that order."""
    if names == "all":
        return [n for n, s in SCENARIOS.items() if stack == "real" or not s.real_only]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if name not in SCENARIOS:
            raise DemoError(f"--scenario: unknown scenario {name!r}; expected 'all' or a comma-separated list of "
                            f"{', '.join(SCENARIOS)}")  # fmt: skip
        if SCENARIOS[name].real_only and stack != "real":
            raise DemoError(f"--scenario {name} needs --stack real (the pooler, PostgreSQL's row locks or Redis); "
                            f"on the embedded stack: {', '.join(n for n, s in SCENARIOS.items() if not s.real_only)}")  # fmt: skip
    if not chosen:
        raise DemoError("--scenario: expected 'all' or a comma-separated list of scenario names")
    return chosen


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


#: what the reference pipeline runs on (the ``demo`` extra installs them)
DEMO_MODULES = ("fastapi", "uvicorn", "celery", "sqlalchemy", "aiosqlite", "httpx", "greenlet")


def _require_demo_extra() -> None:
    import importlib.util

    missing = [m for m in DEMO_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(
            f"the demo's reference pipeline needs {', '.join(missing)}: pip install 'poolsight[demo]'"
        )


def _wait_port(
    port: int, proc: subprocess.Popen[bytes], what: str, log: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(
                f"{what} exited with code {proc.returncode}; last lines of {log}:\n{tail(log)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s; see {log}")


def check_database(url: str) -> None:
    """Fail early, with a sentence, when the database cannot be reached."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def ping() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
        finally:
            await engine.dispose()

    try:
        asyncio.run(asyncio.wait_for(ping(), 10))
    except Exception as exc:
        safe = url.split("@")[-1]
        raise DemoError(
            f"cannot reach the database at {safe}: {type(exc).__name__}: {exc}".strip()
        ) from None


@dataclass
class Stack:
    """Where the scenarios run: the embedded default (SQLite, kombu's SQLAlchemy transport, no
    Redis) or real servers (PostgreSQL behind pgbouncer in transaction mode, Redis)."""

    name: str
    database_url: str | None = None  # None: a SQLite file per scenario
    broker: str | None = None
    redis_url: str | None = None
    server_view_url: str | None = None
    pgbouncer_url: str | None = None

    def cannot_show(self) -> list[str]:
        if self.name == "real":
            return []
        return ["no pooler and no shared server limit (each process's pool is all there is: the report's "
                "blocking chain through the pooler cannot happen here)",
                "no Redis (the status streams send heartbeats; the Redis suspect needs --stack real)",
                "no row locks (SQLite locks the whole file; the row-lock suspect needs --stack real)"]  # fmt: skip


#: gauges the report reads at their peak over the run (the demo's max_over_time)
def _peak_names() -> tuple[str, ...]:
    from .diagnose import USED_GAUGES

    return (*USED_GAUGES, "db_pool_pending_requests", "http_server_requests_in_flight")


class Run:
    """One scenario: processes, load, sampling."""

    def __init__(self, scenario: str, args: Any, workdir: str, stack: Stack,
                 overrides: dict[str, dict[str, str]] | None = None, label: str | None = None) -> None:  # fmt: skip
        self.scenario = scenario
        self.overrides = overrides or {}  # per service: knobs the capacity advice changes
        self.args = args
        self.stack = stack
        self.dir = os.path.join(workdir, label or scenario)
        self.scrapes: list[tuple[float, _report.Samples]] = []  # the load's scrapes: the capacity window
        os.makedirs(os.path.join(self.dir, "mp"), exist_ok=True)
        # every port of the scenario at once (the app's and the alert chain's)
        self.api_port, self.metrics_port, *self.chain_ports = free_ports(4)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Any] = []
        self.timeline: dict[str, Any] = {
            "usage": {},
            "latency": {"api p95": []},
            "pooler_waiting": {},
            "semaphore_waiters": {},
        }
        self.peaks: dict[str, float] = {}
        self.gauge_peaks: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.samples: _report.Samples = []
        self.raw_metrics = ""
        self.events: list[dict[str, Any]] = []
        self.sustained: dict[str, float] = {}
        self.above_since: dict[str, float] = {}
        self.chain: Any = None  # the alert chain (Prometheus, Alertmanager, capture server)
        self.alerting: dict[str, Any] = {"alerts": [], "notifications": [], "not_evaluated": None}
        self.t0_wall = 0.0

    def env(self) -> dict[str, str]:
        db = self.stack.database_url or f"sqlite+aiosqlite:///{self.dir}/pipeline.db"
        broker = self.stack.broker or f"sqla+sqlite:///{self.dir}/broker.db"
        backend = self.stack.broker or f"db+sqlite:///{self.dir}/results.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "OTEL_"))}
        env.update(SEED)
        env.update(SCENARIOS[self.scenario].env)
        env.update(
            DATABASE_URL=db, BROKER_URL=broker, RESULT_BACKEND=backend, REDIS_URL=self.stack.redis_url or "",
            DB_POOL_TIMEOUT=str(self.args.pool_timeout), CONCEPTS=str(self.args.concepts),
            LLM_SECONDS=str(self.args.llm_seconds), SAVE_SECONDS=str(self.args.save_seconds),
            STREAM_SECONDS=str(self.args.duration), REDIS_TIMEOUT="1",
            TELEMETRY_MULTIPROC_DIR=os.path.join(self.dir, "mp"), TELEMETRY_FLUSH_INTERVAL_SECONDS="0.25",
            TELEMETRY_METRICS_PORT=str(self.metrics_port), TELEMETRY_TRACING="false",
            TELEMETRY_SHARED_VIEW_INTERVAL_SECONDS="0.25",
            TELEMETRY_LOCK_WAIT_EVENT_SECONDS="0.3",
            # the watchdog's threshold is the hold rule's, on the demo's clock (one source)
            TELEMETRY_DB_HOLD_THRESHOLD_SECONDS=f"{_alerting.hold_threshold_seconds(self.args.pool_timeout):g}",
            PYTHONUNBUFFERED="1", PYTHONPATH=_root() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )  # fmt: skip
        if self.stack.server_view_url:
            env["TELEMETRY_SERVER_VIEW_URL"] = self.stack.server_view_url
        if self.stack.pgbouncer_url:
            env["TELEMETRY_PGBOUNCER_URL"] = self.stack.pgbouncer_url
        return env

    def start(self) -> None:
        env = self.env()
        root = self.dir  # the pipeline ships in the package: any working directory will do
        _require_demo_extra()
        self._schema(env["DATABASE_URL"])
        self._start_chain()
        first = None
        for queue, knob in GROUPS:
            log = os.path.join(self.dir, f"{queue}-worker.log")
            out = open(log, "w")  # noqa: SIM115 - closed in stop()
            self.files.append(out)
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "telemetry.tools.pipeline.worker", "worker",
                 "--pool", "prefork", "-Q", queue, "-n", f"{queue}@%h", "--concurrency", env[knob],
                 "-l", "warning"],
                cwd=root, env={**env, "WORKER_SERVICE": f"{queue}-worker", **self.overrides.get(f"{queue}-worker", {})}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.procs.append(proc)
            if first is None:
                first = (proc, log)
                _wait_port(
                    self.metrics_port, proc, "the content worker", log
                )  # it serves the host's /metrics
        alog = os.path.join(self.dir, "api.log")
        aout = open(alog, "w")  # noqa: SIM115 - closed in stop()
        self.files.append(aout)
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "telemetry.tools.pipeline.api:app", "--workers",
             env["UVICORN_WORKERS"], "--host", "127.0.0.1", "--port", str(self.api_port),
             "--log-level", "warning"],
            cwd=root, env={**env, **self.overrides.get("api", {})}, stdout=aout, stderr=subprocess.STDOUT,
            start_new_session=True,
        ))  # fmt: skip
        _wait_port(self.api_port, self.procs[-1], "the API", alog)
        if self.chain is not None:
            self.chain.wait_scraped()

    def _start_chain(self) -> None:
        reason = (
            "not asked for (--alerts off)" if self.args.alerts == "off" else _alerting.missing()
        )
        if reason:
            self.alerting["not_evaluated"] = reason
            return
        self.chain = _alerting.Chain(os.path.join(self.dir, "alerting"), self.metrics_port, self.args.pool_timeout,
                                     ports=(self.chain_ports[0], self.chain_ports[1]))  # fmt: skip
        try:
            self.chain.start()
        except BaseException:
            self.chain.stop()
            raise

    def collect_alerts(self) -> None:
        """What Prometheus fired over the run and what reached PagerDuty and Slack."""
        if self.chain is None:
            return
        # a cool-down with the app still serving: the alerts resolve as its pressure is gone
        self.chain.quiet(timeout=30)
        self.chain.settle()
        self.alerting["alerts"] = self.chain.alerts(self.t0_wall, time.time())
        self.alerting["notifications"] = self.chain.capture.notifications(self.t0_wall)

    def _schema(self, url: str) -> None:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import NullPool

        from telemetry.tools.pipeline.db import connect_args, metadata

        async def go() -> None:
            engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args(url))
            if url.startswith("sqlite"):

                @event.listens_for(engine.sync_engine, "connect")
                def _wal(dbapi_conn: Any, _rec: Any) -> None:
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.close()

            async with engine.begin() as conn:
                await conn.run_sync(
                    metadata.drop_all
                )  # a shared server: each scenario starts empty
                await conn.run_sync(metadata.create_all)
            await engine.dispose()

        asyncio.run(go())
        if self.stack.redis_url:
            import redis

            client = redis.Redis.from_url(self.stack.redis_url)
            client.flushdb()
            client.close()

    def stop(self) -> None:
        if self.chain is not None:
            self.chain.stop()
        for proc in self.procs:
            if proc.poll() is None:
                # the parent only: Celery's prefork parent and uvicorn's supervisor stop their own
                # children (a child killed alongside may hold the pool's queue lock: the parent hangs)
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for fh in self.files:
            fh.close()
        self.events = _events(os.path.join(self.dir, "api.log"))

    async def scrape(self, client: Any) -> _report.Samples:
        r = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        return _report.parse(r.text)

    async def drive(self, live: Any) -> None:
        import httpx

        base = f"http://127.0.0.1:{self.api_port}"
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=self.args.pool_timeout + 30, limits=limits) as client:
            ids = []
            for _ in range(self.args.generations):
                r = await client.post(f"{base}/generate")
                r.raise_for_status()
                ids.append(r.json()["task_id"])

            async def stream(task_id: str) -> None:
                """A user watching the task: its status stream, and its page saying every second
                that it is still seen (a short update of the task's row)."""

                async def seen() -> None:
                    while time.monotonic() - t0 < self.args.duration:
                        try:
                            await client.post(f"{base}/tasks/{task_id}/seen")
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(1.0)

                pinger = asyncio.create_task(seen())
                try:
                    async with client.stream("GET", f"{base}/tasks/{task_id}/stream") as resp:
                        async for _ in resp.aiter_lines():
                            pass
                except httpx.HTTPError:
                    pass
                await pinger

            async def page(i: int) -> None:
                # the ordinary pages: a list, a note, a task's page (an update of its row), its status
                try:
                    kind = i % 4
                    if kind == 0:
                        await client.get(f"{base}/roadmaps")
                    elif kind == 1:
                        await client.post(f"{base}/notes")
                    elif kind == 2:
                        await client.post(f"{base}/tasks/{ids[i % len(ids)]}/seen")
                    else:
                        await client.get(f"{base}/tasks/{ids[i % len(ids)]}/status")
                except httpx.HTTPError:
                    pass

            t0, self.t0_wall = time.monotonic(), time.time()
            streams = [asyncio.create_task(stream(i)) for i in ids]
            pages: list[asyncio.Task[None]] = []
            prev: _report.Samples = []
            next_sample, i = t0, 0
            while time.monotonic() - t0 < self.args.duration:
                pages.append(asyncio.create_task(page(i)))
                i += 1
                if time.monotonic() >= next_sample:
                    prev = await self._sample(client, t0, prev, live)
                    next_sample += 0.5
                await asyncio.sleep(1 / self.args.rate)
            await asyncio.gather(*pages, *streams)
            # let the content tasks finish (they are the throughput figures)
            deadline = time.monotonic() + self.args.duration * 3 + 60
            while time.monotonic() < deadline:
                prev = await self._sample(client, t0, prev, live)
                done = _report.total(
                    prev, "celery_tasks_total", outcome="succeeded", task="generate_content"
                )
                if done >= self.args.generations:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.6)  # one more flush interval
            r = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
            self.raw_metrics = r.text
            self.samples = _report.parse(r.text)
            self._keep_peaks(self.samples)
        await asyncio.to_thread(self.collect_alerts)

    def _keep_peaks(self, samples: _report.Samples) -> None:
        names = _peak_names()
        for n, lb, v in samples:
            if n in names:
                key = (n, tuple(sorted(lb.items())))
                self.gauge_peaks[key] = max(self.gauge_peaks.get(key, v), v)

    async def _sample(
        self, client: Any, t0: float, prev: _report.Samples, live: Any
    ) -> _report.Samples:
        cur = await self.scrape(client)
        self.scrapes.append((time.monotonic(), cur))
        t = time.monotonic() - t0
        self._keep_peaks(cur)
        for service, usage in _report.usage_by_service(cur).items():
            self.peaks[service] = max(self.peaks.get(service, 0.0), usage)
            self.timeline["usage"].setdefault(service, []).append((t, usage))
            # how long in a row the busiest process stayed above the warning line: what an
            # alert's ``for:`` looks at (an instant at 100% is not a starved pool)
            if usage > T.POOL_USAGE_WARNING:
                since = self.above_since.setdefault(service, t)
                self.sustained[service] = max(self.sustained.get(service, 0.0), round(t - since, 3))
            else:
                self.above_since.pop(service, None)
        p95 = _report.interval_p95(prev, cur) if prev else None
        if p95 is not None:
            self.timeline["latency"]["api p95"].append((t, p95))
        waiting = _report.total(cur, "pgbouncer_clients", state="waiting")
        if self.stack.pgbouncer_url:
            self.timeline["pooler_waiting"].setdefault("clients waiting", []).append((t, waiting))
        sem = _report.total(cur, "asyncio_semaphore_waiters")
        self.timeline["semaphore_waiters"].setdefault("MAX_DB_CONCURRENT", []).append((t, sem))
        if live is not None:
            live.update(_live_table(self.scenario, t, cur, self.peaks, p95))
        return cur


def _events(path: str) -> list[dict[str, Any]]:
    """The package's own events from the API's log (one JSON object per line)."""
    out = []
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                if line.startswith("{") and '"event_loop_blocked"' in line:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    out.append(
                        {
                            k: event.get(k)
                            for k in ("event", "status", "service", "call_site", "blocked_seconds")
                        }
                    )
    except OSError:
        pass
    return out


def _live_table(scenario: str, t: float, samples: _report.Samples, peaks: dict[str, float],
                p95: float | None = None) -> Any:  # fmt: skip
    from rich.table import Table

    table = Table(title=f"scenario {scenario}: {t:4.0f}s  (pool usage per process now, peak)")
    for col in ("service", "pool", "pid", "in use / max", "waiting", "peak (busiest)"):
        table.add_column(col)
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for n, lb, v in samples:
        if n in (
            "db_pool_connections_in_use",
            "db_pool_connections_max",
            "db_pool_pending_requests",
        ):
            rows.setdefault((lb["service"], lb["pool"], lb["pid"]), {})[n] = v
    for (service, pool, pid), r in sorted(rows.items()):
        if (
            not r.get("db_pool_connections_in_use")
            and not r.get("db_pool_pending_requests")
            and service != "api"
        ):
            continue  # idle worker children: the table stays readable
        table.add_row(service, pool.rsplit("/", 1)[-1], pid,
                      f"{r.get('db_pool_connections_in_use', 0):.0f} / "
                      + (f"{r['db_pool_connections_max']:.0f}" if "db_pool_connections_max" in r else "-"),
                      f"{r.get('db_pool_pending_requests', 0):.0f}", f"{peaks.get(service, 0) * 100:.0f}%")  # fmt: skip
    done = _report.total(
        samples, "celery_tasks_total", outcome="succeeded", task="generate_content"
    )
    failed = sum(
        v
        for n, lb, v in samples
        if n == "http_server_request_duration_seconds_count"
        and lb.get("status", "").startswith("5")
    )
    waiting = _report.total(samples, "pgbouncer_clients", state="waiting")
    latency = "-" if p95 is None else f"{p95 * 1000:.0f} ms"
    table.caption = (f"content tasks done: {done:.0f}   API p95 (last 0.5 s): {latency}   API 5xx so far: {failed:.0f}"
                     f"   pooler clients waiting: {waiting:.0f}")  # fmt: skip
    return table


@contextlib.contextmanager
def open_stack(args: Any) -> Iterator[Stack]:
    """The embedded default, the user's own servers (``--database-url``/``--broker``), or
    throwaway PostgreSQL + pgbouncer + Redis started from the installed binaries."""
    if args.stack != "real":
        if args.database_url:
            check_database(args.database_url)
        yield Stack(
            "embedded" if not args.database_url else "custom", args.database_url, args.broker
        )
        return
    from . import stack as _stack

    try:
        with contextlib.ExitStack() as started:
            pg = started.enter_context(_stack.start_postgres(max_connections=100))
            bouncer = started.enter_context(_stack.start_pgbouncer(pg, POOLER_SERVER_CONNECTIONS))
            redis = started.enter_context(_stack.start_redis())
            database_url: str = bouncer.url("psycopg")
            console: str | None = bouncer.admin_url
            if getattr(args, "pooler", "pgbouncer") == "supavisor":  # renamed clients, no console
                proxy = started.enter_context(_stack.RenamingProxy(bouncer.port))
                database_url, console = proxy.url("psycopg"), None
            yield Stack("real", database_url=database_url, broker=redis.url,
                        redis_url=redis.url.rsplit("/", 1)[0] + "/2",
                        server_view_url=pg.url().replace("+psycopg", ""), pgbouncer_url=console)  # fmt: skip
    except _stack.Missing as exc:
        raise DemoError(f"--stack real: {exc}") from None


def _run_one(scenario: str, args: Any, workdir: str, stack: Stack, console: Any,
             overrides: dict[str, dict[str, str]] | None = None, label: str | None = None) -> tuple[Run, dict[str, Any]]:  # fmt: skip
    """One scenario, start to stop: the run and its summary."""
    from rich.live import Live

    demo = Run(scenario, args, workdir, stack, overrides, label)
    t0 = time.monotonic()
    try:
        demo.start()
        console.print(f"  started in {time.monotonic() - t0:.0f} s; /metrics (host aggregate, Prometheus can "
                      f"scrape it): http://127.0.0.1:{demo.metrics_port}/metrics")  # fmt: skip
        t1 = time.monotonic()
        with Live(console=console, refresh_per_second=2, transient=not sys.stdout.isatty()) as live:
            asyncio.run(demo.drive(live))
        console.print(f"  load and content tasks done in {time.monotonic() - t1:.0f} s")
    finally:
        t2 = time.monotonic()
        demo.stop()
        console.print(f"  stopped in {time.monotonic() - t2:.0f} s")
    peaks = [[name, dict(labels), v] for (name, labels), v in demo.gauge_peaks.items()]
    result = _report.summarize(scenario, demo.samples, demo.peaks, args.concepts, peaks, demo.events,
                               demo.sustained, demo.alerting)  # fmt: skip
    demo.timeline["alerts"] = [(a["fired_at_seconds"], a["alert"], a["severity"]) for a in demo.alerting["alerts"]]
    demo.timeline["peaks_for_raw"] = peaks
    return demo, result


def _advise(demo: Run, args: Any) -> _capacity.Advice | None:
    if len(demo.scrapes) < 2:
        return None
    window = _capacity.from_scrapes(demo.scrapes)
    return _capacity.advise(window, hold_threshold=_alerting.hold_threshold_seconds(args.pool_timeout))


def run(args: Any) -> int:
    from rich.console import Console

    scenarios = choose(args.scenario, args.stack)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="telemetry-demo-")
    results, timelines, raw = [], {}, {}
    console = Console()
    with open_stack(args) as stack:
        console.print(f"[bold]stack {stack.name}[/]" + (f": pgbouncer (transaction mode, {POOLER_SERVER_CONNECTIONS} "
                      "server connections) in front of PostgreSQL, Redis" if stack.name == "real" else "")
                      + (", behind a proxy that renames every client (as Supavisor does), no pooler console"
                         if stack.name == "real" and not stack.pgbouncer_url else ""))  # fmt: skip
        for note in stack.cannot_show():
            console.print(f"  this stack cannot show: {note}")
        advice: dict[str, Any] = {}
        advised: dict[str, _capacity.Advice] = {}
        for n, scenario in enumerate(scenarios, 1):
            spec = SCENARIOS[scenario]
            console.print(f"[bold]scenario {scenario}[/] ({n}/{len(scenarios)}, {spec.kind}): {spec.about}")
            demo, result = _run_one(scenario, args, workdir, stack, console)
            peaks = demo.timeline.pop("peaks_for_raw")
            results.append(result)
            timelines[scenario] = demo.timeline
            raw[scenario] = {"metrics": demo.raw_metrics, "peaks": demo.peaks, "gauge_peaks": peaks, "events": demo.events,
                             "sustained": demo.sustained, "alerting": demo.alerting}  # fmt: skip
            console.print("  " + result["diagnosis"], markup=False, highlight=False)
            got = _advise(demo, args)
            if got is None:
                continue
            advised[scenario] = got
            entry: dict[str, Any] = {"text": _capacity.render(got), "advice": _capacity.as_dict(got),
                                     "overrides": _demo_advice.overrides(got)}  # fmt: skip
            if entry["overrides"] and args.prove_advice:
                console.print(f"[bold]scenario {scenario}, re-run with the advised sizes[/]: {entry['overrides']}")
                _rerun, again = _run_one(scenario, args, workdir, stack, console, entry["overrides"], f"{scenario}+advised")
                entry["proof"] = _demo_advice.held(again, args.pool_timeout)
                entry["rerun"] = {k: again[k] for k in ("api", "checkout_wait_p95_seconds", "pool_usage_peak", "alerts")}
            elif any(p.release is not None for p in got.pools):
                remedy = f"{scenario}-remedy"
                entry["no_proof"] = (f"size is not the answer; its remedy ({remedy}) proves it when it runs"
                                     if remedy in SCENARIOS else "size is not the answer")  # fmt: skip
            else:
                entry["no_proof"] = "the configuration carried the measured load: nothing to re-run"
            suspect = scenario.removesuffix("-remedy")  # a remedy proves its suspect's "release it"
            if suspect != scenario and suspect in advised and any(p.release is not None for p in advised[suspect].pools):
                advice[suspect]["proof"] = _demo_advice.remedy_proof(advised[suspect], result, got)
            advice[scenario] = entry
    plans = {name: s.env for name, s in SCENARIOS.items() if s.kind == "plan"}
    judged = _demo_advice.judge_plans(advised["seed"], plans, SEED) if "seed" in advised else []
    rows = _report.comparison(results)
    text = _report.render_text(results, rows, stack.cannot_show(), advice, judged)
    console.print(text, markup=False, highlight=False)
    report = {"stack": stack.name, "pooler": "supavisor (renamed clients, no console)" if stack.name == "real"
              and not stack.pgbouncer_url else "pgbouncer (console read)" if stack.name == "real" else None,
              "cannot_show": stack.cannot_show(), "results": results, "comparison": rows,
              "disagreements": _report.disagreements(rows), "timelines": timelines,
              "settings": {k: v for k, v in vars(args).items() if k != "func"},
              "scenarios": {n: {"kind": s.kind, "about": s.about, "env": {**SEED, **s.env}} for n, s in SCENARIOS.items()},
              "advice": advice, "plans_against_the_advice": judged, "raw": raw}  # fmt: skip
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(os.path.join(out_dir, "report.html"), "w") as fh:
        fh.write(_report.render_html(results, timelines, text))
    console.print(f"\nreport: {out_dir}/report.json and {out_dir}/report.html (charts)")
    return 0
