"""Overview / incident: why is the front end stalling right now?"""

import json
import urllib.parse

from telemetry import thresholds as T
from telemetry.tools.deploy.dashboards import (
    PERCENT,
    RATE,
    SECONDS,
    SHORT,
    dashboard,
    series,
    stat,
    text,
)
from telemetry.tools.deploy.rules import LOG_QUERIES

API = 'service=~"$service", instance=~"$instance"'


def _explore(event: str) -> str:
    expr = LOG_QUERIES[event].replace('"$service"', '~"$service"').replace('"$pool"', '~".*"')
    left = {"datasource": T.LOKI_DATASOURCE_UID, "queries": [{"refId": "A", "expr": expr}], "range": {"from": "now-1h", "to": "now"}}
    return "/explore?orgId=1&left=" + urllib.parse.quote(json.dumps(left, separators=(",", ":")), safe="")


GUIDE = f"""
**Why is the front end stalling?** Read the row above left to right.

| if | then |
|---|---|
| *waiting for the pool* is high and one owner dominates *top holders* | own-pool hog (a stream or slow handler holding its session): [Database pools](/d/{T.DASHBOARD_UID_POOLS}) |
| pool usage low, checkout wait or connect errors high | server side: pooler / max_connections full |
| pool wait low, *blocked loop* > 0 | sync work inside `async def`: see `event_loop_blocked` (names the line) |
| hold p95 high for a task | long transactions in workers: [Celery](/d/{T.DASHBOARD_UID_CELERY}) |

Logs (each line links to its trace through `trace_id`):
[db_pool_critical_usage]({_explore("db_pool_critical_usage")}) ·
[db_connection_held_too_long]({_explore("db_connection_held_too_long")}) ·
[db_pool_timeout]({_explore("db_pool_timeout")}) ·
[API dashboard](/d/{T.DASHBOARD_UID_API})
"""

dashboard = dashboard(
    "Overview: why is the front end stalling", T.DASHBOARD_UID_OVERVIEW,
    "The seed's question on one screen, with links to the detail dashboards, logs and traces.",
    pool=False,
    panels=[
        stat("API p95 latency", f"histogram_quantile(0.95, sum by (le) (rate(http_server_request_duration_seconds_bucket{{{API}}}[{RATE}])))",
             SECONDS, (0, 0, 5, 5), lines=(1.0,)),
        stat("Share waiting for the pool", f"sum(rate(http_server_pool_wait_seconds_sum{{{API}}}[{RATE}])) / sum(rate(http_server_request_duration_seconds_sum{{{API}}}[{RATE}]))",
             PERCENT, (5, 0, 5, 5), lines=(0.5,)),
        stat("Busiest pool (any service)", f"max(db_pool_connections_in_use{{{API}}} / db_pool_connections_max{{{API}}})",
             PERCENT, (10, 0, 5, 5), lines=(T.POOL_USAGE_WARNING, T.POOL_USAGE_CRITICAL)),
        stat("Checkout timeouts (5m)", f"sum(increase(db_pool_timeouts_total{{{API}}}[5m]))", SHORT, (15, 0, 3, 5), lines=(1.0,)),
        stat("Connect errors (5m)", f"sum(increase(db_pool_connect_errors_total{{{API}}}[5m]))", SHORT, (18, 0, 3, 5), lines=(1.0,)),
        stat("Blocked loop (15m)", f"sum(increase(event_loop_blocked_total{{{API}}}[15m]))", SHORT, (21, 0, 3, 5), lines=(1.0,)),
        series("API time per request: waiting for the pool vs the rest", [
            (f"sum(rate(http_server_pool_wait_seconds_sum{{{API}}}[{RATE}])) / sum(rate(http_server_request_duration_seconds_count{{{API}}}[{RATE}]))", "waiting for the pool"),
            (f"(sum(rate(http_server_request_duration_seconds_sum{{{API}}}[{RATE}])) - sum(rate(http_server_pool_wait_seconds_sum{{{API}}}[{RATE}]))) / "
             f"sum(rate(http_server_request_duration_seconds_count{{{API}}}[{RATE}]))", "everything else"),
        ], SECONDS, (0, 5, 12, 9), stack=True),
        series("Who holds the connections (average connections held, by owner)", [
            (f"topk(8, sum by (service, owner) (rate(db_connection_hold_seconds_sum{{{API}}}[{RATE}])))", "{{service}} {{owner}}")],
               SHORT, (12, 5, 12, 9)),
        series("Pool usage, busiest process per service", [
            (f"max by (service, pool) (db_pool_connections_in_use{{{API}}} / db_pool_connections_max{{{API}}})", "{{service}} {{pool}}")],
               PERCENT, (0, 14, 12, 8), lines=(T.POOL_USAGE_WARNING, T.POOL_USAGE_CRITICAL)),
        text("What to look at", GUIDE, (12, 14, 12, 8)),
    ],
)  # fmt: skip
