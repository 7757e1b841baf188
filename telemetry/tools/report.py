"""The demo's incident report, computed only from the package's own ``/metrics``.

Quantiles are computed from histogram buckets the way Prometheus's ``histogram_quantile`` does
(linear interpolation inside the bucket), so the report and the dashboards agree.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .. import thresholds as T

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in samples if n == name and all(lb.get(k) == w for k, w in labels.items()))


def values(samples: Samples, name: str, key: str, **labels: str) -> set[str]:
    return {lb[key] for n, lb, _ in samples if n == name and key in lb and all(lb.get(k) == w for k, w in labels.items())}


def quantile(q: float, samples: Samples, name: str, **labels: Any) -> float | None:
    """``histogram_quantile(q, sum by (le) (name_bucket{labels}))``; None without data."""
    routes = labels.pop("route_in", None)
    buckets: dict[float, float] = {}
    for n, lb, v in samples:
        if n != f"{name}_bucket" or not all(lb.get(k) == w for k, w in labels.items()):
            continue
        if routes is not None and lb.get("route") not in routes:
            continue
        le = math.inf if lb["le"] == "+Inf" else float(lb["le"])
        buckets[le] = buckets.get(le, 0) + v
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return None
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        c = buckets[bound]
        if c >= rank:
            if math.isinf(bound):
                return prev_bound
            if c == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = bound, c
    return prev_bound


def usage_by_service(samples: Samples) -> dict[str, float]:
    """Busiest process's in_use / max, per service (the alert's view)."""
    in_use = {(lb["service"], lb["pool"], lb["pid"]): v for n, lb, v in samples if n == "db_pool_connections_in_use"}
    out: dict[str, float] = {}
    for n, lb, v in samples:
        if n == "db_pool_connections_max" and v > 0:
            key = (lb["service"], lb["pool"], lb["pid"])
            if key in in_use:
                out[lb["service"]] = max(out.get(lb["service"], 0.0), in_use[key] / v)
    return out


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


OTHER_ROUTES = ("/roadmaps", "/notes")


def summarize(scenario: str, samples: Samples, peaks: dict[str, float], concepts: int) -> dict[str, Any]:
    """One scenario's numbers, every one from the metrics."""
    other = {"route_in": OTHER_ROUTES}
    req_total = sum(v for n, lb, v in samples if n == "http_server_request_duration_seconds_count"
                    and lb.get("route") in OTHER_ROUTES)  # fmt: skip
    req_failed = sum(v for n, lb, v in samples if n == "http_server_request_duration_seconds_count"
                     and lb.get("route") in OTHER_ROUTES and lb.get("status", "").startswith("5"))  # fmt: skip
    latency_sum = sum(v for n, lb, v in samples if n == "http_server_request_duration_seconds_sum" and lb.get("route") in OTHER_ROUTES)
    wait_sum = sum(v for n, lb, v in samples if n == "http_server_pool_wait_seconds_sum" and lb.get("route") in OTHER_ROUTES)
    holds: dict[str, dict[str, float]] = {}
    for n, lb, v in samples:
        if n == "db_connection_hold_seconds_sum":
            holds.setdefault(lb["service"], {})
            holds[lb["service"]][lb["owner"]] = holds[lb["service"]].get(lb["owner"], 0) + v
    hold_p95 = {}
    for service in holds:
        for owner in holds[service]:
            hold_p95[f"{service}: {owner}"] = quantile(0.95, samples, "db_connection_hold_seconds", service=service, owner=owner)
    tasks = total(samples, "celery_tasks_total", outcome="succeeded")
    runtime_sum = total(samples, "celery_task_runtime_seconds_sum")
    runtime_count = total(samples, "celery_task_runtime_seconds_count")
    mean_runtime = runtime_sum / runtime_count if runtime_count else None
    sem_count = total(samples, "asyncio_semaphore_wait_seconds_count")
    sem_sum = total(samples, "asyncio_semaphore_wait_seconds_sum")
    api_timeouts = total(samples, "db_pool_timeouts_total", service="api")
    lag_p99 = {s: quantile(0.99, samples, "event_loop_lag_seconds", service=s) for s in values(samples, "event_loop_lag_seconds_count", "service")}
    result = {
        "scenario": scenario,
        "api": {
            "requests": req_total,
            "p50_seconds": quantile(0.50, samples, "http_server_request_duration_seconds", **dict(other)),
            "p95_seconds": quantile(0.95, samples, "http_server_request_duration_seconds", **dict(other)),
            "p99_seconds": quantile(0.99, samples, "http_server_request_duration_seconds", **dict(other)),
            "timeout_rate": (req_failed / req_total) if req_total else None,
            "pool_timeouts": api_timeouts,
            "share_waiting_for_pool": (wait_sum / latency_sum) if latency_sum else None,
        },
        "pool_usage_peak": peaks,
        "checkout_wait_p95_seconds": {s: quantile(0.95, samples, "db_pool_checkout_wait_seconds", service=s)
                                      for s in values(samples, "db_pool_checkout_wait_seconds_count", "service")},  # fmt: skip
        "hold_p95_seconds_by_owner": hold_p95,
        "hold_seconds_by_owner": holds,
        "event_loop_lag_p99_seconds": lag_p99,
        "event_loop_blocked": total(samples, "event_loop_blocked_total"),
        "semaphore": {"waits": sem_count, "mean_wait_seconds": (sem_sum / sem_count) if sem_count else None},
        "tasks_succeeded": tasks,
        "seconds_per_task": mean_runtime,
        "concepts_per_second": (concepts / mean_runtime) if mean_runtime else None,
        "seconds_for_30_concepts": (mean_runtime * 30 / concepts) if mean_runtime else None,
    }
    result["alerts"] = alert_conditions(result)
    result["diagnosis"] = diagnose(result)
    from .diagnose import beyond_the_pools

    result["beyond_the_pools"] = beyond_the_pools(samples)
    return result


