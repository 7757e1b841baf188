"""Dashboards: Grafana JSON model checks (no Grafana runs here), metric names only from the
catalogue, thresholds from the same constants as the rules, and every panel's expression run by a
real Prometheus 2.42 scraping a process instrumented by the package under load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from telemetry import thresholds as T
from telemetry._core.catalogue import CATALOGUE
from telemetry.tools.deploy import dashboards as _dashboards
from telemetry.tools.deploy import rules as _rules
from tests import ROOT

from ... import services

FILES = _dashboards.dashboard_files(ROOT)
PANEL_TYPES = {"timeseries", "stat", "heatmap", "text"}
BUILTINS = {"ALERTS", "up"}


def _load(path: str) -> dict:
    with open(_dashboards.json_path(path, ROOT)) as fh:
        return json.load(fh)


DASHBOARDS = {os.path.basename(p): _load(p) for p in FILES}


def _exprs(d: dict) -> list[str]:
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_five_dashboards_with_the_uids_alerts_link_to():
    uids = {d["uid"] for d in DASHBOARDS.values()}
    assert uids == {T.DASHBOARD_UID_POOLS, T.DASHBOARD_UID_API, T.DASHBOARD_UID_CELERY, T.DASHBOARD_UID_OVERVIEW,
                    T.DASHBOARD_UID_SERVER}
    for alert in _rules.ALERTS:
        assert alert.dashboard_uid in uids


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_grafana_model(name):
    d = DASHBOARDS[name]
    assert d["schemaVersion"] >= 36 and d["title"] and d["uid"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names[:3] == ["datasource", "service", "instance"]
    assert d["templating"]["list"][0]["type"] == "datasource"
    boxes = []
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], panel["title"]))
        if panel["type"] == "text":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], f"no unit on {panel['title']}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{a[4]!r} overlaps {b[4]!r}"


def test_thresholds_come_from_the_rule_constants():
    pools = DASHBOARDS["pools.dashboard.py"]
    by_title = {p["title"]: p for p in pools["panels"]}

    def steps(title: str) -> list[float]:
        return [s["value"] for s in by_title[title]["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]

    assert steps("Usage of the busiest process, by service")[-2:] == [T.POOL_USAGE_WARNING, T.POOL_USAGE_CRITICAL]
    assert steps("Hold time p95 by owner")[-1] == T.HOLD_SECONDS_WARNING
    assert by_title["Hold time p95 by owner"]["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"


def test_expressions_name_only_exported_metrics():
    for name, d in DASHBOARDS.items():
        for expr in _exprs(d):
            for metric in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert metric in CATALOGUE or base in CATALOGUE or metric in BUILTINS, f"{name}: {metric}"


def _substitute(expr: str) -> str:
    for var in ("service", "instance", "pool"):
        expr = expr.replace(f'"${var}"', '".*"')
    return expr.replace("$__rate_interval", "10s")


@pytest.mark.integration
def test_every_panel_returns_data_from_a_real_prometheus(tmp_path, redis_server, pg):
    with services.start_pgbouncer(pg, pool_size=2) as bouncer:
        _every_panel_returns_data(tmp_path, redis_server, pg, bouncer)


def _every_panel_returns_data(tmp_path, redis_server, pg, bouncer):
    binary = services.binary("prometheus", "prometheus")
    target, prom = services.free_port(), services.free_port()
    shared = {"WORKLOAD_PG_URL": pg.url(), "WORKLOAD_PGBOUNCER_URL": bouncer.url(),
              "WORKLOAD_SERVER_VIEW_URL": pg.url(), "WORKLOAD_PGBOUNCER_ADMIN_URL": bouncer.admin_url}
    workload = subprocess.Popen([sys.executable, "-m", "tests.apps.workload", str(target), "40"], cwd=ROOT,
                                env=dict(os.environ, WORKLOAD_REDIS_URL=redis_server.url, TELEMETRY_CELERY_BACKLOG_INTERVAL_SECONDS="1", **shared),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{os.path.join(ROOT, 'alerts', 'telemetry.rules.yml')}]\n"
        f"scrape_configs:\n  - job_name: workload\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/data",
                               f"--web.listen-address=127.0.0.1:{prom}", "--log.level=warn"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    api = f"http://127.0.0.1:{prom}/api/v1"
    try:
        services.wait_ready(prom, 60)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            r = httpx.get(f"{api}/query", params={"query": "up"}).json()
            if r["data"]["result"] and r["data"]["result"][0]["value"][1] == "1":
                break
            time.sleep(0.5)
        time.sleep(15)  # enough samples for 10s rate windows and increases
        empty, bad = [], []
        for name, d in DASHBOARDS.items():
            for panel in d["panels"]:
                for t in panel.get("targets", []):
                    expr = _substitute(t["expr"])
                    r = httpx.get(f"{api}/query", params={"query": expr}, timeout=10)
                    if r.status_code != 200 or r.json()["status"] != "success":
                        bad.append((name, panel["title"], expr, r.text[:200]))
                    elif not r.json()["data"]["result"]:
                        empty.append((name, panel["title"], expr))
            for var in d["templating"]["list"][1:]:
                metric = re.search(r"label_values\((\w+)", var["query"]).group(1)  # type: ignore[union-attr]
                r = httpx.get(f"{api}/label/{var['name'] if var['name'] != 'instance' else 'instance'}/values",
                              params={"match[]": metric}).json()  # fmt: skip
                assert r["data"], (name, var["name"])
        assert not bad, bad
        assert not empty, empty
        # the shipped rules loaded in the real Prometheus too, and the recording rules produce data
        rules = httpx.get(f"{api}/rules").json()["data"]["groups"]
        assert {g["name"] for g in rules} == {"telemetry-db-pool"}
        assert httpx.get(f"{api}/query", params={"query": "service_pool:db_pool_usage:max"}).json()["data"]["result"]
        # telemetry diagnose over that Prometheus (last minute) names the resources and holders
        from telemetry.tools.live import diagnose

        found = diagnose.findings(diagnose.from_prometheus(f"http://127.0.0.1:{prom}", "1m"))
        pooler = [f for f in found if f.startswith("pgbouncer:")]
        assert len(pooler) == 1 and "held by api (2)" in pooler[0] and "api 'content_task'" in pooler[0], found
        locks = [f for f in found if f.startswith("Locks:")]
        assert len(locks) == 1 and locks[0].startswith("Locks: api 'content_task' holds a lock that blocks"), found
        assert "api 'PUT /items/{item_id}' (1)" in locks[0], found
        assert any(f.startswith("Idle in transaction: a backend of api") for f in found), found
        assert any(f.startswith("Semaphore: ") and "MAX_DB_CONCURRENT" in f for f in found), found
        assert any(f.startswith("Redis: pool ") for f in found), found
        # streams that keep their sessions are named from what is held now: none of their holds ended
        pool = [f for f in found if f.startswith("Pool: the busiest api process")]
        assert pool and "'GET /items/{item_id}/stream' (3)" in pool[0].split("Held now by")[1], found
        with pytest.raises(ValueError, match="--window"):
            diagnose.from_prometheus(f"http://127.0.0.1:{prom}", "15 minutes")
    finally:
        for proc in (server, workload):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def test_provisioning_links_logs_to_traces_and_loads_the_json():
    """The Loki derived field's regex finds the trace id in a real log line the package emits."""
    import io
    import logging

    import structlog
    import yaml
    from opentelemetry.sdk.trace import TracerProvider

    import telemetry

    with open(os.path.join(ROOT, "dashboards", "provisioning", "datasources.yml")) as fh:
        sources = {d["uid"]: d for d in yaml.safe_load(fh)["datasources"]}
    assert set(sources) == {"prometheus", "loki", "tempo"}
    assert sources["loki"]["uid"] == T.LOKI_DATASOURCE_UID
    field = sources["loki"]["jsonData"]["derivedFields"][0]
    assert field["datasourceUid"] == "tempo"
    buf = io.StringIO()
    telemetry.configure_logging("api", stream=buf)
    try:
        with TracerProvider().get_tracer("t").start_as_current_span("s") as span:
            structlog.get_logger().error("db_pool_critical_usage", checked_out=4)
        trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for h in [h for h in root.handlers if h.get_name() == "telemetry-json"]:
            root.removeHandler(h)
    match = re.search(field["matcherRegex"], buf.getvalue())
    assert match and match.group(1) == trace_id
    tempo = sources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert tempo["datasourceUid"] == "loki" and "trace_id=" in tempo["query"]
    with open(os.path.join(ROOT, "dashboards", "provisioning", "dashboards.yml")) as fh:
        provider = yaml.safe_load(fh)["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].endswith("/telemetry")
