"""The shipped routing tree, checked by amtool and run by a real Alertmanager: critical reaches a
PagerDuty stand-in, warning a Slack stand-in, in their real payload shapes, with service, pool,
value and links; the usage warning is inhibited while the critical of the same pool fires; keys
and webhook URLs come from files."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import yaml

from tests import ROOT

from ... import services

CONFIG = os.path.join(ROOT, "alerts", "alertmanager.yml")


def _bin(name: str) -> str:
    return services.binary(name, "prometheus-alertmanager")


def _local_config(tmp: str, receiver_port: int, group_wait: str = "1s") -> str:
    """The shipped file with secrets dir, templates dir and receiver endpoints made local."""
    with open(CONFIG) as fh:
        cfg = yaml.safe_load(fh)
    secrets = os.path.join(tmp, "secrets")
    os.makedirs(secrets, exist_ok=True)
    with open(os.path.join(secrets, "pagerduty_routing_key"), "w") as fh:
        fh.write("pd-key-from-file\n")
    with open(os.path.join(secrets, "slack_webhook_url"), "w") as fh:
        fh.write(f"http://127.0.0.1:{receiver_port}/slack\n")
    cfg["templates"] = [os.path.join(ROOT, "alerts", "templates", "*.tmpl")]
    text = yaml.safe_dump(cfg, sort_keys=False).replace("/etc/alertmanager/secrets", secrets)
    cfg = yaml.safe_load(text)
    for route in [cfg["route"], *cfg["route"]["routes"]]:
        route["group_wait"] = group_wait
        route["group_interval"] = "1s"
    for receiver in cfg["receivers"]:
        for pd in receiver.get("pagerduty_configs", []):
            pd["url"] = f"http://127.0.0.1:{receiver_port}/pagerduty"
    path = os.path.join(tmp, "alertmanager.yml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


@pytest.mark.integration
def test_amtool_check_config_and_routes(tmp_path):
    amtool = _bin("amtool")
    for path in (CONFIG, _local_config(str(tmp_path), 9)):
        out = subprocess.run([amtool, "check-config", path], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    cases = [
        ("pagerduty-critical", ["severity=critical", "alertname=DbPoolUsageCritical", "service=api", "pool=db"]),
        ("pagerduty-critical", ["severity=critical", "alertname=DbPoolCheckoutTimeouts", "service=worker"]),
        ("slack-warnings", ["severity=warning", "alertname=DbPoolUsageWarning", "service=api"]),
        ("slack-warnings", ["alertname=SomethingElse"]),
    ]
    for receiver, labels in cases:
        out = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={CONFIG}",
             f"--verify.receivers={receiver}", *labels],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, (labels, out.stdout, out.stderr)
    wrong = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={CONFIG}",
         "--verify.receivers=slack-warnings", "severity=critical"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert wrong.returncode != 0  # the check can fail


def test_no_secret_in_the_committed_config():
    with open(CONFIG) as fh:
        cfg = yaml.safe_load(fh)
    for receiver in cfg["receivers"]:
        for pd in receiver.get("pagerduty_configs", []):
            assert "routing_key" not in pd and "service_key" not in pd and pd["routing_key_file"]
        for sl in receiver.get("slack_configs", []):
            assert "api_url" not in sl and sl["api_url_file"]


class _Receiver:
    """A local HTTP server standing in for PagerDuty and Slack; records every payload."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.calls.append((self.path, json.loads(body)))
                self.send_response(202 if self.path == "/pagerduty" else 200)
                self.end_headers()
                self.wfile.write(b'{"status":"success"}' if self.path == "/pagerduty" else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.calls if p == path]


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def start_alertmanager(config: str, tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = _bin("prometheus-alertmanager")
    port = services.free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.path={tmp}/am-data",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    services.wait_ready(port, 60)
    return proc, port


def _alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": {
            "summary": f"{name} on {labels.get('pool')}",
            "description": "The busiest api process uses 100% of pool_size + max_overflow on main-db.",
            "runbook_url": f"https://runbooks.example/{name}.md",
            "dashboard_url": "http://grafana.example/d/telemetry-db-pools",
            "logs_url": "http://grafana.example/explore?left=db_pool_critical_usage",
        },
    }


def _wait_for(pred: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
def test_real_alertmanager_routes_renders_and_inhibits(tmp_path, receiver):
    config = _local_config(str(tmp_path), receiver.port)
    proc, port = start_alertmanager(config, str(tmp_path))
    try:
        api = f"http://127.0.0.1:{port}/api/v2/alerts"
        labels = {"service": "api", "pool": "main-db"}
        # critical and warning of the same pool: page, and the warning is inhibited
        httpx.post(api, json=[_alert("DbPoolUsageCritical", "critical", **labels),
                              _alert("DbPoolUsageWarning", "warning", **labels)]).raise_for_status()  # fmt: skip
        # a warning of another pool is not inhibited
        httpx.post(api, json=[_alert("DbPoolUsageWarning", "warning", service="worker", pool="main-db")]).raise_for_status()
        assert _wait_for(lambda: receiver.of("/pagerduty") and receiver.of("/slack"))
        time.sleep(3)  # let any wrongly routed or un-inhibited notification arrive too

        pages = receiver.of("/pagerduty")
        page = pages[0]
        assert page["routing_key"] == "pd-key-from-file"  # read from the file
        assert page["event_action"] == "trigger" and page["payload"]["severity"] == "critical"
        assert "DbPoolUsageCritical api / main-db" in page["payload"]["summary"]
        assert page["payload"]["custom_details"]["pool"] == "main-db"
        assert {link["text"] for link in page["links"]} >= {"runbook", "dashboard"}
        assert any("db_pool_critical_usage" in link["href"] for link in page["links"])

        slack = receiver.of("/slack")
        texts = [m["attachments"][0]["title"] + m["attachments"][0]["text"] for m in slack]
        assert all("worker" in t for t in texts), texts  # api's warning was inhibited
        assert "DbPoolUsageWarning" in texts[0] and "100% of pool_size + max_overflow" in texts[0]
        assert "https://runbooks.example/DbPoolUsageWarning.md" in texts[0]
        assert slack[0]["channel"] == "#db-alerts"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
