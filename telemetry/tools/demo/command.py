"""``telemetry demo``: run the incident report's backend with real processes, its plans and
planted suspects, and diagnose each from the package's own metrics and events.

For each scenario it starts the reference pipeline (``telemetry/tools/demo/pipeline``): uvicorn with
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
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from telemetry.tools._proc import DemoError
from telemetry.tools.live import capacity as _capacity

from . import advice as _demo_advice
from . import alerting as _alerting
from . import report as _report
from . import report_html as _report_html
from .run import Run, Stack, check_database
from .scenarios import POOLER_SERVER_CONNECTIONS, SCENARIOS, SEED, choose  # noqa: F401 - re-exported


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


def _advise(demo: Run, args: Any, stack: Any) -> _capacity.Advice | None:
    """The advice from the run's scrapes, against the deployment's limits: the real stack's
    pgbouncer (its pool and max_client_conn), or on the embedded stack the report's own (~50
    server connections behind Supabase's pooler, and its client limit)."""
    if len(demo.scrapes) < 2:
        return None
    window = _capacity.from_scrapes(demo.scrapes)
    limits = _demo_advice.REAL_LIMITS if stack.name == "real" else _demo_advice.REPORT_LIMITS
    return _capacity.advise(window, hold_threshold=_alerting.hold_threshold_seconds(args.pool_timeout),
                            server=limits[0], client=limits[1], shared=_demo_advice.shared)  # fmt: skip


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
            got = _advise(demo, args, stack)
            if got is None:
                continue
            advised[scenario] = got
            entry: dict[str, Any] = {"text": _capacity.render(got), "advice": _capacity.as_dict(got),
                                     "overrides": _demo_advice.overrides(got)}  # fmt: skip
            if entry["overrides"] and args.prove_advice:
                console.print(f"[bold]scenario {scenario}, re-run with the advised sizes[/]: {entry['overrides']}")
                _rerun, again = _run_one(scenario, args, workdir, stack, console, entry["overrides"], f"{scenario}+advised")
                entry["proof"] = _demo_advice.held(again, args.pool_timeout, set(entry["overrides"]), result)
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
        fh.write(_report_html.render_html(results, timelines, text))
    console.print(f"\nreport: {out_dir}/report.json and {out_dir}/report.html (charts)")
    return 0
