"""``telemetry diagnose`` on what hosts' ``/metrics`` really serve (over HTTP on loopback): owners
known only on their own host are summed across hosts, an empty or foreign page and a sample
without the labels it needs are said in a sentence with exit 2, and findings have their own
exit code (0 nothing found, 1 findings)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from telemetry.tools import cli
from telemetry.tools.live import diagnose

from ... import http_stub


@pytest.fixture
def serve() -> Iterator[list[str]]:
    """A loopback HTTP server: ``_url(serve, body)`` gives a /metrics URL answering ``body``."""
    bodies: list[str] = []
    with http_stub.serving(lambda path, _headers: (200, bodies[int(path.strip("/").split("/")[0])])) as port:
        bodies.append(f"http://127.0.0.1:{port}")  # bodies[0] is the base URL
        yield bodies


def _url(bodies: list[str], body: str) -> str:
    bodies.append(body)
    return f"{bodies[0]}/{len(bodies) - 1}/metrics"


def _host(n: int) -> str:
    return (
        'db_server_oldest_idle_in_transaction_seconds{application="api"} 12.5\n'
        f'db_server_connections_by_owner{{service="api",owner="/export",state="idle in transaction"}} {n}\n'
        'db_server_connections_max 97\n'
    )


def test_owners_known_on_each_host_are_summed_across_hosts(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    urls = [_url(serve, _host(2)), _url(serve, _host(3))]
    rc = cli.main(["diagnose", "--window", "1s", *(a for u in urls for a in ("--metrics-url", u))])
    out = capsys.readouterr().out
    idle = [line for line in out.splitlines() if line.startswith("- Idle in transaction")]
    assert len(idle) == 1 and "api '/export' (5)" in idle[0], out
    assert rc == diagnose.EXIT_FINDINGS == 1


def test_the_same_host_read_twice_is_not_counted_twice() -> None:
    samples = diagnose.parse(_host(2))
    twice = [(n, {**lb, "instance": f"10.0.0.5:{port}"}, v) for port in (9464, 9465) for n, lb, v in samples]
    assert diagnose._owners(twice, "idle in transaction") == {("api", "/export"): 2}


def test_an_empty_or_foreign_page_is_no_telemetry(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    for body in ("", "# HELP go_goroutines Goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines 8\n"):
        assert cli.main(["diagnose", "--window", "1s", "--metrics-url", _url(serve, body)]) == diagnose.EXIT_UNREADABLE == 2
        err = capsys.readouterr().err
        assert "no telemetry metrics found at http://127.0.0.1:" in err and "Traceback" not in err


def test_a_sample_without_its_labels_is_a_sentence_not_a_traceback(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(serve, "db_pool_connections_in_use 3\ndb_pool_connections_max 4\n")
    assert cli.main(["diagnose", "--window", "1s", "--metrics-url", url]) == 2
    err = capsys.readouterr().err
    assert "lacks the label 'service'" in err and "Traceback" not in err


def test_nothing_found_exits_zero(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(serve, 'db_pool_connections_in_use{service="api",pool="p",pid="1"} 1\n'
                      'db_pool_connections_max{service="api",pool="p",pid="1"} 10\n')  # fmt: skip
    assert cli.main(["diagnose", "--window", "1s", "--metrics-url", url]) == diagnose.EXIT_HEALTHY == 0
    assert "nothing saturated" in capsys.readouterr().out


_FULL_POOL = """# TYPE db_connection_hold_seconds histogram
db_pool_connections_in_use{service="api",pool="main-db",pid="1"} 4
db_pool_connections_max{service="api",pool="main-db",pid="1"} 4
db_pool_connections_held_too_long{service="api",pool="main-db",pid="1"} 3
db_connection_hold_seconds_bucket{service="api",pool="main-db",owner="GET /stream",le="1.0"} 0
db_connection_hold_seconds_bucket{service="api",pool="main-db",owner="GET /stream",le="60.0"} 10
db_connection_hold_seconds_bucket{service="api",pool="main-db",owner="GET /stream",le="+Inf"} 10
db_connection_hold_seconds_sum{service="api",pool="main-db",owner="GET /stream"} 285
db_connection_hold_seconds_count{service="api",pool="main-db",owner="GET /stream"} 10
db_connection_hold_seconds_bucket{service="api",pool="main-db",owner="POST /notes",le="1.0"} 100
db_connection_hold_seconds_bucket{service="api",pool="main-db",owner="POST /notes",le="60.0"} 100
db_connection_hold_seconds_bucket{service="api",pool="main-db",owner="POST /notes",le="+Inf"} 100
db_connection_hold_seconds_sum{service="api",pool="main-db",owner="POST /notes"} 15
db_connection_hold_seconds_count{service="api",pool="main-db",owner="POST /notes"} 100
"""


def test_a_full_pool_names_its_holders_and_the_one_to_release(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The pool finding names the top owners by hold time, their p95, the connections held past
    the threshold, and "release it" when one owner holds most of the time for long."""
    assert cli.main(["diagnose", "--window", "1s", "--metrics-url", _url(serve, _FULL_POOL)]) == diagnose.EXIT_FINDINGS
    out = capsys.readouterr().out
    pool = next(line for line in out.splitlines() if line.startswith("- Pool: the busiest api process has 100%"))
    assert "Held by 'GET /stream' 95% (p95 57.05 s), 'POST /notes' 5% (p95 0.95 s) of the hold time" in pool, pool
    assert "3 connections held past the hold threshold at the peak" in pool
    assert "'GET /stream' holds most of the time, p95 over 10 s: release it" in pool
    # short holds only: named, nothing to release
    short = _FULL_POOL.replace('owner="GET /stream",le="1.0"} 0', 'owner="GET /stream",le="1.0"} 10')
    assert cli.main(["diagnose", "--window", "1s", "--metrics-url", _url(serve, short)]) == diagnose.EXIT_FINDINGS
    assert "release it" not in capsys.readouterr().out


