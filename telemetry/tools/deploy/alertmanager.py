"""Alertmanager's configuration for the package's alerts: critical pages (PagerDuty), warnings
ping (Slack), the "above 80%" warning inhibited while its pool is exhausted. ``telemetry
alertmanager`` writes it with a deployment's paths and channel; the repository's
``alerts/alertmanager.yml`` is this file on its defaults (generated, drift-tested). Secrets never
appear in it: the PagerDuty routing key and the Slack webhook URL are read from files.
"""

from __future__ import annotations

import dataclasses
import os

TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "telemetry.tmpl")


@dataclasses.dataclass(frozen=True)
class AlertmanagerConfig:
    pagerduty_key_file: str = "/etc/alertmanager/secrets/pagerduty_routing_key"
    slack_webhook_file: str = "/etc/alertmanager/secrets/slack_webhook_url"
    slack_channel: str = "#db-alerts"
    templates_dir: str = "/etc/alertmanager/templates"

    def __post_init__(self) -> None:
        for name in ("pagerduty_key_file", "slack_webhook_file", "templates_dir"):
            value = getattr(self, name)
            if not value or not os.path.isabs(value) or "'" in value:
                raise ValueError(f"{name}={value!r}: expected an absolute path (as Alertmanager sees it)")
        if not self.slack_channel.startswith(("#", "@")) or "'" in self.slack_channel:
            raise ValueError(f"slack_channel={self.slack_channel!r}: expected #channel or @user")


DEFAULT = AlertmanagerConfig()

_CONFIG = """# Alertmanager routing for the telemetry alerts: critical pages (PagerDuty), warning pings
# (Slack). Secrets are never in this file: the PagerDuty routing key and the Slack webhook URL
# are read from files mounted at run time (docker-compose mounts them from ./secrets/).
{header}global:
  resolve_timeout: 5m

templates:
  - {templates_dir}/*.tmpl

route:
  receiver: slack-warnings
  # one notification per alert per service; pools of one service grouped together
  group_by: [alertname, service]
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 12h
  routes:
    - receiver: pagerduty-critical
      matchers: ['severity="critical"']
      group_wait: 10s
      # a page that is still firing is re-sent hourly, not every 12 h
      repeat_interval: 1h
    - receiver: slack-warnings
      matchers: ['severity="warning"']
      repeat_interval: 12h

inhibit_rules:
  # while a pool is exhausted (critical), its "above 80%" warning adds nothing
  - source_matchers: ['alertname="DbPoolUsageCritical"']
    target_matchers: ['alertname="DbPoolUsageWarning"']
    equal: [service, pool]
  - source_matchers: ['alertname="RedisPoolUsageCritical"']
    target_matchers: ['alertname="RedisPoolUsageWarning"']
    equal: [service, pool]

receivers:
  - name: pagerduty-critical
    pagerduty_configs:
      - routing_key_file: {pagerduty_key_file}
        send_resolved: true
        severity: critical
        description: '{{{{ template "telemetry.pagerduty.description" . }}}}'
        details:
          summary: '{{{{ template "telemetry.summary" . }}}}'
          service: '{{{{ .CommonLabels.service }}}}'
          pool: '{{{{ .CommonLabels.pool }}}}'
          firing: '{{{{ template "telemetry.text" . }}}}'
        links:
          - href: '{{{{ (index .Alerts 0).Annotations.runbook_url }}}}'
            text: runbook
          - href: '{{{{ (index .Alerts 0).Annotations.dashboard_url }}}}'
            text: dashboard
          - href: '{{{{ template "telemetry.logs_url" . }}}}'
            text: log lines (db_pool_critical_usage / db_pool_timeout) and their traces
  - name: slack-warnings
    slack_configs:
      - api_url_file: {slack_webhook_file}
        channel: '{slack_channel}'
        send_resolved: true
        title: '{{{{ template "telemetry.slack.title" . }}}}'
        title_link: '{{{{ (index .Alerts 0).Annotations.dashboard_url }}}}'
        text: '{{{{ template "telemetry.text" . }}}}'
        actions:
          - type: button
            text: Runbook
            url: '{{{{ (index .Alerts 0).Annotations.runbook_url }}}}'
          - type: button
            text: Logs
            url: '{{{{ template "telemetry.logs_url" . }}}}'
"""


def render(cfg: AlertmanagerConfig = DEFAULT) -> str:
    header = "" if cfg == DEFAULT else "# Written by `telemetry alertmanager` (poolsight).\n"
    return _CONFIG.format(header=header, **dataclasses.asdict(cfg))


def template() -> str:
    """The notification templates the configuration names (``telemetry.summary``, ...)."""
    with open(TEMPLATE_FILE) as fh:
        return fh.read()
