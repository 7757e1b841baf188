"""Generated files: what they are, how they are rendered, and the drift check.

``telemetry generate`` writes them; ``tests/tools/deploy/test_generated.py`` renders them in memory and fails
when the committed copy differs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

from telemetry._core.catalogue import CATALOGUE

BEGIN = "<!-- BEGIN GENERATED: metric table (telemetry generate) -->"
END = "<!-- END GENERATED -->"


def metric_table() -> str:
    rows = [
        "| name | type | labels | unit | meaning | OpenTelemetry counterpart |",
        "|---|---|---|---|---|---|",
    ]
    for spec in CATALOGUE.values():
        labels = ", ".join(f"`{lb}`" for lb in spec.labels)
        otel = f"`{spec.otel}`" if spec.otel else "-"
        rows.append(f"| `{spec.name}` | {spec.kind} | {labels} | {spec.unit} | {spec.help} | {otel} |")
    return "\n".join(rows) + "\n"


def _splice(path: str, body: str) -> str:
    with open(path) as fh:
        text = fh.read()
    head, sep, rest = text.partition(BEGIN)
    if not sep:
        raise ValueError(f"{path}: marker {BEGIN!r} missing")
    _, sep2, tail = rest.partition(END)
    if not sep2:
        raise ValueError(f"{path}: marker {END!r} missing")
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def targets(root: str) -> dict[str, Callable[[], str]]:
    """Relative path -> function rendering its full expected content."""
    metrics_doc = os.path.join(root, "docs", "metrics.md")
    from . import alertmanager as _alertmanager
    from . import rules as _rules

    out: dict[str, Callable[[], str]] = {
        "alerts/telemetry.rules.yml": _rules.render_rules,
        "alerts/alertmanager.yml": _alertmanager.render,
        "alerts/templates/telemetry.tmpl": _alertmanager.template,
    }
    if os.path.exists(metrics_doc):  # the repository's docs (not in an installed package)
        out["docs/metrics.md"] = lambda: _splice(metrics_doc, metric_table())
    if importlib.util.find_spec("grafanalib") is not None and os.path.isdir(os.path.join(root, "dashboards")):
        from . import dashboards as _dashboards

        for path in _dashboards.dashboard_files():
            out[f"dashboards/{_dashboards.json_name(path)}"] = functools.partial(_dashboards.render, path)
    for event in _rules.LOG_QUERIES:
        out[f"alerts/logql/{event}.logql"] = functools.partial(_rules.render_log_query, event)
    return out


def generate(root: str) -> list[str]:
    changed = []
    for rel, render in targets(root).items():
        path = os.path.join(root, rel)
        content = render()
        old = open(path).read() if os.path.exists(path) else None
        if old != content:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(content)
            changed.append(rel)
    return changed
