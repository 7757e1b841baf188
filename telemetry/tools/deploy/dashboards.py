"""Shared defaults for the grafanalib dashboards in ``dashboards/<area>.dashboard.py``.

Every panel has a unit, a datasource reference to the ``$datasource`` variable and a fixed
position; thresholds come from :mod:`telemetry.thresholds`, like the alert rules'.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from grafanalib.core import (
    Annotations,
    Dashboard,
    GridPos,
    Heatmap,
    Stat,
    Target,
    Template,
    Templating,
    Text,
    Threshold,
    TimeSeries,
)

from telemetry import thresholds as T
from telemetry.tools.promql import with_selector

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
SVC = 'service=~"$service", instance=~"$instance"'
POOL = 'service=~"$service", pool=~"$pool", instance=~"$instance"'

SECONDS, PERCENT, OPS, SHORT = "s", "percentunit", "reqps", "short"
#: Grafana 9+ model: datasource references are objects, time series panels use fieldConfig
SCHEMA_VERSION = 36


def targets(*exprs: tuple[str, str]) -> list[Target]:
    return [Target(expr=e, legendFormat=legend, refId=chr(ord("A") + i), datasource=DS)
            for i, (e, legend) in enumerate(exprs)]  # fmt: skip


def series(title: str, exprs: list[tuple[str, str]], unit: str, pos: tuple[int, int, int, int],
           description: str = "", lines: tuple[float, ...] = (), stack: bool = False) -> TimeSeries:  # fmt: skip
    x, y, w, h = pos
    steps = [Threshold("green", 0, 0.0)] + [
        Threshold("orange" if i == 0 and len(lines) > 1 else "red", i + 1, float(v)) for i, v in enumerate(lines)
    ]
    return TimeSeries(
        title=title, description=description, dataSource=DS, targets=targets(*exprs), unit=unit,
        gridPos=GridPos(h=h, w=w, x=x, y=y), thresholds=steps if lines else [],
        thresholdsStyleMode="line" if lines else "off", legendDisplayMode="table",
        legendPlacement="right" if w >= 16 else "bottom", legendCalcs=["max", "lastNotNull"],
        stacking={"mode": "normal", "group": "A"} if stack else {},
    )  # fmt: skip


def stat(title: str, expr: str, unit: str, pos: tuple[int, int, int, int], lines: tuple[float, ...] = (),
         description: str = "") -> Stat:  # fmt: skip
    x, y, w, h = pos
    steps = [Threshold("green", 0, 0.0)] + [Threshold("red", i + 1, float(v)) for i, v in enumerate(lines)]
    return Stat(title=title, description=description, dataSource=DS, targets=targets((expr, "")),
                format=unit, gridPos=GridPos(h=h, w=w, x=x, y=y), thresholds=steps,
                reduceCalc="lastNotNull", graphMode="area")  # fmt: skip


def heatmap(title: str, expr: str, pos: tuple[int, int, int, int], description: str = "") -> Heatmap:
    x, y, w, h = pos
    target = Target(expr=expr, legendFormat="{{le}}", refId="A", datasource=DS, format="heatmap")
    return Heatmap(title=title, description=description, dataSource=DS, targets=[target],
                   gridPos=GridPos(h=h, w=w, x=x, y=y), dataFormat="tsbuckets", yBucketBound="upper",
                   extraJson={"fieldConfig": {"defaults": {"unit": SECONDS}}})  # fmt: skip


def text(title: str, content: str, pos: tuple[int, int, int, int]) -> Text:
    x, y, w, h = pos
    return Text(title=title, content=content, mode="markdown", gridPos=GridPos(h=h, w=w, x=x, y=y))


def templating(pool: bool = True) -> Templating:
    variables = [
        Template(name="datasource", label="Prometheus", query="prometheus", type="datasource"),
        Template(name="service", label="service", dataSource=DS, includeAll=True, multi=True,
                 allValue=".*", query="label_values(db_pool_connections_in_use, service)", default="$__all"),
        Template(name="instance", label="instance", dataSource=DS, includeAll=True, multi=True,
                 allValue=".*", query='label_values(db_pool_connections_in_use{service=~"$service"}, instance)',
                 default="$__all"),
    ]  # fmt: skip
    if pool:
        variables.append(Template(name="pool", label="pool", dataSource=DS, includeAll=True, multi=True,
                                  allValue=".*", default="$__all",
                                  query='label_values(db_pool_connections_in_use{service=~"$service"}, pool)'))  # fmt: skip
    return Templating(list=variables)


ALERT_ANNOTATIONS = Annotations(list=[{
    "datasource": DS, "enable": True, "expr": 'ALERTS{alertstate="firing", alertname=~"Db.*|EventLoop.*|Celery.*|Pgbouncer.*|Redis.*"}',
    "iconColor": "red", "name": "alerts firing", "step": "30s", "titleFormat": "{{alertname}}",
    "tagKeys": "severity,service,pool", "textFormat": "{{service}} {{pool}}",
}])  # fmt: skip

LINKS = [
    {"title": title, "type": "link", "url": f"/d/{uid}?$__url_time_range&$__all_variables", "targetBlank": False}
    for title, uid in (("Overview", T.DASHBOARD_UID_OVERVIEW), ("Database pools", T.DASHBOARD_UID_POOLS),
                       ("API", T.DASHBOARD_UID_API), ("Celery", T.DASHBOARD_UID_CELERY),
                       ("Database server", T.DASHBOARD_UID_SERVER))  # fmt: skip
]


def dashboard(title: str, uid: str, description: str, panels: list[Any], pool: bool = True) -> Dashboard:
    return Dashboard(
        title=title, uid=uid, description=description, tags=["telemetry"], timezone="utc",
        panels=panels, templating=templating(pool), links=LINKS, refresh="30s",
        annotations=ALERT_ANNOTATIONS, schemaVersion=SCHEMA_VERSION,
    ).auto_panel_ids()  # fmt: skip


# --------------------------------------------------------------------------- generation


#: the dashboards' definitions ship in the package (``telemetry dashboards`` renders them from an
#: installed wheel); the repository commits their JSON in ``dashboards/``
DEFINITIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana")


def dashboard_files(root: str | None = None) -> list[str]:
    return sorted(os.path.join(DEFINITIONS, f) for f in os.listdir(DEFINITIONS) if f.endswith(".dashboard.py"))


def load(path: str) -> Any:
    name = os.path.basename(path).replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dashboard


def render(path: str, selector: str = "") -> str:
    """The dashboard's JSON; ``selector`` (``job="api"``) is added to every metric of every query."""
    from grafanalib._gen import DashboardEncoder

    data = json.loads(json.dumps(load(path).to_json_data(), cls=DashboardEncoder))
    if selector:
        data = _select(data, selector)
    return json.dumps(data, sort_keys=True, indent=2) + "\n"


def _select(node: Any, selector: str) -> Any:
    if isinstance(node, dict):
        return {k: (with_selector(v, selector) if k in ("expr", "query") and isinstance(v, str) else _select(v, selector))
                for k, v in node.items()}  # fmt: skip
    if isinstance(node, list):
        return [_select(v, selector) for v in node]
    return node


def json_name(path: str) -> str:
    """``.../grafana/pools.dashboard.py`` -> ``pools.json``."""
    return os.path.basename(path).replace(".dashboard.py", ".json")


def json_path(path: str, root: str = "") -> str:
    return os.path.join(root, "dashboards", json_name(path))
