"""API: request rate, latency by route, the share spent waiting for the pool, loop lag."""

from telemetry import thresholds as T
from telemetry.tools.deploy.dashboards import (
    OPS,
    PERCENT,
    RATE,
    SECONDS,
    SHORT,
    SVC,
    dashboard,
    series,
)

REQ = f"http_server_request_duration_seconds{{{SVC}}}"

dashboard = dashboard(
    "API", T.DASHBOARD_UID_API, "Requests by route template: latency, pool wait share, in flight, loop lag.",
    pool=False,
    panels=[
        series("Request rate by route", [(f"sum by (method, route) (rate(http_server_request_duration_seconds_count{{{SVC}}}[{RATE}]))",
                                          "{{method}} {{route}}")], OPS, (0, 0, 12, 8)),
        series("Latency p95 by route", [(f"histogram_quantile(0.95, sum by (le, method, route) (rate(http_server_request_duration_seconds_bucket{{{SVC}}}[{RATE}])))",
                                         "{{method}} {{route}}")], SECONDS, (12, 0, 12, 8)),
        series("Latency p50 / p95 / p99, all routes", [
            (f"histogram_quantile({q}, sum by (le) (rate(http_server_request_duration_seconds_bucket{{{SVC}}}[{RATE}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)], SECONDS, (0, 8, 12, 8)),
        series("Share of latency spent waiting for the pool, by route", [
            (f"sum by (route) (rate(http_server_pool_wait_seconds_sum{{{SVC}}}[{RATE}])) / "
             f"sum by (route) (rate(http_server_request_duration_seconds_sum{{{SVC}}}[{RATE}]))", "{{route}}")],
               PERCENT, (12, 8, 12, 8), "1.0: the request did nothing but wait for a connection."),
        series("In flight (open streams included)", [(f"sum by (method, route) (http_server_requests_in_flight{{{SVC}}})", "{{method}} {{route}}")],
               SHORT, (0, 16, 12, 8)),
        series("Errors (5xx) by route", [(f'sum by (route, status) (rate(http_server_request_duration_seconds_count{{{SVC}, status=~"5.."}}[{RATE}]))',
                                          "{{route}} {{status}}")], OPS, (12, 16, 12, 8)),
        series("Event-loop lag p99 and blocked episodes", [
            (f"histogram_quantile(0.99, sum by (le, service, instance) (rate(event_loop_lag_seconds_bucket{{{SVC}}}[{RATE}])))", "lag p99 {{service}} {{instance}}"),
            (f"sum by (service) (increase(event_loop_blocked_total{{{SVC}}}[{RATE}]))", "blocked {{service}}"),
        ], SECONDS, (0, 24, 24, 8), lines=(T.LOOP_BLOCKED_SECONDS,)),
    ],
)  # fmt: skip
_ = REQ
