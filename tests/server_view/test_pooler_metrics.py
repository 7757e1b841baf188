"""The pooler's own metrics when they are readable (no console): a Prometheus-format endpoint,
behind basic auth as Supabase's Metrics API is, mapped into the pooler view. The expositions
are written from each project's documentation (prometheus-community pgbouncer_exporter,
Supavisor, PgCat, Neon): none of these poolers runs here. The credentials never reach a log."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

import telemetry
from telemetry.server_view import pooler_metrics as _pooler_metrics
from telemetry.testing import capture_events

from .. import hostview, http_stub

_host, _value, _wait_for = hostview.host, hostview.value, hostview.wait_for

PGBOUNCER_EXPORTER = """\
# HELP pgbouncer_pools_client_active_connections Client connections linked to server connection
# TYPE pgbouncer_pools_client_active_connections gauge
pgbouncer_pools_client_active_connections{database="postgres",user="app"} 4
# TYPE pgbouncer_pools_client_waiting_connections gauge
pgbouncer_pools_client_waiting_connections{database="postgres",user="app"} 22
# TYPE pgbouncer_pools_client_maxwait_seconds gauge
pgbouncer_pools_client_maxwait_seconds{database="postgres",user="app"} 2.5
# TYPE pgbouncer_pools_server_active_connections gauge
pgbouncer_pools_server_active_connections{database="postgres",user="app"} 4
# TYPE pgbouncer_pools_server_idle_connections gauge
pgbouncer_pools_server_idle_connections{database="postgres",user="app"} 0
# TYPE pgbouncer_stats_client_wait_seconds_total counter
pgbouncer_stats_client_wait_seconds_total{database="postgres"} 96.5
# TYPE pgbouncer_stats_sql_transactions_pooled_total counter
pgbouncer_stats_sql_transactions_pooled_total{database="postgres"} 1234
# TYPE pgbouncer_databases_pool_size gauge
pgbouncer_databases_pool_size{name="postgres",host="db",port="5432",database="postgres"} 4
"""
SUPAVISOR = """\
# TYPE supavisor_pool_checkout_duration_local histogram
supavisor_pool_checkout_duration_local_bucket{tenant="dev_tenant",user="postgres",mode="transaction",le="1.0"} 2
supavisor_pool_checkout_duration_local_bucket{tenant="dev_tenant",user="postgres",mode="transaction",le="+Inf"} 10
supavisor_pool_checkout_duration_local_sum{tenant="dev_tenant",user="postgres",mode="transaction"} 1500.0
supavisor_pool_checkout_duration_local_count{tenant="dev_tenant",user="postgres",mode="transaction"} 10
# TYPE supavisor_connections_active gauge
supavisor_connections_active{tenant="dev_tenant"} 12
"""
PGCAT = """\
# TYPE pgcat_pools_cl_waiting gauge
pgcat_pools_cl_waiting{host="db",shard="0",pool="app",user="app"} 3
# TYPE pgcat_pools_cl_active gauge
pgcat_pools_cl_active{host="db",shard="0",pool="app",user="app"} 5
# TYPE pgcat_pools_maxwait gauge
pgcat_pools_maxwait{host="db",shard="0",pool="app",user="app"} 1
# TYPE pgcat_pools_maxwait_us gauge
pgcat_pools_maxwait_us{host="db",shard="0",pool="app",user="app"} 500000
"""
NEON = """\
# TYPE neon_pgbouncer_pools_client_waiting_connections gauge
neon_pgbouncer_pools_client_waiting_connections{database="neondb",user="owner"} 7
"""


@pytest.fixture
def endpoint() -> Iterator[dict]:
    """A loopback endpoint requiring basic auth service_role:s3cret; ``state["body"]`` is served."""
    state: dict = {"body": ""}
    expected = "Basic " + base64.b64encode(b"service_role:s3cret").decode()

    def answer(_path: str, headers: object) -> tuple[int, str]:
        return (200, state["body"]) if headers.get("Authorization") == expected else (401, "")  # type: ignore[attr-defined]

    with http_stub.serving(answer) as port:
        state["port"] = port
        yield state


def test_pgbouncer_exporter_families_feed_the_pooler_view(endpoint: dict) -> None:
    endpoint["body"] = PGBOUNCER_EXPORTER
    telemetry.instrument(service="api", shared_view_interval_seconds=0.2,
                         pooler_metrics_url=f"http://service_role:s3cret@127.0.0.1:{endpoint['port']}/customer/v1/privileged/metrics")  # fmt: skip
    assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1)
    host = _host(None)
    assert _value(host, "pgbouncer_clients", database="postgres", state="waiting") == 22
    assert _value(host, "pgbouncer_clients", database="postgres", state="active") == 4
    assert _value(host, "pgbouncer_client_maxwait_seconds", database="postgres") == 2.5
    assert _value(host, "pgbouncer_servers", database="postgres", state="active") == 4
    assert _value(host, "pgbouncer_client_wait_seconds_total", database="postgres") == 96.5
    assert _value(host, "pgbouncer_transactions_total", database="postgres") == 1234
    assert _value(host, "pgbouncer_pool_size", database="postgres") == 4


@pytest.mark.parametrize("body, expected", [
    (SUPAVISOR, [("pgbouncer_client_wait_seconds_total", {"database": "dev_tenant"}, 1.5)]),
    (PGCAT, [("pgbouncer_clients", {"database": "app", "state": "waiting"}, 3),
             ("pgbouncer_clients", {"database": "app", "state": "active"}, 5),
             ("pgbouncer_client_maxwait_seconds", {"database": "app"}, 1.5)]),
    (NEON, [("pgbouncer_clients", {"database": "neondb", "state": "waiting"}, 7)]),
])  # fmt: skip
def test_supavisor_pgcat_and_neon_families(body: str, expected: list) -> None:
    out, understood = _pooler_metrics.samples(body)
    got = {(n, frozenset(dict(lb).items())): v for n, lb, v in out}
    assert understood >= 1
    for name, labels, value in expected:
        matches = [v for (n, lb), v in got.items() if n == name and set(labels.items()) <= lb]
        assert matches == [value], (name, labels, got)


def test_wrong_credentials_and_foreign_pages_fail_the_view_without_showing_the_secret(endpoint: dict) -> None:
    endpoint["body"] = "# TYPE go_goroutines gauge\ngo_goroutines 8\n"
    with capture_events("telemetry_shared_view_failed") as events:
        telemetry.instrument(service="api", shared_view_interval_seconds=0.2,
                             pooler_metrics_url=f"http://service_role:wrong@127.0.0.1:{endpoint['port']}/metrics")  # fmt: skip
        assert _wait_for(lambda: (_value(_host(None), "pgbouncer_view_errors_total", reason="auth") or 0) >= 2)
    telemetry.uninstrument()
    assert "wrong" not in json.dumps(events) and events and events[0]["reason"] == "auth"
    telemetry.instrument(service="api", shared_view_interval_seconds=0.2,
                         pooler_metrics_url=f"http://service_role:s3cret@127.0.0.1:{endpoint['port']}/metrics")  # fmt: skip
    assert _wait_for(lambda: (_value(_host(None), "pgbouncer_view_errors_total", reason="not_found") or 0) >= 2)
    assert _value(_host(None), "pgbouncer_view_up") == 0


def test_a_bad_url_is_refused_at_start_up() -> None:
    with pytest.raises(telemetry.ConfigError) as info:
        telemetry.instrument(service="api", pooler_metrics_url="ftp://user:hunter2@host/metrics")
    assert "pooler_metrics_url" in str(info.value) and "hunter2" not in str(info.value)


SPECIAL = ["/", "?", "#", "@", "%", ":"]


@pytest.mark.parametrize("char", SPECIAL)
def test_a_password_with_any_character_authenticates_and_never_reaches_a_log(char: str) -> None:
    """The password as typed in the URL, holding any of ``/ ? # @ % :``: the endpoint receives
    it whole in basic auth; with the endpoint refusing it, the log shows the URL with its port
    and without any piece of the password."""
    password = f"eyJhbGci{char}OiJIUzI1{char}NiJ9"
    expected = "Basic " + base64.b64encode(f"service_role:{password}".encode()).decode()
    state = {"accept": True, "seen": []}

    def answer(_path: str, headers: object) -> tuple[int, str]:
        got = headers.get("Authorization")  # type: ignore[attr-defined]
        state["seen"].append(got)
        return (200, PGBOUNCER_EXPORTER) if state["accept"] and got == expected else (401, "")

    with http_stub.serving(answer) as port:
        url = f"http://service_role:{password}@127.0.0.1:{port}/metrics"
        telemetry.instrument(service="api", shared_view_interval_seconds=0.2, pooler_metrics_url=url)
        assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1), state["seen"][:3]
        telemetry.uninstrument()
        state["accept"] = False
        with capture_events("telemetry_shared_view_failed") as events:
            telemetry.instrument(service="api", shared_view_interval_seconds=0.2, pooler_metrics_url=url)
            assert _wait_for(lambda: (_value(_host(None), "pgbouncer_view_errors_total", reason="auth") or 0) >= 1)
    assert events and events[0]["url"] == f"http://service_role:***@127.0.0.1:{port}/metrics", events
    logged = json.dumps(events)
    for piece in ("eyJhbGci", "OiJIUzI1", "NiJ9", password):
        assert piece not in logged, logged


def test_credentials_never_follow_a_redirect_to_another_origin() -> None:
    """A 302 to another port: the other origin never receives a request, let alone the
    credentials; the view fails, named, and the log shows no secret. A redirect within the
    origin is followed with them."""
    elsewhere: list = []

    def other(_path: str, headers: object) -> tuple[int, str]:
        elsewhere.append(headers.get("Authorization"))  # type: ignore[attr-defined]
        return 200, PGBOUNCER_EXPORTER

    with http_stub.serving(other) as other_port:
        target = {"location": f"http://127.0.0.1:{other_port}/metrics"}

        def redirecting(path: str, headers: object) -> tuple[int, str]:
            if path == "/metrics":
                auth = headers.get("Authorization")  # type: ignore[attr-defined]
                return (200, PGBOUNCER_EXPORTER) if auth else (401, "")
            return 302, target["location"]

        with http_stub.serving(redirecting) as port:
            url = f"http://service_role:TopSecretKey@127.0.0.1:{port}/old"
            with capture_events("telemetry_shared_view_failed") as events:
                telemetry.instrument(service="api", shared_view_interval_seconds=0.2, pooler_metrics_url=url)
                assert _wait_for(lambda: (_value(_host(None), "pgbouncer_view_errors_total", reason="redirect") or 0) >= 3)
            telemetry.uninstrument()
            assert elsewhere == []
            assert events and "another origin" in events[0]["error"] and "TopSecretKey" not in json.dumps(events)
            target["location"] = "/metrics"  # within the origin: followed, with the credentials
            telemetry.instrument(service="api", shared_view_interval_seconds=0.2, pooler_metrics_url=url)
            assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1)
    assert elsewhere == []


def test_a_dripping_endpoint_times_out_as_a_whole_before_and_after_a_healthy_phase(pg) -> None:
    """An endpoint that sends a byte every 0.5 s never trips a per-read timeout: the whole read
    has one deadline. Dripping from the start, then healthy, then dripping again: the pooler side
    reads up 0 with reason timeout while it drips, up 1 while healthy, and the server view polls
    all along."""
    with http_stub.switchable(lambda _p, _h: (200, PGBOUNCER_EXPORTER)) as (port, state):
        state["drip"] = True
        telemetry.instrument(service="api", shared_view_interval_seconds=0.2, shared_view_timeout_seconds=1,
                             server_view_url=pg.url(), pooler_metrics_url=f"http://127.0.0.1:{port}/metrics")  # fmt: skip

        def timeouts() -> float:
            return _value(_host(None), "pgbouncer_view_errors_total", reason="timeout") or 0

        def server_polls() -> float:
            return _value(_host(None), "db_server_view_polls_total") or 0

        assert _wait_for(lambda: timeouts() >= 2, timeout=30)
        assert _value(_host(None), "pgbouncer_view_up") == 0
        assert _value(_host(None), "db_server_view_up") == 1
        state["drip"] = False
        assert _wait_for(lambda: _value(_host(None), "pgbouncer_view_up") == 1, timeout=30)
        before, polls = timeouts(), server_polls()
        state["drip"] = True
        assert _wait_for(lambda: timeouts() >= before + 2, timeout=30)
        assert _value(_host(None), "pgbouncer_view_up") == 0
        assert server_polls() >= polls + 2  # the server view kept polling through the drip
        assert (_value(_host(None), "db_server_view_age_seconds") or 0) < 3