def alert_conditions(r: dict[str, Any]) -> list[str]:
    """Which alert conditions held at their thresholds (ignoring the ``for:`` durations, which
    a demo of a minute cannot wait out)."""
    met = []
    for service, peak in sorted(r["pool_usage_peak"].items()):
        if peak > T.POOL_USAGE_CRITICAL:
            met.append(f"DbPoolUsageCritical ({service}: {peak * 100:.0f}% > {T.POOL_USAGE_CRITICAL * 100:.0f}%)")
        elif peak > T.POOL_USAGE_WARNING:
            met.append(f"DbPoolUsageWarning ({service}: {peak * 100:.0f}% > {T.POOL_USAGE_WARNING * 100:.0f}%)")
    for key, p95 in sorted(r["hold_p95_seconds_by_owner"].items()):
        if p95 is not None and p95 > T.HOLD_SECONDS_WARNING:
            met.append(f"DbConnectionHoldTooLong ({key}: p95 {p95:.1f}s > {T.HOLD_SECONDS_WARNING:g}s)")
    for service, p95 in sorted(r["checkout_wait_p95_seconds"].items()):
        if p95 is not None and p95 > T.WAIT_P95_SECONDS_WARNING:
            met.append(f"DbPoolCheckoutWaitHigh ({service}: p95 {p95:.1f}s > {T.WAIT_P95_SECONDS_WARNING:g}s)")
    if r["api"]["pool_timeouts"]:
        met.append(f"DbPoolCheckoutTimeouts (api: {r['api']['pool_timeouts']:.0f} timeouts)")
    return met


