"""`telemetry demo` end to end in a short mode. On its embedded stack (SQLite, kombu's SQLAlchemy
transport): the report's seed, plan 2, and the planted suspects it can host, each diagnosed by
cause and holder, one with its remedy. On the real stack (PostgreSQL behind pgbouncer in
transaction mode, Redis, started by the demo itself): the suspects only a shared server can
host. Every number is recomputed from the metrics snapshot the report carries; bad arguments end
with a message and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from telemetry.tools.demo import report as _report
from tests import ROOT

SHORT = ["--duration", "6", "--generations", "8", "--concepts", "6", "--rate", "12",
         "--llm-seconds", "0.1", "--save-seconds", "0.1", "--pool-timeout", "2"]  # fmt: skip


def _demo(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = subprocess.run([sys.executable, "-m", "telemetry.tools.cli", "demo", *SHORT, "--out", str(tmp_path), *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "report.json") as fh:
        return out, json.load(fh)


def _results(report: dict, scenarios: list[str], tasks: int = 8) -> dict[str, dict]:
    by = {r["scenario"]: r for r in report["results"]}
    assert list(by) == scenarios
    for name, r in by.items():
        raw = report["raw"][name]
        again = _report.summarize(name, _report.parse(raw["metrics"]), raw["peaks"], 6, raw["gauge_peaks"], raw["events"],
                                  raw["sustained"], raw["alerting"])  # fmt: skip
        assert (
            json.loads(json.dumps(again, default=str)) == r
        )  # every number comes from the metrics
        assert r["tasks_succeeded"] == tasks, name
    assert {row["scenario"] for row in report["comparison"]} == set(scenarios) & {
        "seed",
        "fixed",
        "batched",
    }
    return by


def _fired(r: dict, service: str | None = None) -> set[str]:
    """The alerts Prometheus fired in a scenario (its ``ALERTS``), for one service's series."""
    assert r["alerts_not_evaluated"] is None, r["alerts_not_evaluated"]
    return {
        a["alert"] for a in r["alerts"] if service is None or a["labels"].get("service") == service
    }


def _check_notifications(r: dict) -> None:
    """Each fired alert that Alertmanager did not inhibit reached its receiver as the shipped routes
    say (critical: PagerDuty, warning: Slack) with its runbook; each resolved one was resolved there."""
    inhibited = {
        "DbPoolUsageWarning": "DbPoolUsageCritical",
        "RedisPoolUsageWarning": "RedisPoolUsageCritical",
    }
    fired = {a["alert"] for a in r["alerts"]}
    for a in r["alerts"]:
        if inhibited.get(a["alert"]) in fired:
            continue
        # an episode still firing at the end lasted as long as it was seen (a CI run collected
        # one that began 1.7 s before the end, before Alertmanager's first flush of its group)
        lasted = (a["resolved_at_seconds"] or a["last_seen_seconds"] + 1) - a["fired_at_seconds"]
        # an episode over before its group was flushed is never notified, rightly: the first within
        # group_wait (1 s on the demo's clock), a later one of a group already notified within
        # group_interval (5 s); 2 s more for Prometheus' send and the evaluation step
        if lasted < 7:
            continue
        receiver = "pagerduty" if a["severity"] == "critical" else "slack"
        sent = [
            n
            for n in r["notifications"]
            if n["receiver"] == receiver and a["alert"] in n["summary"]
        ]
        assert any(n["status"] in ("trigger", "firing") for n in sent), (a, r["notifications"])
        assert all(n["runbook"].endswith(f"/{a['alert']}.md") for n in sent), sent
        assert all(n["at_seconds"] >= a["fired_at_seconds"] - 1 for n in sent), (a, sent)
        if a["resolved_at_seconds"] is not None:
            assert any(n["status"] in ("resolve", "resolved") for n in sent), (a, sent)
    for n in r["notifications"]:  # nothing else was sent
        assert any(a in n["summary"] for a in fired), n


