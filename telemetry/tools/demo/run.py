"""One demo scenario's processes, load and sampling: the reference pipeline's API (uvicorn
workers) and its three prefork Celery worker groups on a stack, the load that drives them, the
live table, the scrapes the report and the capacity advice read, and the alert chain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from telemetry import thresholds as T
from telemetry.tools._proc import DemoError, free_ports, tail

from . import alerting as _alerting
from . import report as _report
from .scenarios import GROUPS, SCENARIOS, SEED


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
    from telemetry.tools.live.diagnose import USED_GAUGES

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
        # the alert chain starts while the app's processes do (each waits on its own readiness)
        chain_error: list[BaseException] = []

        def chain() -> None:
            try:
                self._start_chain()
            except BaseException as exc:  # re-raised below, in the demo's thread
                chain_error.append(exc)

        chain_thread = threading.Thread(target=chain, name="demo-alert-chain", daemon=True)
        chain_thread.start()
        try:
            self._start_app(env, root)
        finally:
            chain_thread.join()
        if chain_error:
            raise chain_error[0]
        _wait_port(self.api_port, self.procs[-1], "the API", os.path.join(self.dir, "api.log"))
        if self.chain is not None:
            self.chain.wait_scraped()

    def _start_app(self, env: dict[str, str], root: str) -> None:
        """Every process at once: the content worker's prefork parent serves the host's
        ``/metrics`` (the others have no metrics port: they write their files, it reads them),
        so nothing needs to wait for another to start."""
        others = {k: v for k, v in env.items() if k != "TELEMETRY_METRICS_PORT"}
        first = None
        for queue, knob in GROUPS:
            log = os.path.join(self.dir, f"{queue}-worker.log")
            out = open(log, "w")  # noqa: SIM115 - closed in stop()
            self.files.append(out)
            base = env if first is None else others
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "telemetry.tools.demo.pipeline.worker", "worker",
                 "--pool", "prefork", "-Q", queue, "-n", f"{queue}@%h",
                 "--concurrency", self.overrides.get(f"{queue}-worker", {}).get(knob, env[knob]),
                 "-l", "warning"],
                cwd=root, env={**base, "WORKER_SERVICE": f"{queue}-worker", **self.overrides.get(f"{queue}-worker", {})}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            self.procs.append(proc)
            if first is None:
                first = (proc, log)
        alog = os.path.join(self.dir, "api.log")
        aout = open(alog, "w")  # noqa: SIM115 - closed in stop()
        self.files.append(aout)
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "telemetry.tools.demo.pipeline.api:app", "--workers",
             env["UVICORN_WORKERS"], "--host", "127.0.0.1", "--port", str(self.api_port),
             "--log-level", "warning"],
            cwd=root, env={**others, **self.overrides.get("api", {})}, stdout=aout, stderr=subprocess.STDOUT,
            start_new_session=True,
        ))  # fmt: skip
        assert first is not None
        _wait_port(self.metrics_port, first[0], "the content worker", first[1])  # it serves the host's /metrics

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

        from .pipeline.db import connect_args, metadata

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
        # the alert chain stops while the app's processes do
        chain = threading.Thread(target=self.chain.stop, daemon=True) if self.chain is not None else None
        if chain is not None:
            chain.start()
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
        if chain is not None:
            chain.join()
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
