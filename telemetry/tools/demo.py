"""``telemetry demo``: reproduce the content-pipeline incident with real processes and diagnose it.

For each scenario it starts the reference pipeline (``examples/content_pipeline``): uvicorn with
``UVICORN_WORKERS`` workers and a prefork Celery worker with ``CELERY_CONTENT_CONCURRENCY``
children, on SQLite and kombu's SQLAlchemy transport by default (no server to install) or on
PostgreSQL and Redis (``--database-url``, ``--broker``). It drives K generations, each watched by
a status stream, plus a steady stream of ordinary page requests; shows pool usage live; serves
the host's ``/metrics`` (Prometheus can scrape it); and ends with the incident report, computed
only from the package's metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import report as _report

SCENARIOS: dict[str, dict[str, str]] = {
    # the report's configuration
    "seed": {"DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "2", "MAX_DB_CONCURRENT": "3",
             "UVICORN_WORKERS": "4", "CELERY_CONTENT_CONCURRENCY": "6", "BATCH_SIZE": "0"},
    # its plan 1: pools 5+5, semaphore 8, 2 API workers, content concurrency 3
    "fixed": {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "5", "MAX_DB_CONCURRENT": "8",
              "UVICORN_WORKERS": "2", "CELERY_CONTENT_CONCURRENCY": "3", "BATCH_SIZE": "0"},
    # its plan 2: plan 1 plus batched saves (5 concepts per session)
    "batched": {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "5", "MAX_DB_CONCURRENT": "8",
                "UVICORN_WORKERS": "2", "CELERY_CONTENT_CONCURRENCY": "3", "BATCH_SIZE": "5"},
}  # fmt: skip


class DemoError(Exception):
    """A clear message for the user; the CLI prints it and exits non-zero."""


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with code {proc.returncode}; last lines of {log}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s; see {log}")


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


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
        raise DemoError(f"cannot reach the database at {safe}: {type(exc).__name__}: {exc}".strip()) from None


class Run:
    """One scenario: processes, load, sampling."""

    def __init__(self, scenario: str, args: Any, workdir: str) -> None:
        self.scenario = scenario
        self.args = args
        self.dir = os.path.join(workdir, scenario)
        os.makedirs(os.path.join(self.dir, "mp"), exist_ok=True)
        self.api_port, self.metrics_port = _free_port(), _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Any] = []
        self.timeline: dict[str, Any] = {"usage": {}, "latency": {"api p95": []}}
        self.peaks: dict[str, float] = {}
        self.samples: _report.Samples = []
        self.raw_metrics = ""

    def env(self) -> dict[str, str]:
        db = self.args.database_url or f"sqlite+aiosqlite:///{self.dir}/pipeline.db"
        broker = self.args.broker or f"sqla+sqlite:///{self.dir}/broker.db"
        backend = self.args.broker or f"db+sqlite:///{self.dir}/results.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "OTEL_"))}
        env.update(SCENARIOS[self.scenario])
        env.update(
            DATABASE_URL=db, BROKER_URL=broker, RESULT_BACKEND=backend,
            DB_POOL_TIMEOUT=str(self.args.pool_timeout), CONCEPTS=str(self.args.concepts),
            LLM_SECONDS=str(self.args.llm_seconds), SAVE_SECONDS=str(self.args.save_seconds),
            STREAM_SECONDS=str(self.args.duration), SSE_HOLDS_SESSION="1",
            TELEMETRY_MULTIPROC_DIR=os.path.join(self.dir, "mp"), TELEMETRY_FLUSH_INTERVAL_SECONDS="0.25",
            TELEMETRY_METRICS_PORT=str(self.metrics_port), TELEMETRY_TRACING="false",
            PYTHONUNBUFFERED="1", PYTHONPATH=_root() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )  # fmt: skip
        return env

    def start(self) -> None:
        env = self.env()
        root = _root()
        if not os.path.isdir(os.path.join(root, "examples", "content_pipeline")):
            raise DemoError(f"the reference pipeline is not at {root}/examples/content_pipeline: run from a checkout")
        if root not in sys.path:
            sys.path.insert(0, root)

        os.environ.update({k: env[k] for k in ("DATABASE_URL",)})
        self._schema(env["DATABASE_URL"])
        wlog, alog = os.path.join(self.dir, "worker.log"), os.path.join(self.dir, "api.log")
        wout, aout = open(wlog, "w"), open(alog, "w")  # noqa: SIM115 - closed in stop()
        self.files += [wout, aout]
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.content_pipeline.worker", "worker",
             "--pool", "prefork", "--concurrency", env["CELERY_CONTENT_CONCURRENCY"], "-l", "warning"],
            cwd=root, env=env, stdout=wout, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.content_pipeline.api:app", "--workers",
             env["UVICORN_WORKERS"], "--host", "127.0.0.1", "--port", str(self.api_port),
             "--log-level", "warning"],
            cwd=root, env=env, stdout=aout, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        _wait_port(self.metrics_port, self.procs[0], "the Celery worker", wlog)
        _wait_port(self.api_port, self.procs[1], "the API", alog)

    def _schema(self, url: str) -> None:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import create_async_engine

        from examples.content_pipeline.db import create_schema

        async def go() -> None:
            engine = create_async_engine(url)
            if url.startswith("sqlite"):
                @event.listens_for(engine.sync_engine, "connect")
                def _wal(dbapi_conn: Any, _rec: Any) -> None:
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.close()
            await create_schema(engine)
            await engine.dispose()

        asyncio.run(go())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for fh in self.files:
            fh.close()

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
                try:
                    async with client.stream("GET", f"{base}/tasks/{task_id}/stream") as resp:
                        async for _ in resp.aiter_lines():
                            pass
                except httpx.HTTPError:
                    pass

            async def page(i: int) -> None:
                try:
                    if i % 3 == 2:
                        await client.post(f"{base}/notes")
                    else:
                        await client.get(f"{base}/roadmaps")
                except httpx.HTTPError:
                    pass

            t0 = time.monotonic()
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
                done = _report.total(prev, "celery_tasks_total", outcome="succeeded")
                if done >= self.args.generations:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.6)  # one more flush interval
            r = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
            self.raw_metrics = r.text
            self.samples = _report.parse(r.text)

    async def _sample(self, client: Any, t0: float, prev: _report.Samples, live: Any) -> _report.Samples:
        cur = await self.scrape(client)
        t = time.monotonic() - t0
        for service, usage in _report.usage_by_service(cur).items():
            self.peaks[service] = max(self.peaks.get(service, 0.0), usage)
            self.timeline["usage"].setdefault(service, []).append((t, usage))
        p95 = _report.interval_p95(prev, cur) if prev else None
        if p95 is not None:
            self.timeline["latency"]["api p95"].append((t, p95))
        if live is not None:
            live.update(_live_table(self.scenario, t, cur, self.peaks, p95))
        return cur


def _live_table(scenario: str, t: float, samples: _report.Samples, peaks: dict[str, float],
                p95: float | None = None) -> Any:  # fmt: skip
    from rich.table import Table

    table = Table(title=f"scenario {scenario}: {t:4.0f}s  (pool usage per process now, peak)")
    for col in ("service", "pool", "pid", "in use / max", "waiting", "peak (busiest)"):
        table.add_column(col)
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for n, lb, v in samples:
        if n in ("db_pool_connections_in_use", "db_pool_connections_max", "db_pool_pending_requests"):
            rows.setdefault((lb["service"], lb["pool"], lb["pid"]), {})[n] = v
    for (service, pool, pid), r in sorted(rows.items()):
        # the app's database, and kombu's broker/result-backend pools when they use SQLAlchemy
        table.add_row(service, pool.rsplit("/", 1)[-1], pid,
                      f"{r.get('db_pool_connections_in_use', 0):.0f} / "
                      + (f"{r['db_pool_connections_max']:.0f}" if "db_pool_connections_max" in r else "-"),
                      f"{r.get('db_pool_pending_requests', 0):.0f}", f"{peaks.get(service, 0) * 100:.0f}%")  # fmt: skip
    done = _report.total(samples, "celery_tasks_total", outcome="succeeded")
    failed = sum(v for n, lb, v in samples if n == "http_server_request_duration_seconds_count" and lb.get("status", "").startswith("5"))
    latency = "-" if p95 is None else f"{p95 * 1000:.0f} ms"
    table.caption = f"content tasks done: {done:.0f}   API p95 (last 0.5 s): {latency}   API 5xx so far: {failed:.0f}"
    return table


def run(args: Any) -> int:
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    if args.database_url:
        check_database(args.database_url)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="telemetry-demo-")
    results, timelines, raw = [], {}, {}
    from rich.console import Console
    from rich.live import Live

    console = Console()
    for scenario in scenarios:
        demo = Run(scenario, args, workdir)
        console.print(f"[bold]scenario {scenario}[/]: {SCENARIOS[scenario]}")
        try:
            demo.start()
            console.print(f"  /metrics (host aggregate, Prometheus can scrape it): http://127.0.0.1:{demo.metrics_port}/metrics")
            with Live(console=console, refresh_per_second=2, transient=not sys.stdout.isatty()) as live:
                asyncio.run(demo.drive(live))
        finally:
            demo.stop()
        results.append(_report.summarize(scenario, demo.samples, demo.peaks, args.concepts))
        timelines[scenario] = demo.timeline
        raw[scenario] = {"metrics": demo.raw_metrics, "peaks": demo.peaks}
    rows = _report.comparison(results)
    text = _report.render_text(results, rows)
    console.print(text, markup=False, highlight=False)
    report = {"results": results, "comparison": rows, "disagreements": _report.disagreements(rows),
              "timelines": timelines, "settings": {k: v for k, v in vars(args).items() if k != "func"},
              "scenarios": SCENARIOS, "raw": raw}  # fmt: skip
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(os.path.join(out_dir, "report.html"), "w") as fh:
        fh.write(_report.render_html(results, timelines, text))
    console.print(f"\nreport: {out_dir}/report.json and {out_dir}/report.html (charts)")
    return 0