def _check_seed_alerts(r: dict, pool_timeout: float) -> None:
    """The seed scenario's alerts are the ones its report's numbers justify: each fired alert has
    the figure that crossed its threshold (thresholds on the demo's clock), and the report's pool
    timeouts fire their alert."""
    from telemetry import thresholds as T
    from telemetry.tools.demo import alerting

    scale = alerting.rules_config(pool_timeout).seconds_scale
    holds = r["hold_p95_seconds_by_owner"]
    justified = {
        "DbPoolUsageWarning": lambda s: r["pool_usage_peak"].get(s, 0) > T.POOL_USAGE_WARNING,
        "DbPoolUsageCritical": lambda s: r["pool_usage_peak"].get(s, 0) > T.POOL_USAGE_CRITICAL,
        "DbPoolCheckoutTimeouts": lambda s: s == "api" and r["api"]["pool_timeouts"] > 0,
        "DbPoolCheckoutWaitHigh": lambda s: (r["checkout_wait_p95_seconds"].get(s) or 0) > 0,
        "DbPoolPendingRequests": lambda s: (r["checkout_wait_p95_seconds"].get(s) or 0) > 0,
        # a hold past the threshold: its owner's p95 is at least of its order
        "DbConnectionHoldTooLong": lambda s: any((v or 0) > T.HOLD_SECONDS_WARNING * scale / 2
                                                 for k, v in holds.items() if k.startswith(f"{s}: ")),
        "SemaphoreConvoy": lambda s: (r["semaphore"]["mean_wait_seconds"] or 0) > 0,
        "EventLoopBlocked": lambda s: r["event_loop_blocked"] > 0,
        "CeleryWorkerSlotsSaturated": lambda s: any(f.startswith("Celery: every slot") for f in r["beyond_the_pools"]),
    }  # fmt: skip
    for a in r["alerts"]:
        assert a["alert"] in justified and justified[a["alert"]](a["labels"].get("service", "")), (
            a,
            r,
        )
    assert ("DbPoolCheckoutTimeouts" in _fired(r, "api")) == (r["api"]["pool_timeouts"] > 0), r[
        "alerts"
    ]


def _said(r: dict) -> str:
    return " ".join([r["diagnosis"], *r["beyond_the_pools"]])


@pytest.mark.integration
def test_demo_on_the_embedded_stack(tmp_path):
    scenarios = [
        "seed",
        "batched",
        "stream-session",
        "stream-session-remedy",
        "sync-call",
        "sync-call-remedy",
    ]
    # 16 streams over 4 API workers of 2+2 connections: one worker at least gets 4 (pigeonhole),
    # so the planted stream session starves that worker's pool whatever the kernel's spread.
    # 14 s of load: the hold alert's for: (10m) on the demo's clock is 10 s
    out, report = _demo(
        tmp_path, "--scenario", ",".join(scenarios), "--generations", "16", "--duration", "14"
    )
    by = _results(report, scenarios, tasks=16)
    assert report["stack"] == "embedded" and any("no pooler" in n for n in report["cannot_show"])
    assert "this stack cannot show: no pooler" in out.stdout
    # the report's own code plants nothing: its streams hold no database connection
    assert "GET /tasks/{task_id}/stream" not in by["seed"]["hold_seconds_by_owner"].get("api", {})
    # plan 2 saves 5 concepts per session: far fewer sessions, attributed to save-batch
    assert by["seed"]["semaphore"]["waits"] == 16 * 6  # one save per concept
    assert by["batched"]["semaphore"]["waits"] == 16 * 2  # 6 concepts in batches of 5: 2 saves
    assert "content-worker: save-batch" in by["batched"]["hold_p95_seconds_by_owner"]
    assert "content-worker: save-concept" not in by["batched"]["hold_p95_seconds_by_owner"]
    # suspect: a stream holding its session. The diagnosis names the cause and the holder
    suspect = by["stream-session"]
    assert suspect["api"]["pool_timeouts"] > 0
    assert "'GET /tasks/{task_id}/stream'" in suspect["diagnosis"]
    assert "release it between polls" in suspect["diagnosis"]
    # the shipped rules in a real Prometheus name the cause: the pool exhausted and held too long
    assert {"DbPoolUsageCritical", "DbConnectionHoldTooLong", "DbPoolCheckoutTimeouts"} <= _fired(
        suspect, "api"
    )
    for r in by.values():
        _check_notifications(r)
    assert "DbPoolUsageCritical" in out.stdout and "pagerduty trigger" in out.stdout
    assert not suspect["verdict"]["healthy"]
    assert (
        suspect["pool_above_warning_longest_seconds"]["api"] >= 2
    )  # the starved worker stays full
    # its remedy, as the diagnosis recommends: no timeouts, the API's pool under the warning line
    # (never above it for 2 s in a row: on 2 cores, 4 connections are all out for an instant)
    remedy = by["stream-session-remedy"]
    assert remedy["api"]["pool_timeouts"] == 0
    assert remedy["verdict"]["checks"]["api_pool_below_warning"], remedy[
        "pool_above_warning_longest_seconds"
    ]
    cause = {
        "DbPoolUsageWarning",
        "DbPoolUsageCritical",
        "DbConnectionHoldTooLong",
        "DbPoolCheckoutTimeouts",
    }
    assert not cause & _fired(remedy, "api"), remedy["alerts"]
    # suspect: a synchronous call inside async def, named by the line the loop was blocked on
    blocked = by["sync-call"]
    assert blocked["event_loop_blocked"] > 0
    assert "_blocking_call" in (blocked["blocking_call_site"] or ""), blocked["blocking_call_site"]
    assert (
        "event loop was blocked" in blocked["diagnosis"]
        and "asyncio.to_thread" in blocked["diagnosis"]
    )
    assert "EventLoopBlocked" in _fired(blocked, "api")
    assert "EventLoopBlocked" not in _fired(by["sync-call-remedy"], "api"), by["sync-call-remedy"][
        "alerts"
    ]
    _check_seed_alerts(by["seed"], report["settings"]["pool_timeout"])
    # capacity advice: the stream session is released, not pooled, and its remedy proves it;
    # where size was the answer, the re-run with the advised sizes held
    advice = report["advice"]
    assert "release it, do not grow the pool: 'GET /tasks/{task_id}/stream'" in "\n".join(advice["stream-session"]["text"])
    assert advice["stream-session"]["proof"]["remedy"] == "stream-session-remedy", advice["stream-session"]
    assert advice["stream-session"]["proof"]["held"], advice["stream-session"]["proof"]
    for name, entry in advice.items():
        if entry["overrides"]:
            assert entry["proof"]["held"], (name, entry["proof"])
    assert {row["plan"] for row in report["plans_against_the_advice"]} == {"fixed", "batched"}
    assert "capacity advice (telemetry budget" in out.stdout
    html = (tmp_path / "report.html").read_text()
    # matplotlib charts, text kept as text: axes with units, the thresholds, a panel per scenario
    assert (
        "EventLoopBlocked" in html and "notifications received" in html
    )  # marked on the charts, listed
    assert html.count("<svg") == 3  # pool usage, API p95, semaphore waiters (no pooler here)
    for label in (
        "checked out / max (%)",
        "warning 80%",
        "critical 95%",
        "seconds since the load started",
        "stream-session-remedy",
    ):
        assert label in html, label


