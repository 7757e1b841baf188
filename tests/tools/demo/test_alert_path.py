"""The alert path for real, with the shipped rule file and routing tree: a real Prometheus scrapes
a real instrumented process whose PostgreSQL pool is driven into saturation; a real Alertmanager
delivers to local stand-ins for Slack and PagerDuty. The warning arrives in Slack's payload shape,
the critical in PagerDuty's, the warning is inhibited while the critical fires, and both resolve
when the pressure ends. Only scrape/evaluation intervals and notification timing are shortened;
the ``for:`` durations are the shipped ones (5 min and 2 min), so this test takes about 8 min."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests import ROOT

from ... import services
from ..deploy.test_alertmanager import _local_config, _Receiver, start_alertmanager

pytestmark = [pytest.mark.integration, pytest.mark.slow]



def _wait(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_saturation_pages_pings_inhibits_and_resolves(pg, tmp_path):
    binary = services.binary("prometheus", "prometheus")
    receiver = _Receiver()
    am_proc, am_port = start_alertmanager(_local_config(str(tmp_path), receiver.port), str(tmp_path))
    app_port, prom_port = services.free_port(), services.free_port()
    app = subprocess.Popen([sys.executable, "-m", "tests.apps.saturate", pg.url(), str(app_port)], cwd=ROOT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    with open(os.path.join(ROOT, "collector", "prometheus.yml")) as fh:
        config = yaml.safe_load(fh)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [os.path.join(ROOT, "alerts", "telemetry.rules.yml")]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    config["scrape_configs"] = [{"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen([binary, f"--config.file={tmp_path}/prometheus.yml", f"--storage.tsdb.path={tmp_path}/tsdb",
                             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def hold(n: int) -> None:
        assert app.stdin and app.stdout
        app.stdin.write(f"{n}\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == f"holding {n}"

    def slack(alert: str, status: str) -> list:
        return [m for m in receiver.of("/slack") if alert in m["attachments"][0]["title"]
                and status.upper() in m["attachments"][0]["title"]]  # fmt: skip

    def pagerduty(alert: str, action: str) -> list:
        return [m for m in receiver.of("/pagerduty") if alert in m["payload"]["summary"] and m["event_action"] == action]

    try:
        assert app.stdout and app.stdout.readline().strip() == "ready"
        services.wait_ready(prom_port, 60)
        _wait(lambda: httpx.get(f"{api}/alertmanagers").json()["data"]["activeAlertmanagers"], 60, "Prometheus to find Alertmanager")
        _wait(lambda: [r for r in httpx.get(f"{api}/query", params={"query": "up"}).json()["data"]["result"]
                       if r["value"][1] == "1"], 60, "the first scrape")  # fmt: skip

        hold(9)  # 90%: above the warning line, below the critical one
        warning = _wait(lambda: slack("DbPoolUsageWarning", "firing"), 7 * 60, "the warning in Slack")[0]
        att = warning["attachments"][0]
        assert warning["channel"] == "#db-alerts"
        assert "api / main-db" in att["title"] and "90%" in att["text"] and "runbooks/DbPoolUsageWarning.md" in att["text"]
        assert not receiver.of("/pagerduty")

        hold(10)  # 100%: critical
        page = _wait(lambda: pagerduty("DbPoolUsageCritical", "trigger"), 4 * 60, "the page")[0]
        assert page["routing_key"] == "pd-key-from-file" and page["payload"]["severity"] == "critical"
        assert page["payload"]["custom_details"]["pool"] == "main-db"
        am = f"http://127.0.0.1:{am_port}/api/v2/alerts"
        inhibited = _wait(lambda: [a for a in httpx.get(am).json() if a["labels"]["alertname"] == "DbPoolUsageWarning"
                                   and a["status"]["inhibitedBy"]], 60, "the warning to be inhibited")  # fmt: skip
        assert inhibited[0]["status"]["state"] == "suppressed"
        firing_warnings = len(slack("DbPoolUsageWarning", "firing"))

        hold(0)  # pressure ends
        _wait(lambda: pagerduty("DbPoolUsageCritical", "resolve"), 3 * 60, "the page to resolve")
        _wait(lambda: slack("DbPoolUsageWarning", "resolved"), 3 * 60, "the warning to resolve in Slack")
        assert len(slack("DbPoolUsageWarning", "firing")) == firing_warnings  # nothing new while inhibited
    finally:
        for proc in (prom, app):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        for pipe in (app.stdin, app.stdout):
            if pipe is not None:
                pipe.close()
        am_proc.terminate()
        am_proc.wait(timeout=20)
        receiver.server.shutdown()
        receiver.server.server_close()
