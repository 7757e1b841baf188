"""The pooler's own metrics, where they are readable: a Prometheus-format endpoint mapped into
the package's pooler view (the ``pgbouncer_*`` series), for poolers without a console we can
reach.

Sources and the families read (names from each project's documentation):

* pgbouncer through the prometheus-community ``pgbouncer_exporter``, and Supabase's Metrics API
  (its dedicated pgbouncer): ``pgbouncer_pools_client_active_connections``,
  ``pgbouncer_pools_client_waiting_connections``, ``pgbouncer_pools_client_maxwait_seconds``,
  ``pgbouncer_pools_server_{active,idle,used,testing,login}_connections``
  (``{database, user}``), ``pgbouncer_stats_client_wait_seconds_total``,
  ``pgbouncer_stats_sql_transactions_pooled_total`` (``{database}``),
  ``pgbouncer_databases_pool_size`` (``{name}``);
* Neon: the same families prefixed ``neon_``;
* PgCat: ``pgcat_pools_cl_active``, ``pgcat_pools_cl_waiting``, ``pgcat_pools_sv_active``,
  ``pgcat_pools_sv_idle``, ``pgcat_pools_sv_login``, ``pgcat_pools_maxwait`` (seconds) +
  ``pgcat_pools_maxwait_us`` (``{pool, user}``; ``pool`` is the database);
* Supavisor (self-hosted ``/metrics``, or Supabase's Metrics API for hosted projects):
  ``supavisor_pool_checkout_duration_local`` and ``_remote`` (histograms in milliseconds, by
  ``tenant``): their ``_sum`` is the time clients waited for a server connection, published as
  ``pgbouncer_client_wait_seconds_total{database=<tenant>}`` (seconds).

A family that is absent is left out, never fatal. Credentials: ``user:password@`` in the URL
(basic auth, as Supabase's Metrics API wants with the service role key), never logged.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from typing import Any

from ._stats import Sample

_POOLS = {  # family (after an optional "neon_" prefix) -> (our metric, extra label)
    "pgbouncer_pools_client_active_connections": ("pgbouncer_clients", ("state", "active")),
    "pgbouncer_pools_client_waiting_connections": ("pgbouncer_clients", ("state", "waiting")),
    "pgbouncer_pools_server_active_connections": ("pgbouncer_servers", ("state", "active")),
    "pgbouncer_pools_server_idle_connections": ("pgbouncer_servers", ("state", "idle")),
    "pgbouncer_pools_server_used_connections": ("pgbouncer_servers", ("state", "used")),
    "pgbouncer_pools_server_testing_connections": ("pgbouncer_servers", ("state", "tested")),
    "pgbouncer_pools_server_login_connections": ("pgbouncer_servers", ("state", "login")),
}
_PGCAT = {
    "pgcat_pools_cl_active": ("pgbouncer_clients", ("state", "active")),
    "pgcat_pools_cl_waiting": ("pgbouncer_clients", ("state", "waiting")),
    "pgcat_pools_sv_active": ("pgbouncer_servers", ("state", "active")),
    "pgcat_pools_sv_idle": ("pgbouncer_servers", ("state", "idle")),
    "pgcat_pools_sv_login": ("pgbouncer_servers", ("state", "login")),
}
SUPAVISOR_CHECKOUT = ("supavisor_pool_checkout_duration_local_sum", "supavisor_pool_checkout_duration_remote_sum")


def fetch(url: str, timeout: float) -> str:
    """GET the exposition; ``user:password@`` in the URL becomes basic auth."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Accept": "text/plain"}
    if parts.username is not None:
        secret = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked in settings
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return str(response.read().decode("utf-8", "replace"))


def samples(text: str) -> tuple[list[Sample], int]:
    """The pooler view's samples from an exposition, and how many families were understood."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    understood = 0

    def add(name: str, labels: tuple[tuple[str, str], ...], value: float) -> None:
        key = (name, labels)
        out[key] = out.get(key, 0.0) + value

    maxwait_us: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("neon_")
            lb = s.labels
            if name in _POOLS:
                metric, extra = _POOLS[name]
                add(metric, (("database", lb.get("database", "")), ("user", lb.get("user", "")), extra), s.value)
            elif name in _PGCAT:
                metric, extra = _PGCAT[name]
                add(metric, (("database", lb.get("pool", "")), ("user", lb.get("user", "")), extra), s.value)
            elif name in ("pgbouncer_pools_client_maxwait_seconds", "pgcat_pools_maxwait"):
                db = lb.get("database", lb.get("pool", ""))
                add("pgbouncer_client_maxwait_seconds", (("database", db), ("user", lb.get("user", ""))), s.value)
            elif name == "pgcat_pools_maxwait_us":
                key = (("database", lb.get("pool", "")), ("user", lb.get("user", "")))
                maxwait_us[key] = maxwait_us.get(key, 0.0) + s.value / 1e6
            elif name == "pgbouncer_stats_client_wait_seconds_total":
                add("pgbouncer_client_wait_seconds_total", (("database", lb.get("database", "")),), s.value)
            elif name == "pgbouncer_stats_sql_transactions_pooled_total":
                add("pgbouncer_transactions_total", (("database", lb.get("database", "")),), s.value)
            elif name == "pgbouncer_databases_pool_size":
                add("pgbouncer_pool_size", (("database", lb.get("name", "")),), s.value)
            elif name in SUPAVISOR_CHECKOUT:  # milliseconds spent waiting for a checkout
                add("pgbouncer_client_wait_seconds_total", (("database", lb.get("tenant", "")),), s.value / 1000)
            else:
                continue
            understood += 1
    for pool, micros in maxwait_us.items():
        name_key = ("pgbouncer_client_maxwait_seconds", pool)
        out[name_key] = out.get(name_key, 0.0) + micros
    return [(name, labels, value) for (name, labels), value in out.items()], understood


def describe(url: str) -> dict[str, Any]:
    """What the settings error and logs may show of the URL: never its credentials."""
    parts = urllib.parse.urlsplit(url)
    return {"url": urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))}
