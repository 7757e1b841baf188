"""``telemetry rules``, ``telemetry alertmanager``, ``telemetry dashboards``: the files a
deployment loads, written from the installed package with that deployment's selectors,
thresholds, links and receivers (the way monitoring mixins are configured). The repository's
committed copies are the same renderers on their defaults (``telemetry generate``)."""

from __future__ import annotations

import argparse
import os
import sys

from telemetry import thresholds as T


def add_commands(sub: argparse._SubParsersAction) -> None:
    sel = ('a label selector added to every metric of every expression, e.g. \'job="api", '
           'namespace="prod"\' (default: none)')
    rules = sub.add_parser("rules", help="write the Prometheus recording and alerting rules for a deployment")
    rules.add_argument("--selector", default="", help=sel)
    rules.add_argument("--usage-warning", type=float, default=T.POOL_USAGE_WARNING,
                       help=f"pool usage ratio that warns (default {T.POOL_USAGE_WARNING})")
    rules.add_argument("--usage-critical", type=float, default=T.POOL_USAGE_CRITICAL,
                       help=f"pool usage ratio that pages (default {T.POOL_USAGE_CRITICAL})")
    rules.add_argument("--hold-seconds", type=float, default=T.HOLD_SECONDS_WARNING,
                       help=f"p95 connection hold that warns (default {T.HOLD_SECONDS_WARNING:g})")
    rules.add_argument("--runbook-url", default=T.RUNBOOK_BASE_URL, help="base URL of the runbooks (docs/runbooks)")
    rules.add_argument("--grafana-url", default=T.GRAFANA_URL, help="Grafana's URL, for dashboard and log links")
    rules.add_argument("--loki-datasource-uid", default=T.LOKI_DATASOURCE_UID)
    rules.add_argument("--out", help="file to write (default: standard output)")
    am = sub.add_parser("alertmanager", help="write Alertmanager's routes, receivers and templates")
    am.add_argument("--pagerduty-key-file", default="/etc/alertmanager/secrets/pagerduty_routing_key",
                    help="where Alertmanager reads the PagerDuty routing key")
    am.add_argument("--slack-webhook-file", default="/etc/alertmanager/secrets/slack_webhook_url",
                    help="where Alertmanager reads the Slack webhook URL")
    am.add_argument("--slack-channel", default="#db-alerts")
    am.add_argument("--templates-dir", default="/etc/alertmanager/templates",
                    help="where Alertmanager finds templates/telemetry.tmpl")
    am.add_argument("--out", required=True, help="directory: alertmanager.yml and templates/telemetry.tmpl go there")
    dash = sub.add_parser("dashboards", help="write the Grafana dashboards (JSON) for a deployment")
    dash.add_argument("--selector", default="", help=sel)
    dash.add_argument("--out", required=True, help="directory for the <area>.json files")


def run(args: argparse.Namespace) -> int:
    from telemetry._core.settings import ConfigError

    try:
        if args.command == "rules":
            from .rules import RulesConfig, render_rules

            cfg = RulesConfig(selector=args.selector, pool_usage_warning=args.usage_warning,
                              pool_usage_critical=args.usage_critical, hold_seconds=args.hold_seconds,
                              runbook_base_url=args.runbook_url, grafana_url=args.grafana_url,
                              loki_datasource_uid=args.loki_datasource_uid)  # fmt: skip
            _write(args.out, render_rules(cfg))
        elif args.command == "alertmanager":
            from .alertmanager import AlertmanagerConfig, render, template

            am = AlertmanagerConfig(pagerduty_key_file=args.pagerduty_key_file,
                                    slack_webhook_file=args.slack_webhook_file,
                                    slack_channel=args.slack_channel, templates_dir=args.templates_dir)  # fmt: skip
            _write(os.path.join(args.out, "alertmanager.yml"), render(am))
            _write(os.path.join(args.out, "templates", "telemetry.tmpl"), template())
        elif args.command == "dashboards":
            try:
                from . import dashboards
            except ImportError as exc:
                raise ConfigError(f"dashboards need grafanalib: pip install 'poolsight[tools]' ({exc})") from None
            from telemetry.tools.promql import check_selector

            selector = check_selector(args.selector)
            for path in dashboards.dashboard_files():
                _write(os.path.join(args.out, dashboards.json_name(path)), dashboards.render(path, selector))
    except ValueError as exc:
        raise ConfigError(f"telemetry {args.command}: {exc}") from None
    return 0


def _write(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    print(f"wrote {path}", file=sys.stderr)