def diagnose(r: dict[str, Any]) -> str:
    """The dominant cause of API latency, and who held the connections."""
    api = r["api"]
    share = api["share_waiting_for_pool"]
    api_holds = r["hold_seconds_by_owner"].get("api", {})
    p95 = r["hold_p95_seconds_by_owner"]
    parts = []
    if share is not None and share >= 0.5:
        parts.append(f"API latency is dominated by waiting for the API process's own pool "
                     f"({share * 100:.0f}% of the time of ordinary pages).")  # fmt: skip
        held_total = sum(api_holds.values())
        if held_total:
            top = max(api_holds, key=lambda k: api_holds[k])
            top_p95 = p95.get(f"api: {top}") or 0.0
            parts.append(f"The connections were held by {top!r}: {api_holds[top] / held_total * 100:.0f}% of "
                         f"all API hold time, p95 hold {top_p95:.1f} s.")  # fmt: skip
            if top_p95 > T.HOLD_SECONDS_WARNING:
                parts.append("That handler keeps its session for the life of a long-lived response "
                             "(a stream): release it between polls.")  # fmt: skip
            slow_others = [k for k in api_holds if k != top and (p95.get(f"api: {k}") or 0) > 1.0]
            if slow_others:
                parts.append(f"Short requests also held connections for seconds ({', '.join(sorted(slow_others))}): "
                             "they wait on database locks, a server-side cause.")  # fmt: skip
    elif r["event_loop_blocked"]:
        parts.append("API latency comes from a blocked event loop (sync work inside async def), not the pool.")
    elif share is not None:
        parts.append(f"The API pool is not the bottleneck: {share * 100:.0f}% of page time waits for it.")
    worker_peak = r["pool_usage_peak"].get("worker")
    if worker_peak is not None:
        parts.append(f"Celery workers peaked at {worker_peak * 100:.0f}% of their own pools; each process has "
                     "its own pool, so the content tasks cannot drain the API's.")  # fmt: skip
    return " ".join(parts) or "No saturation observed."


SEED_TABLE = {  # the report's "expected benefit" table
    "timeout_rate": {"seed": 0.80, "fixed": 0.05, "batched": 0.0},
    "pool_usage_peak": {"seed": 0.95, "fixed": 0.60, "batched": 0.40},
    "concepts_per_second": {"seed": 1.5, "fixed": 4.0, "batched": 5.0},
    "seconds_for_30_concepts": {"seed": 60.0, "fixed": 30.0, "batched": 20.0},
}


