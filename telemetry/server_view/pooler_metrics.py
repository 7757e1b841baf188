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
import contextlib
import socket
import threading
import time
import urllib.parse
from typing import Any

from telemetry._core import urls as _urls
from telemetry._core.stats import Sample

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


#: redirects followed within the pooler's own origin (a login or a trailing-slash redirect)
MAX_REDIRECTS = 3


class RedirectRefused(Exception):
    """The endpoint redirected to another origin: credentials never follow, and neither do we."""


def fetch(url: str, timeout: float) -> str:
    """GET the exposition within ``timeout`` seconds in all: connecting, the headers and the
    body share one deadline (a server that drips a byte every half second is cut off there, not
    at each read's socket timeout). ``user:password@`` in the URL becomes basic auth, sent to
    that origin only: a redirect within it is followed, one to another origin is refused."""
    target = _urls.parse(url)
    headers = {"Accept": "text/plain", "Accept-Encoding": "identity"}
    if target.user is not None:
        secret = f"{target.user}:{target.password or ''}"
        headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
    deadline = time.monotonic() + timeout
    current = target
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _get(current, headers, deadline, timeout)
        if status in (301, 302, 303, 307, 308) and location:
            following = _urls.parse(urllib.parse.urljoin(current.without_credentials(), location))
            if following.origin() != target.origin():
                raise RedirectRefused(f"the endpoint redirected to another origin ({following.shown()}): not followed, "
                                      "credentials are sent to the configured origin only")  # fmt: skip
            current = following
            continue
        if status != 200:
            raise OSError(f"HTTP {status}" + (" (unauthorized: check the credentials)" if status in (401, 403) else ""))
        return body.decode("utf-8", "replace")
    raise OSError(f"more than {MAX_REDIRECTS} redirects")


def _get(url: _urls.Url, headers: dict[str, str], deadline: float, timeout: float) -> tuple[int, str, bytes]:
    """One GET under the shared deadline: past it a timer shuts the socket down, whatever the
    server is doing."""
    import http.client

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"no answer within {timeout:g} s (read timeout)")
    cls = http.client.HTTPSConnection if url.scheme.lower() == "https" else http.client.HTTPConnection
    conn = cls(url.host.strip("[]"), url.port, timeout=remaining)
    fired = threading.Event()
    held: list[socket.socket] = []  # the socket itself: http.client drops its own reference
    # to it once a response that closes the connection is under way, and reads on through a file

    def cut() -> None:
        fired.set()
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(remaining, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()  # bounded by the connection's own timeout: the time left
        if conn.sock is not None:
            held.append(conn.sock)
        if fired.is_set():
            cut()
        target = url.path or "/"
        if url.query:
            target += "?" + url.query
        conn.request("GET", target, headers={**headers, "Host": url.netloc()})
        response = conn.getresponse()
        body = response.read()
        status, location = response.status, response.getheader("Location") or ""
    except (OSError, http.client.HTTPException) as exc:
        if fired.is_set():
            raise TimeoutError(f"no answer within {timeout:g} s (read timeout)") from None
        raise OSError(f"{type(exc).__name__}: {exc}") from None
    finally:
        timer.cancel()
        conn.close()
    if fired.is_set():  # the socket was shut at the deadline: whatever came back is partial
        raise TimeoutError(f"no answer within {timeout:g} s (read timeout)")
    return status, location, body


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
    """What the settings error and logs may show of the URL: the password masked, the port kept."""
    return {"url": _urls.shown(url)}
