"""The demo's alert chain (``telemetry.tools.demo.alerting``): the shipped rules and routes on the
demo's clock, from the same thresholds, valid for the real promtool and amtool; the clock's
arithmetic; the capture server reading payloads as PagerDuty and Slack would."""

from __future__ import annotations

import subprocess

import httpx
import pytest
import yaml

from telemetry import thresholds as T
from telemetry.tools.demo import alerting
from telemetry.tools.deploy import rules

from ... import services


def test_windows_and_thresholds_follow_the_demo_clock():
    assert rules.windows("rate(x[5m]) / rate(y[10m])", 1 / 60) == "rate(x[5s]) / rate(y[10s])"
    assert (
        rules.windows("rate(x[5m])", 1 / 600) == f"rate(x[{rules.MIN_WINDOW_SECONDS}s])"
    )  # two scrapes at least
    assert rules.windows("rate(x[5m])", 1) == "rate(x[5m])"
    cfg = alerting.rules_config(3.0)  # the demo's default --pool-timeout: 20 times faster work
    assert cfg.seconds_scale == pytest.approx(0.05) and cfg.for_scale == alerting.FOR_SCALE
    groups = rules.rule_groups(cfg)["groups"][0]["rules"]
    by = {r.get("alert") or r["record"]: r for r in groups}
    assert by["DbPoolUsageWarning"]["for"] == "5s" and by["DbPoolUsageCritical"]["for"] == "2s"
    assert f"> {T.HOLD_SECONDS_WARNING * 0.05:g} or" in by["DbConnectionHoldTooLong"]["expr"]
    assert f"> {T.LOCK_WAIT_SECONDS_WARNING * 0.05:g}" in by["DbLockWaitLong"]["expr"]
    assert "[5s]" in by["service_pool:db_connection_hold_seconds:p95_5m"]["expr"]
    assert by["DbPoolUsageWarning"]["expr"].endswith(
        f"> {T.POOL_USAGE_WARNING}"
    )  # ratios are not durations
    assert alerting.hold_threshold_seconds(3.0) == pytest.approx(T.HOLD_SECONDS_WARNING * 0.05)
    with pytest.raises(ValueError, match="seconds_scale=2: expected a factor in"):
        rules.RulesConfig(seconds_scale=2)


@pytest.mark.integration
def test_the_demo_files_pass_promtool_and_amtool(tmp_path):
    chain = alerting.Chain(str(tmp_path), metrics_port=9, pool_timeout=2.0)
    prom = chain.prometheus_config()
    with open(prom) as fh:
        rule_file = yaml.safe_load(fh)["rule_files"][0]
    out = subprocess.run(
        [services.binary("promtool", "prometheus"), "check", "rules", rule_file],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    am = chain.alertmanager_config(capture_port=9)
    out = subprocess.run(
        [services.binary("amtool", "prometheus-alertmanager"), "check-config", am],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    with open(am) as fh:
        text = fh.read()
    cfg = yaml.safe_load(text)
    assert (
        cfg["route"]["group_wait"] == "1s" and cfg["route"]["routes"][0]["repeat_interval"] == "60s"
    )
    assert "demo-routing-key" not in text  # the key stays in its file


def test_capture_server_reads_payloads_as_the_services_show_them():
    capture = alerting.Capture()
    try:
        base = f"http://127.0.0.1:{capture.port}"
        pd = httpx.post(f"{base}/pagerduty", json={"event_action": "trigger", "payload": {"summary": "[FIRING:1] X", "severity": "critical"},
                                                    "links": [{"href": "https://r/X.md", "text": "runbook"}]})  # fmt: skip
        assert pd.status_code == 202
        httpx.post(f"{base}/slack", json={"channel": "#db-alerts", "attachments": [{
            "title": "[RESOLVED] Y api", "title_link": "http://g/d", "text": "t",
            "actions": [{"type": "button", "text": "Runbook", "url": "https://r/Y.md"}]}]})  # fmt: skip
        got = capture.notifications(0.0)
    finally:
        capture.close()
    assert [(n["receiver"], n["status"], n["runbook"]) for n in got] == [
        ("pagerduty", "trigger", "https://r/X.md"),
        ("slack", "resolved", "https://r/Y.md"),
    ]
    assert got[1]["dashboard"] == "http://g/d" and got[1]["channel"] == "#db-alerts"