def comparison(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        s = r["scenario"]
        measured = {
            "timeout_rate": r["api"]["timeout_rate"],
            "pool_usage_peak": max(r["pool_usage_peak"].values()) if r["pool_usage_peak"] else None,
            "concepts_per_second": r["concepts_per_second"],
            "seconds_for_30_concepts": r["seconds_for_30_concepts"],
        }
        for metric, expected in SEED_TABLE.items():
            rows.append({"scenario": s, "metric": metric, "report_expected": expected.get(s), "measured": measured[metric]})
    return rows


def disagreements(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for row in rows:
        exp, got = row["report_expected"], row["measured"]
        if exp is None or got is None:
            continue
        if row["metric"] in ("timeout_rate", "pool_usage_peak"):
            off = abs(got - exp) > 0.15
        else:
            off = not (exp / 2 <= got <= exp * 2)
        if off:
            notes.append(f"{row['scenario']}: {row['metric']} measured {got:.2f}, the report expected {exp:.2f}")
    return notes


def render_text(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    out = []
    for r in results:
        a = r["api"]
        out.append(f"== scenario {r['scenario']} ==")
        out.append(f"API (ordinary pages): {a['requests']:.0f} requests, p50 {_fmt_s(a['p50_seconds'])}, "
                   f"p95 {_fmt_s(a['p95_seconds'])}, p99 {_fmt_s(a['p99_seconds'])}, "
                   f"failed (pool timeout) {_pct(a['timeout_rate'])}, waiting for the pool {_pct(a['share_waiting_for_pool'])}")  # fmt: skip
        out.append("pool usage peak (busiest process): " + ", ".join(f"{s} {_pct(v)}" for s, v in sorted(r["pool_usage_peak"].items())))
        out.append("checkout wait p95: " + ", ".join(f"{s} {_fmt_s(v)}" for s, v in sorted(r["checkout_wait_p95_seconds"].items())))
        top = sorted(((v or 0, k) for k, v in r["hold_p95_seconds_by_owner"].items()), reverse=True)[:5]
        out.append("hold p95 by owner: " + ", ".join(f"{k} {_fmt_s(v)}" for v, k in top))
        out.append("event loop lag p99: " + ", ".join(f"{s} {_fmt_s(v)}" for s, v in sorted(r["event_loop_lag_p99_seconds"].items()))
                   + f"; blocked episodes {r['event_loop_blocked']:.0f}")  # fmt: skip
        sem = r["semaphore"]
        out.append(f"semaphore MAX_DB_CONCURRENT: {sem['waits']:.0f} acquisitions, mean wait {_fmt_s(sem['mean_wait_seconds'])}")
        cps = r["concepts_per_second"]
        out.append(f"content: {r['tasks_succeeded']:.0f} tasks, {cps:.1f} concepts/s per task, "
                   f"{_fmt_s(r['seconds_for_30_concepts'])} for 30 concepts" if cps else "content: no task finished")  # fmt: skip
        out.append("alert conditions met: " + ("; ".join(r["alerts"]) or "none"))
        out.append("diagnosis: " + r["diagnosis"])
        for finding in r.get("beyond_the_pools") or []:
            out.append("  also: " + finding)
        out.append("")
    out.append("The incident report's expected benefit beside what was measured:")
    out.append(f"{'scenario':<10}{'metric':<26}{'report':>10}{'measured':>12}")
    for row in rows:
        exp, got = row["report_expected"], row["measured"]
        fmt = _pct if row["metric"] in ("timeout_rate", "pool_usage_peak") else (lambda x: "-" if x is None else f"{x:.1f}")
        out.append(f"{row['scenario']:<10}{row['metric']:<26}{fmt(exp):>10}{fmt(got):>12}")
    notes = disagreements(rows)
    out.append("(The demo scales time: LLM steps, saves and pool_timeout are shortened, so compare "
               "scenarios with each other; absolute throughput is not the report's.)")
    out.append("")
    out.append("Where the measurement disagrees with the report:" if notes else "The measurement agrees with the report's table.")
    out.extend(f"- {n}" for n in notes)
    return "\n".join(out)


def _svg(series: dict[str, list[tuple[float, float]]], title: str, unit: str, threshold: float | None = None) -> str:
    w, h, pad = 640, 220, 40
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    tmax = max(t for t, _ in points) or 1
    vmax = max([v for _, v in points] + [threshold or 0]) or 1
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
             f'<text x="{pad}" y="16" font-size="13">{html.escape(title)} ({html.escape(unit)}, max {vmax:.2f})</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#999"/>']  # fmt: skip

    def xy(t: float, v: float) -> tuple[float, float]:
        return pad + (w - pad - 10) * t / tmax, (h - pad) - (h - pad - 24) * v / vmax

    if threshold is not None:
        _, y = xy(0, threshold)
        parts.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{w - 10}" y2="{y:.1f}" stroke="#aaa" stroke-dasharray="4"/>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in pts))
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts.append(f'<text x="{w - 150}" y="{30 + 14 * i}" font-size="11" fill="{color}">{html.escape(name)}</text>')
    parts.append(f'<text x="{pad}" y="{h - 10}" font-size="11">seconds since start (0 to {tmax:.0f})</text></svg>')
    return "".join(parts)


def render_html(results: list[dict[str, Any]], timelines: dict[str, dict[str, Any]], text: str) -> str:
    body = ["<html><head><meta charset='utf-8'><title>telemetry demo: incident report</title></head>",
            "<body style='font-family: sans-serif'><h1>Incident report</h1>"]  # fmt: skip
    for r in results:
        tl = timelines.get(r["scenario"], {})
        body.append(f"<h2>scenario {html.escape(r['scenario'])}</h2>")
        body.append(_svg(tl.get("usage", {}), "pool usage, busiest process", "ratio", T.POOL_USAGE_WARNING))
        body.append(_svg(tl.get("latency", {}), "API p95 latency of ordinary pages", "seconds"))
        body.append(f"<p>{html.escape(r['diagnosis'])}</p>")
    body.append(f"<pre>{html.escape(text)}</pre></body></html>")
    return "\n".join(body)


def interval_p95(prev: Samples, cur: Samples, routes: tuple[str, ...] = OTHER_ROUTES) -> float | None:
    """p95 of the requests finished between two scrapes (bucket deltas)."""
    def buckets(samples: Samples) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, lb, v in samples:
            if n == "http_server_request_duration_seconds_bucket" and lb.get("route") in routes:
                out[lb["le"]] = out.get(lb["le"], 0) + v
        return out

    before, after = buckets(prev), buckets(cur)
    delta: Samples = [("x_bucket", {"le": le}, after[le] - before.get(le, 0)) for le in after]
    return quantile(0.95, delta, "x")