def test_findings_are_typed_records_the_report_selects_by_kind() -> None:
    """The demo's report reads the findings by kind and service, never by their text: a Redis
    pool that only ran full is not severe, and a finding's body drops its label."""
    from telemetry.tools.demo import report

    redis = ('redis_pool_connections_in_use{service="api",pool="r",pid="1"} 2\n'
             'redis_pool_connections_max{service="api",pool="r",pid="1"} 2\n')  # fmt: skip
    found = diagnose.beyond_the_pools(diagnose.parse(redis))
    assert [(f.kind, f.service, f.severe) for f in found] == [("redis", "api", False)]
    assert found[0].body.startswith("pool r of api at 100%")
    failing = redis + 'redis_pool_checkouts_total{service="api",pool="r",result="timeout"} 3\n'
    assert diagnose.beyond_the_pools(diagnose.parse(failing))[0].severe
    r = {"api": {"share_waiting_for_pool": 0.1}, "hold_seconds_by_owner": {}, "hold_p95_seconds_by_owner": {},
         "blocking_call_site": None, "event_loop_blocked": 0, "pool_usage_peak": {}, "pooler_clients_waiting_peak": 0,
         "findings": [{"kind": "redis", "text": "Redis: x", "body": "x", "service": "api", "severe": True},
                      {"kind": "server_wait", "text": "Server connections: y", "body": "y", "service": "api", "severe": True}]}  # fmt: skip
    said = report.diagnose(r)
    assert said.startswith("Redis: x The shared limit was reached at the pooler or the server: y"), said
    r["findings"][0]["severe"] = False
    assert not report.diagnose(r).startswith("Redis")



def _hold_page(fast: int, slow: int, in_use: int = 4) -> str:
    """A page of one full pool whose holds ended so far: ``fast`` of 0.01 s by 'POST /notes',
    ``slow`` of 20 s by 'GET /export'."""
    rows = [f'db_pool_connections_in_use{{service="api",pool="main-db",pid="1"}} {in_use}',
            'db_pool_connections_max{service="api",pool="main-db",pid="1"} 4']
    for owner, n, each, le in (("POST /notes", fast, 0.01, "0.025"), ("GET /export", slow, 20.0, "30.0")):
        for bound in ("0.025", "30.0", "+Inf"):
            count = n if float(bound.replace("+Inf", "inf")) >= float(le) else 0
            rows.append(f'db_connection_hold_seconds_bucket{{service="api",pool="main-db",owner="{owner}",le="{bound}"}} {count}')
        rows.append(f'db_connection_hold_seconds_sum{{service="api",pool="main-db",owner="{owner}"}} {n * each}')
        rows.append(f'db_connection_hold_seconds_count{{service="api",pool="main-db",owner="{owner}"}} {n}')
    return "# TYPE db_connection_hold_seconds histogram\n" + "\n".join(rows) + "\n"