@pytest.mark.integration
def test_demo_on_the_real_stack(tmp_path):
    scenarios = ["seed", "worker-transactions", "worker-transactions-remedy", "redis-subscriptions",
                 "redis-subscriptions-remedy", "row-lock", "row-lock-remedy"]  # fmt: skip
    # LLM steps of 0.2 s: the planted transactions keep the pooler queued for the whole load (at
    # 0.1 s the queue came in bursts too short for PgbouncerClientsWaiting's for: on a loaded CI)
    out, report = _demo(tmp_path, "--stack", "real", "--scenario", ",".join(scenarios), "--llm-seconds", "0.2")
    by = _results(report, scenarios)
    assert report["stack"] == "real" and report["cannot_show"] == []
    assert "pgbouncer (transaction mode" in out.stdout
    # suspect: the content workers' transactions held across the LLM steps fill the pooler
    tx = by["worker-transactions"]
    assert tx["pooler_clients_waiting_peak"] > 0
    pooler = [f for f in tx["beyond_the_pools"] if f.startswith("pgbouncer:")]
    assert pooler and "content-worker" in pooler[0] and "'generate_content'" in pooler[0], tx[
        "beyond_the_pools"
    ]
    assert tx["diagnosis"].startswith("The shared limit was reached at the pooler"), tx["diagnosis"]
    assert (
        by["worker-transactions-remedy"]["pooler_clients_waiting_peak"]
        < tx["pooler_clients_waiting_peak"]
    )
    # each suspect fires the shipped alert that names its cause, each remedy none of them
    # (the pooler's queue: its warning, or its critical alert when the oldest wait passed the
    # critical threshold before the warning's for: ran out on a loaded machine; both name it)
    for suspect, cause, service in (("worker-transactions", {"PgbouncerClientsWaiting", "PgbouncerClientWaitCritical"}, None),
                                    ("redis-subscriptions", {"RedisPoolUsageCritical", "RedisPoolCheckoutFailures"}, "api"),
                                    ("row-lock", {"DbLockWaitLong"}, None)):  # fmt: skip
        assert cause & _fired(by[suspect], service), (suspect, by[suspect]["alerts"])
        assert not cause & _fired(by[f"{suspect}-remedy"], service), (
            suspect,
            by[f"{suspect}-remedy"]["alerts"],
        )
    for r in by.values():
        _check_notifications(r)
    # suspect: subscriptions exhaust the API's shared Redis pool; the holder is the stream route
    redis = [f for f in by["redis-subscriptions"]["beyond_the_pools"] if f.startswith("Redis:")]
    assert redis and "'GET /tasks/{task_id}/stream'" in redis[0], by["redis-subscriptions"][
        "beyond_the_pools"
    ]
    assert by["redis-subscriptions"]["diagnosis"].startswith("Redis: pool"), by[
        "redis-subscriptions"
    ]["diagnosis"]
    # suspect: a row lock across an LLM call; the blocker (task) and its victims (the task's page)
    locks = [f for f in by["row-lock"]["beyond_the_pools"] if f.startswith("Locks:")]
    assert locks and "content-worker 'generate_content' holds a lock" in locks[0], by["row-lock"][
        "beyond_the_pools"
    ]
    assert by["row-lock"]["diagnosis"].startswith("Row locks: content-worker 'generate_content'")
    # the verdict says so when the API is among the victims
    api_blocked = "api '" in locks[0].split(" blocks ", 1)[1].split(";")[0]
    assert by["row-lock"]["verdict"]["checks"]["api_never_blocked_on_a_lock"] is not api_blocked, (
        locks[0]
    )
    # its victims: the workflow task and the task's page update the row (a victim that waited less
    # than a flush interval may read 'unknown': its process had not yet published its owner)
    assert "'advance_workflow'" in locks[0] or "'POST /tasks/{task_id}/seen'" in locks[0], locks[0]
    # the capacity advice holds on this stack too: where it changed sizes (the seed: pgbouncer's 12
    # server connections split, MAX_DB_CONCURRENT from content-worker's share), its re-run had no
    # API pool timeouts and no queue at the pooler or for a server connection, at today's throughput
    advice = report["advice"]
    assert advice["seed"]["overrides"], advice["seed"]["text"]
    for name, entry in advice.items():
        if entry["overrides"]:
            assert entry["proof"]["held"], (name, entry["proof"])
    assert "the server limit binds" in "\n".join(advice["seed"]["text"])
    html = (tmp_path / "report.html").read_text()
    assert "pgbouncer clients waiting for a server connection" in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "panic"], "unknown scenario 'panic'"),
        (["--scenario", "row-lock"], "--scenario row-lock needs --stack real"),
        (["--stack", "cloud"], "invalid choice: 'cloud'"),
        (["--duration", "-3"], "expected a float > 0"),
        (
            ["--database-url", "postgresql+asyncpg://nobody@127.0.0.1:1/none"],
            "cannot reach the database at 127.0.0.1:1/none",
        ),
    ],
)
def test_bad_arguments(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "telemetry.tools.cli", "demo", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_demo_behind_a_pooler_that_renames_every_client_and_has_no_console(tmp_path):
    """``--pooler supavisor``: the same pgbouncer behind a proxy that renames every client, its
    console not read. The planted suspect (content transactions held across the LLM steps) is
    diagnosed as with the console: the shared limit, held by the content worker's task, and not
    the API's own pool."""
    # LLM steps of 0.2 s: the planted transactions keep the pooler full for the whole run (at 0.1 s
    # the API's wait was ~60% of its hold time, and a loaded machine's own overhead took it under half)
    out, report = _demo(tmp_path, "--stack", "real", "--pooler", "supavisor", "--scenario", "worker-transactions",
                        "--llm-seconds", "0.2")  # fmt: skip
    assert report["pooler"].startswith("supavisor") and "renames every client" in out.stdout
    tx = report["results"][0]
    assert tx["scenario"] == "worker-transactions"
    assert tx["diagnosis"].startswith("The shared limit was reached at the pooler or the server"), (
        tx["diagnosis"]
    )
    assert "content-worker 'generate_content'" in tx["diagnosis"], tx["diagnosis"]
    assert "API process's own pool" not in tx["diagnosis"]
    server = [f for f in tx["beyond_the_pools"] if f.startswith("Server connections: api's")]
    assert server and "not api's pool" in server[0], tx["beyond_the_pools"]
