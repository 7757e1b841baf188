"""The demo's alert chain, for real: the shipped rules in a real Prometheus that scrapes the host's
``/metrics`` every second, a real Alertmanager with the shipped routes, and a local capture server
standing in for PagerDuty and Slack (it records each payload as those services would receive it).

The rules and routes are the ones ``telemetry rules`` and ``telemetry alertmanager`` write, on the
demo's clock: the demo compresses the incident (the report's ``pool_timeout`` of 60 s is the
demo's ``--pool-timeout``, 3 s by default), so thresholds that are durations scale by
``pool_timeout / 60``, and a scenario of seconds stands for minutes of production, so ``for:``
durations, range windows and Alertmanager's grouping delays scale by ``FOR_SCALE``. One source:
the thresholds in ``telemetry.thresholds``; nothing here restates a rule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from telemetry.tools._proc import DemoError, free_ports, tail
from telemetry.tools.deploy import alertmanager as _am
from telemetry.tools.deploy import rules as _rules

#: one production minute per demo second: ``for: 5m`` waits 5 s
FOR_SCALE = 1 / 60
#: the incident report's ``pool_timeout``: the demo's ``--pool-timeout`` against it is its work's clock
REPORT_POOL_TIMEOUT_SECONDS = 60.0
#: Debian's names first (``prometheus-alertmanager``), then upstream's
RULE_NAMES = frozenset(a.name for a in _rules.ALERTS)
BINARIES = {
    "prometheus": ("prometheus",),
    "alertmanager": ("prometheus-alertmanager", "alertmanager"),
}


def rules_config(pool_timeout: float) -> _rules.RulesConfig:
    return _rules.RulesConfig(
        for_scale=FOR_SCALE, seconds_scale=min(1.0, pool_timeout / REPORT_POOL_TIMEOUT_SECONDS)
    )


def hold_threshold_seconds(pool_timeout: float) -> float:
    """The hold rule's threshold on the demo's clock (the watchdog's too: one source)."""
    cfg = rules_config(pool_timeout)
    return cfg.hold_seconds * cfg.seconds_scale


def missing() -> str | None:
    """Why the chain cannot run here (a sentence), or None."""
    absent = [names[0] for names in BINARIES.values() if not any(shutil.which(n) for n in names)]
    if not absent:
        return None
    return (f"no alerts evaluated: {' and '.join(absent)} not installed (scripts/install-system-deps.sh installs "
            "the Debian packages prometheus and prometheus-alertmanager)")  # fmt: skip


def _binary(kind: str) -> str:
    for name in BINARIES[kind]:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(missing() or kind)


class Capture:
    """A local HTTP server standing in for PagerDuty's events API and Slack's webhook; keeps every
    payload with the time it arrived."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode(errors="replace")}
                with outer._lock:
                    outer.calls.append((time.time(), self.path, payload))
                pagerduty = self.path == "/pagerduty"
                self.send_response(202 if pagerduty else 200)
                self.end_headers()
                self.wfile.write(b'{"status":"success"}' if pagerduty else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def notifications(self, t0: float) -> list[dict[str, Any]]:
        """Each received notification (one per Alertmanager group and state change), in order."""
        with self._lock:
            calls = list(self.calls)
        return [notification(path, body, at - t0) for at, path, body in calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def notification(path: str, body: dict[str, Any], at: float) -> dict[str, Any]:
    """A PagerDuty event or a Slack message, read as the receiving service shows it."""
    if path == "/pagerduty":
        links = {link.get("text"): link.get("href") for link in body.get("links", [])}
        payload = body.get("payload", {})
        return {"at_seconds": round(at, 1), "receiver": "pagerduty", "status": body.get("event_action"),
                "summary": payload.get("summary", ""), "severity": payload.get("severity"),
                "runbook": links.get("runbook"), "dashboard": links.get("dashboard")}  # fmt: skip
    att = (body.get("attachments") or [{}])[0]
    buttons = {a.get("text"): a.get("url") for a in att.get("actions", [])}
    title = att.get("title", "")
    return {"at_seconds": round(at, 1), "receiver": "slack", "channel": body.get("channel"),
            "status": "resolved" if "RESOLVED" in title.upper() else "firing", "summary": title,
            "text": att.get("text", ""), "runbook": buttons.get("Runbook"), "dashboard": att.get("title_link")}  # fmt: skip


@dataclass
class Chain:
    """Prometheus + Alertmanager + the capture server for one scenario (each starts empty, so a
    scenario's alerts are its own)."""

    workdir: str
    metrics_port: int
    pool_timeout: float
    ports: tuple[int, int] | None = None  # Alertmanager's and Prometheus', or two free ones

    def __post_init__(self) -> None:
        self.capture: Capture | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.prom_port = self.am_port = 0

    # -- files ---------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def alertmanager_config(self, capture_port: int) -> str:
        import yaml

        secrets = os.path.join(self.workdir, "secrets")
        self._write("secrets/pagerduty_routing_key", "demo-routing-key\n")
        self._write("secrets/slack_webhook_url", f"http://127.0.0.1:{capture_port}/slack\n")
        self._write("templates/telemetry.tmpl", _am.template())
        cfg = yaml.safe_load(_am.render(_am.AlertmanagerConfig(
            pagerduty_key_file=os.path.join(secrets, "pagerduty_routing_key"),
            slack_webhook_file=os.path.join(secrets, "slack_webhook_url"),
            templates_dir=os.path.join(self.workdir, "templates"))))  # fmt: skip
        # the shipped delays on the demo's clock (never under a second: Alertmanager's tick)
        for route in [cfg["route"], *cfg["route"].get("routes", [])]:
            for key in ("group_wait", "group_interval", "repeat_interval"):
                if key in route:
                    route[key] = max(_rules.scaled(route[key], FOR_SCALE), "1s", key=_rules.seconds)
        cfg["global"]["resolve_timeout"] = _rules.scaled(
            cfg["global"]["resolve_timeout"], FOR_SCALE
        )
        for receiver in cfg["receivers"]:
            for pd in receiver.get("pagerduty_configs", []):
                pd["url"] = f"http://127.0.0.1:{capture_port}/pagerduty"
        return self._write("alertmanager.yml", yaml.safe_dump(cfg, sort_keys=False))

    def prometheus_config(self) -> str:
        import yaml

        rules = self._write(
            "telemetry.rules.yml", _rules.render_rules(rules_config(self.pool_timeout))
        )
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rules],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.am_port}"]}]}]
            },
            "scrape_configs": [
                {
                    "job_name": "telemetry-demo",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.metrics_port}"]}],
                }
            ],
        }
        return self._write("prometheus.yml", yaml.safe_dump(cfg, sort_keys=False))

    # -- processes -----------------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        self.capture = Capture()
        self.am_port, self.prom_port = self.ports or free_ports(2)
        log = open(os.path.join(self.workdir, "alertmanager.log"), "w")  # noqa: SIM115 - closed below
        try:
            self.procs.append(subprocess.Popen(
                [_binary("alertmanager"), f"--config.file={self.alertmanager_config(self.capture.port)}",
                 f"--storage.path={self.workdir}/am-data", f"--web.listen-address=127.0.0.1:{self.am_port}",
                 "--cluster.listen-address=", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        finally:
            log.close()
        log = open(os.path.join(self.workdir, "prometheus.log"), "w")  # noqa: SIM115 - closed below
        try:
            self.procs.append(subprocess.Popen(
                [_binary("prometheus"), f"--config.file={self.prometheus_config()}",
                 f"--storage.tsdb.path={self.workdir}/tsdb", f"--web.listen-address=127.0.0.1:{self.prom_port}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        finally:
            log.close()
        for port, what in ((self.am_port, "alertmanager"), (self.prom_port, "prometheus")):
            self._wait(
                lambda p=port: self._get(p, "/-/ready") is not None, 60, f"{what} to be ready", what
            )
        self._wait(lambda: (self._api("alertmanagers") or {}).get("activeAlertmanagers"), 60,
                   "Prometheus to find Alertmanager", "prometheus")  # fmt: skip

    def wait_scraped(self) -> None:
        """Until the first scrape of the host's /metrics succeeded (the app serves it)."""
        self._wait(lambda: any(r["value"][1] == "1" for r in (self._api("query", query="up") or {}).get("result", [])),
                   60, "the first scrape of the host's /metrics", "prometheus")  # fmt: skip

    def firing(self) -> set[str]:
        data = self._api("query", query='ALERTS{alertstate="firing"}') or {}
        return {r["metric"].get("alertname", "") for r in data.get("result", [])}

    def quiet(self, timeout: float) -> bool:
        """Until Prometheus fires nothing (the pressure is gone and the scaled windows have moved
        past it), or ``timeout``: the report can say when each alert resolved."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.firing():
                return True
            time.sleep(0.5)
        return False

    def settle(self, timeout: float = 20.0) -> None:
        """Until what Alertmanager holds has reached the capture server, or ``timeout``: every
        active (not inhibited) alert notified as firing, every notified alert that Prometheus no
        longer fires notified as resolved. The report lists what a user would have received."""
        assert self.capture is not None
        capture = self.capture

        def delivered() -> bool:
            active = self._get(self.am_port, "/api/v2/alerts")
            if active is None:
                return False
            names = {
                a["labels"].get("alertname", "") for a in active if a["status"]["state"] == "active"
            }
            sent = capture.notifications(0.0)
            fired = {
                name
                for n in sent
                if n["status"] in ("firing", "trigger")
                for name in _named(n, names | RULE_NAMES)
            }
            resolved = {
                name
                for n in sent
                if n["status"] in ("resolved", "resolve")
                for name in _named(n, RULE_NAMES)
            }
            gone = fired - self.firing()
            return names <= fired and gone <= resolved

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not delivered():
            time.sleep(0.25)

    def alerts(self, t0: float, end: float) -> list[dict[str, Any]]:
        """Prometheus' own ``ALERTS`` over the run: each firing episode of each alert, when it
        fired, and when it resolved if before the end (seconds since the load started). An alert
        that fired, resolved and fired again is two episodes."""
        data = self._api("query_range", query='ALERTS{alertstate="firing"}', start=f"{t0 - 5:.3f}",
                         end=f"{end:.3f}", step="1s") or {}  # fmt: skip
        out = []
        for series in data.get("result", []):
            labels = dict(series["metric"])
            stamps = [float(t) for t, _v in series["values"]]
            name = labels.pop("alertname")
            severity = labels.pop("severity", "")
            labels.pop("alertstate", None)
            labels.pop("__name__", None)
            episodes: list[list[float]] = []
            for t in sorted(stamps):  # a gap of more than a step: resolved, then fired again
                if episodes and t - episodes[-1][-1] <= 1.5:
                    episodes[-1].append(t)
                else:
                    episodes.append([t])
            for ep in episodes:
                # last_seen: an episode still firing when the run was collected was seen this
                # long, not for ever (one that began a second before the end was not notified yet)
                out.append({"alert": name, "severity": severity, "labels": dict(labels),
                            "fired_at_seconds": round(ep[0] - t0, 1),
                            "resolved_at_seconds": round(ep[-1] - t0 + 1, 1) if ep[-1] < end - 2 else None,
                            "last_seen_seconds": round(ep[-1] - t0, 1)})  # fmt: skip
        return sorted(
            out, key=lambda a: (a["fired_at_seconds"], a["alert"], sorted(a["labels"].items()))
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        if self.capture is not None:
            self.capture.close()

    # -- http --------------------------------------------------------------------------------
    def _get(self, port: int, path: str, **params: str) -> Any:
        import httpx

        try:
            r = httpx.get(f"http://127.0.0.1:{port}{path}", params=params, timeout=5)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            return r.json()
        except ValueError:
            return r.text

    def _api(self, path: str, **params: str) -> Any:
        got = self._get(self.prom_port, f"/api/v1/{path}", **params)
        return got.get("data") if isinstance(got, dict) else None

    def _wait(self, pred: Any, timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if pred():
                return
            time.sleep(0.2)
        raise DemoError(f"timed out waiting for {what}; last lines of {log}.log:\n"
                        f"{tail(os.path.join(self.workdir, log + '.log'))}")  # fmt: skip


def _named(n: dict[str, Any], names: set[str] | frozenset[str]) -> set[str]:
    """The alert names a notification's summary mentions (Alertmanager puts them in the title)."""
    return {name for name in names if name in n["summary"]}
