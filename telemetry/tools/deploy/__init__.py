"""What a deployment installs, rendered from the catalogue and ``thresholds``: alert rules,
Alertmanager routes and templates, Grafana dashboards (``telemetry deploy``, ``telemetry generate``)."""