def test_the_window_reads_the_episode_not_the_process_life(capsys: pytest.CaptureFixture[str]) -> None:
    """A warm API: 100,000 fast holds before the window, 10 long holds by 'GET /export' in it.
    Read since start, 'POST /notes' holds 5% of the time; in the window, 'GET /export' holds it all."""
    reads: list[str] = []
    before, after = _hold_page(100_000, 0), _hold_page(100_000, 10)

    def answer(_path: str, _headers: object) -> tuple[int, str]:
        reads.append("read")
        return 200, before if len(reads) == 1 else after

    with http_stub.serving(answer) as port:
        rc = cli.main(["diagnose", "--window", "2s", "--metrics-url", f"http://127.0.0.1:{port}/metrics"])
    out = capsys.readouterr().out
    assert rc == diagnose.EXIT_FINDINGS and len(reads) >= 2, (rc, reads)
    assert "over a 2 s window" in out.splitlines()[0], out
    pool = next(line for line in out.splitlines() if line.startswith("- Pool: the busiest api"))
    assert "Held by 'GET /export' 100%" in pool and "POST /notes" not in pool, pool


def test_a_page_where_nothing_moved_is_read_as_totals_and_says_so(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["diagnose", "--window", "1s", "--metrics-url", _url(serve, _hold_page(100, 10))])
    out = capsys.readouterr().out
    assert rc == diagnose.EXIT_FINDINGS
    assert "nothing moved in the 1 s window" in out.splitlines()[0] and "totals since each process started" in out, out
    assert "Held by 'GET /export'" in out, out


def test_one_unreadable_host_is_reported_and_the_others_diagnosed(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from telemetry.tools._proc import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}/metrics"  # nothing listens there
    rc = cli.main(["diagnose", "--window", "1s", "--metrics-url", _url(serve, _hold_page(100, 10)), "--metrics-url", dead])
    out = capsys.readouterr().out
    assert rc == diagnose.EXIT_FINDINGS, out
    assert f"- unreadable: {dead}:" in out and "the other hosts are diagnosed without it" in out, out
    assert "- Pool: the busiest api" in out, out
    # nothing found on the readable host: the unreadable one still fails the run (exit 2)
    quiet = _url(serve, 'db_pool_connections_in_use{service="api",pool="p",pid="1"} 1\n'
                        'db_pool_connections_max{service="api",pool="p",pid="1"} 10\n')  # fmt: skip
    assert cli.main(["diagnose", "--window", "1s", "--metrics-url", quiet, "--metrics-url", dead]) == diagnose.EXIT_UNREADABLE
    assert cli.main(["diagnose", "--window", "1s", "--metrics-url", dead]) == diagnose.EXIT_UNREADABLE
    assert dead in capsys.readouterr().err


def test_a_password_in_a_metrics_url_is_never_printed(serve: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from telemetry.tools._proc import free_ports

    secret = "s3cr?t#p@ss"
    dead = f"http://scraper:{secret.replace('?', '%3F').replace('#', '%23').replace('@', '%40')}@127.0.0.1:{free_ports(1)[0]}/metrics"
    rc = cli.main(["diagnose", "--window", "1s", "--metrics-url", _url(serve, _hold_page(100, 10)), "--metrics-url", dead])
    captured = capsys.readouterr()
    assert rc == diagnose.EXIT_FINDINGS and "- unreadable:" in captured.out, captured.out
    for piece in ("s3cr", "p%40ss", "p@ss", "%3Ft"):
        assert piece not in captured.out + captured.err, (piece, captured.out)


def _ranked_page(lock_seconds: float) -> str:
    """api's pool full with 2 s of checkout wait; worker's transactions blocked on a lock, 3
    waiters, the longest ``lock_seconds``."""
    return (
        'db_pool_connections_in_use{service="api",pool="p",pid="1"} 5\n'
        'db_pool_connections_max{service="api",pool="p",pid="1"} 5\n'
        'db_pool_checkout_wait_seconds_bucket{service="api",pool="p",le="+Inf"} 20\n'
        'db_pool_checkout_wait_seconds_sum{service="api",pool="p"} 2\n'
        'db_pool_checkout_wait_seconds_count{service="api",pool="p"} 20\n'
        'db_server_lock_blocking{blocker_service="worker",blocker_owner="export",blocked_service="worker",'
        'blocked_owner="save"} 3\n'
        'db_server_lock_waiting{application="worker"} 3\n'
        f"db_server_lock_wait_longest_seconds {lock_seconds}\n"
    )


def test_the_finding_that_explains_most_of_the_waiting_comes_first() -> None:
    """One ranking (issue 33): 3 lock waiters of 10 s (30 s of waiting) before a pool whose callers
    waited 2 s; 3 waiters of 0.1 s (0.3 s) after it. The same findings either way."""
    long_locks = [f.kind for f in diagnose.all_findings(diagnose.parse(_ranked_page(10.0)))]
    short_locks = [f.kind for f in diagnose.all_findings(diagnose.parse(_ranked_page(0.1)))]
    assert long_locks == ["locks", "pool"], long_locks
    assert short_locks == ["pool", "locks"], short_locks
