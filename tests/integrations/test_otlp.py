"""OpenTelemetry's names over OTLP (``OTEL_METRICS_EXPORTER=otlp``): a FastAPI app under uvicorn
with 2 workers exports to a real OTLP/HTTP receiver; per process, the values equal what the
host's Prometheus ``/metrics`` says for the same work (nothing double-counted), with the semantic
conventions' names, units and attributes. Bad settings fail at start-up, naming the variable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry._core.settings import ConfigError, Settings
from telemetry.integrations import otlp as _otlp
from tests import ROOT

from .. import services
from ..otlp import OtlpReceiver

pytestmark = pytest.mark.matrix("otlp_metrics")

ROUTE = "/work/{n}"


def _prom(port: int) -> list:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics/", timeout=10).text  # the mounted sub-app
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _points(latest: dict, name: str, **attrs) -> list:  # type: ignore[no-untyped-def]
    """Every data point of ``name`` across the processes' last exports, filtered by attributes."""
    out = []
    for metrics in latest.values():
        metric = metrics.get(name)
        if metric is None:
            continue
        data = metric.histogram if metric.HasField("histogram") else metric.sum
        for dp in data.data_points:
            got = {a.key: (a.value.int_value if a.value.HasField("int_value") else a.value.string_value) for a in dp.attributes}
            if all(got.get(k) == v for k, v in attrs.items()):
                out.append(dp)
    return out


@pytest.mark.integration
def test_otlp_values_equal_prometheus_under_uvicorn_workers(pg, tmp_path):
    receiver = OtlpReceiver()
    port = services.free_port()
    env = dict(os.environ, APP_DATABASE_URL=pg.url("asyncpg"), TELEMETRY_MULTIPROC_DIR=str(tmp_path),
               TELEMETRY_FLUSH_INTERVAL_SECONDS="0.1", TELEMETRY_TRACING="false", OTEL_METRICS_EXPORTER="otlp",
               OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_METRIC_EXPORT_INTERVAL="200")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.apps.otlp_app:app", "--workers", "2", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, start_new_session=True)  # fmt: skip
    try:
        services.wait_port(port, 30)
        n = 30
        for i in range(n):
            with httpx.Client(timeout=10) as client:  # a new connection each time: both workers serve
                assert client.get(f"http://127.0.0.1:{port}/work/{i}").status_code == 200
        deadline = time.monotonic() + 30
        while True:  # until both views carry every request (the exports run every 200 ms)
            latest = receiver.latest_per_instance()
            otlp_count = sum(dp.count for dp in _points(latest, "http.server.request.duration", **{"http.route": ROUTE}))
            prom = _prom(port)
            prom_count = sum(s.value for s in prom if s.name == "http_server_request_duration_seconds_count" and s.labels["route"] == ROUTE)
            if (otlp_count == n and prom_count == n) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert otlp_count == n and prom_count == n, (otlp_count, prom_count)  # each request once in each view
        assert len(latest) == 2  # one resource per worker process

        def prom_sum(name: str, **labels: str) -> float:
            return sum(s.value for s in prom if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

        # requests: name, unit, attributes, and the same count, sum and buckets
        http = _points(latest, "http.server.request.duration", **{"http.route": ROUTE, "http.request.method": "GET",
                                                                   "http.response.status_code": 200})  # fmt: skip
        assert sum(dp.count for dp in http) == n
        assert sum(dp.sum for dp in http) == pytest.approx(prom_sum("http_server_request_duration_seconds_sum", route=ROUTE))
        bounds = list(http[0].explicit_bounds)
        cumulative = [sum(sum(dp.bucket_counts[: i + 1]) for dp in http) for i in range(len(bounds))]
        assert cumulative == [prom_sum("http_server_request_duration_seconds_bucket", route=ROUTE, le=str(b)) for b in bounds]
        metric = next(iter(latest.values()))
        assert metric["http.server.request.duration"].unit == "s"
        # the pool: use_time (hold), wait_time (checkout wait), max, count by state, timeouts
        pool = {"db.client.connection.pool.name": "main-db"}
        use = _points(latest, "db.client.connection.use_time", **pool)
        assert sum(dp.count for dp in use) == prom_sum("db_connection_hold_seconds_count", pool="main-db") == n
        assert sum(dp.sum for dp in use) == pytest.approx(prom_sum("db_connection_hold_seconds_sum", pool="main-db"))
        wait = _points(latest, "db.client.connection.wait_time", **pool)
        assert sum(dp.count for dp in wait) == prom_sum("db_pool_checkout_wait_seconds_count", pool="main-db") == n
        assert sum(dp.as_double or dp.as_int for dp in _points(latest, "db.client.connection.max", **pool)) == prom_sum(
            "db_pool_connections_max", pool="main-db") == 8  # fmt: skip
        for state, ours in (("used", "db_pool_connections_in_use"), ("idle", "db_pool_connections_idle")):
            got = sum(dp.as_double or dp.as_int for dp in _points(latest, "db.client.connection.count", **pool,
                                                                  **{"db.client.connection.state": state}))  # fmt: skip
            assert got == prom_sum(ours, pool="main-db"), state
        assert metric["db.client.connection.count"].unit == "{connection}"
        assert not metric["db.client.connection.count"].sum.is_monotonic
        assert sum(dp.as_double or dp.as_int for dp in _points(latest, "db.client.connection.timeouts", **pool)) == 0
        assert prom_sum("telemetry_otlp_metric_exports_total", result="ok") > 0
        assert prom_sum("telemetry_otlp_metric_exports_total", result="failed") == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        receiver.close()


def test_bad_otlp_settings_fail_at_start_up(monkeypatch):
    with pytest.raises(ConfigError, match="OTEL_METRICS_EXPORTER='zipkin': expected otlp, prometheus, console"):
        Settings.load({"OTEL_METRICS_EXPORTER": "zipkin"})
    assert not Settings.load({"OTEL_METRICS_EXPORTER": "console"}).otlp_metrics  # the app's own SDK's choice
    assert Settings.load({"OTEL_METRICS_EXPORTER": "prometheus,otlp"}).otlp_metrics
    assert not Settings.load({"OTEL_METRICS_EXPORTER": "none"}).otlp_metrics
    assert not Settings.load({}).otlp_metrics  # off by default
    with pytest.raises(ConfigError, match="OTEL_METRIC_EXPORT_INTERVAL='soon': expected milliseconds"):
        _otlp.interval_seconds({"OTEL_METRIC_EXPORT_INTERVAL": "soon"})
    assert _otlp.interval_seconds({"OTEL_METRIC_EXPORT_INTERVAL": "500"}) == 0.5


def test_the_mapping_follows_the_catalogue():
    """Every catalogue entry with an OpenTelemetry name is exported under it, with its unit."""
    from telemetry._core.catalogue import CATALOGUE

    for name, spec in CATALOGUE.items():
        if spec.otel:
            otel, _fixed = _otlp.MAPPING[name]
            assert spec.otel.startswith(otel) and otel in _otlp.UNITS, name


def test_the_docs_table_lists_every_mapping():
    with open(os.path.join(ROOT, "docs", "otlp.md")) as fh:
        doc = fh.read()
    for name, (otel, _fixed) in _otlp.MAPPING.items():
        assert f"| `{name}` | `{otel}` |" in doc, name
