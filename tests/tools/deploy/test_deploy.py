"""The deployment commands (``telemetry rules``, ``alertmanager``, ``dashboards``) from this
checkout: a selector reaches every metric of every expression, thresholds and links are the
deployment's, bad values are refused with the setting named, and on their defaults the
renderers give exactly the repository's committed files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from telemetry._core.catalogue import CATALOGUE
from telemetry.tools import cli
from telemetry.tools.deploy import alertmanager, rules
from telemetry.tools.promql import with_selector
from tests import ROOT


def _metric_uses(expr: str) -> list[str]:
    """Each of the package's metrics named in ``expr``, with what follows it."""
    names = sorted({s.name for s in CATALOGUE.values()}, key=len, reverse=True)
    pattern = re.compile(r'(?<![\w:"])(' + "|".join(names) + r')(?:_bucket|_sum|_count)?(?![\w:"])(\{[^}]*\})?')
    return [m.group(0) for m in pattern.finditer(expr)]


def test_the_selector_reaches_every_metric_of_every_rule(tmp_path: Path) -> None:
    out = tmp_path / "rules.yml"
    assert cli.main(["rules", "--selector", 'job="api"', "--out", str(out)]) == 0
    import yaml

    groups = yaml.safe_load(out.read_text())["groups"]
    uses = [u for rule in groups[0]["rules"] for u in _metric_uses(rule["expr"])]
    assert len(uses) > 30
    assert all('{job="api"' in u for u in uses), [u for u in uses if '{job="api"' not in u]


def test_thresholds_and_links_are_the_deployments() -> None:
    cfg = rules.RulesConfig(pool_usage_warning=0.7, pool_usage_critical=0.9, hold_seconds=3,
                            runbook_base_url="https://rb.example.org/", grafana_url="https://grafana.example.org")  # fmt: skip
    text = rules.render_rules(cfg)
    assert "service_pool:db_pool_usage:max > 0.7" in text and "service_pool:db_pool_usage:max > 0.9" in text
    assert "service_pool:db_connection_hold_seconds:p95_5m > 3" in text
    assert "https://rb.example.org/DbPoolUsageWarning.md" in text and "https://grafana.example.org/d/" in text
    assert "example/telemetry" not in text  # the placeholder base URL is gone


@pytest.mark.parametrize("args, named", [
    (["--usage-warning", "1.5"], "pool_usage_warning"),
    (["--usage-warning", "0.96"], "pool_usage_warning"),
    (["--hold-seconds", "-1"], "hold_seconds"),
    (["--selector", "job=api"], "selector"),
    (["--runbook-url", "runbooks/"], "runbook_base_url"),
])  # fmt: skip
def test_bad_values_are_refused_naming_the_setting(args: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rules", *args]) == 2
    assert named in capsys.readouterr().err


def test_for_durations_scale() -> None:
    assert rules.scaled("5m", 0.1) == "30s" and rules.scaled("10m", 1) == "10m" and rules.scaled("1m", 0.01) == "600ms"
    text = rules.render_rules(rules.RulesConfig(for_scale=0.1))
    assert "for: 30s" in text and "for: 5m" not in text


def test_alertmanager_with_the_deployments_receivers(tmp_path: Path) -> None:
    assert cli.main(["alertmanager", "--out", str(tmp_path), "--slack-channel", "#ops",
                     "--slack-webhook-file", "/run/secrets/slack"]) == 0  # fmt: skip
    text = (tmp_path / "alertmanager.yml").read_text()
    assert "channel: '#ops'" in text and "api_url_file: /run/secrets/slack" in text
    assert (tmp_path / "templates" / "telemetry.tmpl").read_text() == alertmanager.template()
    assert cli.main(["alertmanager", "--out", str(tmp_path), "--slack-webhook-file", "relative/path"]) == 2


def test_the_defaults_are_the_committed_files() -> None:
    assert rules.render_rules() == (Path(ROOT) / "alerts" / "telemetry.rules.yml").read_text()
    assert alertmanager.render() == (Path(ROOT) / "alerts" / "alertmanager.yml").read_text()


def test_dashboards_with_a_selector(tmp_path: Path) -> None:
    assert cli.main(["dashboards", "--out", str(tmp_path), "--selector", 'namespace="prod"']) == 0
    for path in tmp_path.iterdir():
        data = json.loads(path.read_text())
        queries = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
        queries += [v["query"] for v in data["templating"]["list"] if isinstance(v.get("query"), str) and "(" in v["query"]]
        uses = [u for q in queries for u in _metric_uses(q)]
        assert uses and all('namespace="prod"' in u for u in uses), (path.name, [u for u in uses if "prod" not in u])


def test_with_selector_leaves_recorded_series_and_label_values_alone() -> None:
    expr = 'service_pool:db_pool_usage:max > 0.8 and on() ALERTS{alertname="db_pool_size"}'
    assert with_selector(expr, 'job="x"') == expr
