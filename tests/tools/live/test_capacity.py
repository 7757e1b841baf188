"""Capacity advice (``telemetry budget --metrics-url/--prometheus-url``), the arithmetic from
recorded scrapes: Little's law against the measured mean, the busiest process's bursts, the
margin, the pool that was full (its in-use is only its ceiling), the owner to release instead of
growing the pool, the semaphore that caps throughput, the server side against its limit."""

from __future__ import annotations

import math

import pytest

from telemetry.tools.live import capacity
from telemetry.tools.samples import parse
from tests import ROOT


def _page(in_use: dict[str, float], checkouts: float, holds: dict[str, tuple[float, float, dict[str, float]]],
          timeouts: float = 0.0, pending: float = 0.0, extra: str = "") -> str:  # fmt: skip
    """One scrape of a host: two api processes of a 2+2 pool; ``holds``: owner -> (count, sum,
    cumulative buckets)."""
    lines = []
    for pid, v in in_use.items():
        lb = f'service="api",pool="main-db",pid="{pid}"'
        lines += [f"db_pool_connections_in_use{{{lb}}} {v}", f"db_pool_connections_max{{{lb}}} 4",
                  f"db_pool_size{{{lb}}} 2", f"db_pool_pending_requests{{{lb}}} {pending}"]  # fmt: skip
    lines.append(f'db_pool_checkouts_total{{service="api",pool="main-db",result="ok"}} {checkouts}')
    lines.append(f'db_pool_timeouts_total{{service="api",pool="main-db"}} {timeouts}')
    for owner, (count, total, buckets) in holds.items():
        lb = f'service="api",pool="main-db",owner="{owner}"'
        lines += [f'db_connection_hold_seconds_bucket{{{lb},le="{le}"}} {n}' for le, n in buckets.items()]
        lines += [f"db_connection_hold_seconds_count{{{lb}}} {count}", f"db_connection_hold_seconds_sum{{{lb}}} {total}"]
    return "# TYPE db_connection_hold_seconds histogram\n" + "\n".join(lines) + "\n" + extra


def _window(pages: list[str], every: float = 1.0) -> capacity.Window:
    return capacity.from_scrapes([(i * every, parse(p)) for i, p in enumerate(pages)])


def test_little_law_sizes_the_busiest_process_with_the_margin():
    # 10 s, 200 checkouts held 0.1 s each: λ = 20/s, W = 0.1 s, L = 2 busy over 2 processes
    first = _page({"1": 0, "2": 0}, 0, {"GET /a": (0, 0, {"0.25": 0, "+Inf": 0})})
    mid = [_page({"1": 2, "2": 1}, 100, {"GET /a": (100, 10, {"0.25": 100, "+Inf": 100})}) for _ in range(9)]
    last = _page({"1": 2, "2": 1}, 200, {"GET /a": (200, 20, {"0.25": 200, "+Inf": 200})})
    w = _window([first, *mid, last])
    assert w.seconds == 10
    p = capacity.advise(w, margin=0.25).pools[0]
    assert (p.service, p.pool, p.processes) == ("api", "main-db", 2)
    assert p.checkouts_per_second == 20 and p.hold_mean == pytest.approx(0.1)
    assert p.busy_little == pytest.approx(2.0)
    # 11 scrapes, the first at 0: the busiest process's mean is 20/11; Little per process (1.0)
    # times its skew (20/11 over the mean of both, 30/11/2) is 1.33, under it
    assert p.busiest_mean == pytest.approx(20 / 11) and p.busiest_peak == 2 and not p.saturated
    assert p.pool_size == math.ceil(20 / 11 * 1.25) == 3
    assert p.pool_size + p.max_overflow == 3  # its p99 (2) is under the steady size with margin
    assert p.release is None and p.carries  # 2+2 = 4 >= 3


def test_a_full_pool_is_sized_for_its_demand_not_its_ceiling():
    # every process at its 4 connections, callers pending and timing out: the in-use is censored
    first = _page({"1": 4, "2": 4}, 0, {"POST /notes": (0, 0, {"0.25": 0, "1.0": 0, "+Inf": 0})})
    last = _page({"1": 4, "2": 4}, 300, {"POST /notes": (300, 90, {"0.25": 0, "1.0": 300, "+Inf": 300})},
                 timeouts=12, pending=5)  # fmt: skip
    w = _window([first, last], every=10.0)
    a = capacity.advise(w, margin=0.25)
    p = a.pools[0]
    assert p.saturated and p.busy_little == pytest.approx(30 * 0.3)  # 9 busy by Little, 8 measured (the ceiling)
    steady = 9 / 2  # per process (equal skew)
    assert p.pool_size == math.ceil(steady * 1.25)
    assert p.pool_size + p.max_overflow == math.ceil((steady + 3 * math.sqrt(steady)) * 1.25)
    assert not p.carries and not a.carries
    text = "\n".join(capacity.render(a))
    assert f"pool_size={p.pool_size} max_overflow={p.max_overflow} (now 2+2: cannot carry" in text


def test_one_owner_holding_most_of_the_time_is_released_not_pooled():
    # a stream keeps its session ~30 s: 95% of the hold time; the short pages are 5%
    first = _page({"1": 4, "2": 0}, 0, {"GET /stream": (0, 0, {"1.0": 0, "60.0": 0, "+Inf": 0}),
                                        "GET /roadmaps": (0, 0, {"1.0": 0, "60.0": 0, "+Inf": 0})})  # fmt: skip
    last = _page({"1": 4, "2": 0}, 110, {"GET /stream": (10, 285, {"1.0": 0, "60.0": 10, "+Inf": 10}),
                                         "GET /roadmaps": (100, 15, {"1.0": 100, "60.0": 100, "+Inf": 100})})  # fmt: skip
    a = capacity.advise(_window([first, last], every=30.0))
    p = a.pools[0]
    assert p.release is not None and p.release.owner == "GET /stream" and p.release.share == pytest.approx(0.95)
    assert [h.owner for h in p.holders] == ["GET /stream", "GET /roadmaps"]
    assert not p.carries
    text = "\n".join(capacity.render(a))
    assert "release it, do not grow the pool: 'GET /stream' holds 95%" in text


def _service(service: str, processes: int, busy: float, rate: float, hold: float, size: int, overflow: int,
             t: float, pool: str = "main-db", semaphore: tuple[int, float] | None = None, requests: bool = False) -> str:
    """One scrape at ``t`` seconds of a service's ``processes`` processes: each ``busy`` in use of
    ``size + overflow``, ``rate`` checkouts a second (all processes) held ``hold`` s; a semaphore
    (capacity, waiters) per process; request counts when it serves requests."""
    lines = []
    for pid in range(processes):
        lb = f'service="{service}",pool="{pool}",pid="{service}-{pid}"'
        lines += [f"db_pool_connections_in_use{{{lb}}} {busy}", f"db_pool_connections_max{{{lb}}} {size + overflow}",
                  f"db_pool_size{{{lb}}} {size}"]  # fmt: skip
        if semaphore is not None:
            sl = f'service="{service}",semaphore="MAX_DB_CONCURRENT",pid="{service}-{pid}"'
            lines += [f"asyncio_semaphore_capacity{{{sl}}} {semaphore[0]}", f"asyncio_semaphore_in_use{{{sl}}} {semaphore[0]}",
                      f"asyncio_semaphore_waiters{{{sl}}} {semaphore[1]}"]  # fmt: skip
    n = rate * t
    lb = f'service="{service}",pool="{pool}"'
    lines += [f'db_pool_checkouts_total{{{lb},result="ok"}} {n}', f'db_pool_timeouts_total{{{lb}}} 0',
              f'db_connection_hold_seconds_bucket{{{lb},owner="work",le="+Inf"}} {n}',
              f'db_connection_hold_seconds_count{{{lb},owner="work"}} {n}',
              f'db_connection_hold_seconds_sum{{{lb},owner="work"}} {n * hold}']  # fmt: skip
    if requests:
        lines.append(f'http_server_request_duration_seconds_count{{service="{service}",method="GET",route="/r",status="200"}} {n}')
    return "\n".join(lines) + "\n"


def _report_deployment(noise: float = 0.0, seed: int = 0, stack: str = "", api_rate: float = 40.0) -> capacity.Window:
    """The incident report's shape, as the demo measures it: the api (4 processes, 2+2, about 2
    transactions at once), content-worker (6 processes, MAX_DB_CONCURRENT=3 with 27 tasks queued
    behind it, about 12 at once), logs-worker (4 processes, no throttle, about 1), and the Celery
    result backend's own pool in content-worker (idle). ``noise``: each rate and hold scaled by up
    to that fraction, as three runs of one scenario differ."""
    import random

    rnd = random.Random(seed)

    def j(x: float) -> float:
        return x * (1 + rnd.uniform(-noise, noise))

    pages = []
    for t in (0.0, 30.0):
        page = (_service("api", 4, 0.5, j(api_rate), j(0.05), 2, 2, t, requests=True)
                + _service("content-worker", 6, 2.0, j(60.0), j(0.2), 2, 2, t, semaphore=(3, 27))
                + _service("content-worker", 6, 0.0, 0.0, 0.0, 5, 0, t, pool="results.db")
                + _service("logs-worker", 4, 0.25, j(10.0), j(0.1), 2, 2, t) + stack)
        pages.append(page)
    return _window(pages, every=30.0)


def test_the_report_deployment_is_split_within_both_limits():
    """Told the report's pooler (50 server connections, 200 clients): the api's need comes first,
    the throttled content-worker gets the rest per process as its semaphore (never the 38 the
    queue behind it asked for), each pool is sized from its own demand (the result backend's
    idle pool is not raised to the semaphore), and the advice fits both limits."""
    a = capacity.advise(_report_deployment(), 0.25, server=(50, "the report's pooler"), client=(200, "Supavisor clients"))
    lim = a.limits
    shares = {sh.service: sh for sh in lim.shares}
    api, content, logs = shares["api"], shares["content-worker"], shares["logs-worker"]
    assert api.demand == pytest.approx(2.0) and api.share == math.ceil(2 + 3 * math.sqrt(2)) == 7
    assert logs.share == math.ceil(logs.demand) == 1 and logs.semaphore_advised is None
    assert lim.kept_free == 10  # 25% margin: 50 = 40 used at most + 10 free
    assert content.share == 50 - 10 - 7 - 1 == 32 and content.semaphore_advised == 32 // 6 == 5
    assert content.pool_size + content.max_overflow == 5  # the permits it guards, not 38
    assert [s.capacity_needed for s in a.semaphores] == [5]
    results = [o for o in lim.other_pools if o[1] == "results.db"]
    assert results and results[0][3] + results[0][4] <= 1, results  # its own (idle) demand
    assert lim.server_at_advice <= 50 and lim.client_worst <= 200 and lim.fits
    assert lim.binds == "server"
    text = "\n".join(capacity.render(a))
    assert "MAX_DB_CONCURRENT=5 per process (now 3)" in text and "Its excess queues at MAX_DB_CONCURRENT" in text
    assert "the server limit binds" in text and "capacity 38" not in text and "max_overflow=36" not in text


def test_behind_a_pooler_of_12_the_workers_are_told_to_run_fewer_processes():
    """pgbouncer's 12 server connections (the demo's real stack): 3 kept free, the api's 7 and
    logs-worker's 1 first, content-worker's 1 left for 6 processes: one permit, one process."""
    stack = 'pgbouncer_pool_size{database="app"} 12\npgbouncer_max_client_connections 100\n'
    a = capacity.advise(_report_deployment(stack=stack), 0.25)
    lim = a.limits
    assert (lim.server.value, lim.server.source, lim.client.value) == (12, "pgbouncer default_pool_size", 100)
    content = next(sh for sh in lim.shares if sh.service == "content-worker")
    assert content.share == 12 - 3 - 7 - 1 == 1 and content.semaphore_advised == 1 and content.fewer_processes == 1
    text = "\n".join(capacity.render(a))
    assert "run 1 process, not 6" in text and "to need less: shorten 'work'" in text
    assert content.pool_size + content.max_overflow == 1  # its one permit: the pool sized from its own demand
    assert lim.server_at_advice == 7 + 1 + 1 and lim.fits and "does not fit" not in text
    # today: 6 processes x 3 permits + the api's 7 + 1 = 26 concurrent transactions against 12
    assert lim.server_today == 26 and not lim.today_fits and not a.carries


def test_when_the_first_services_alone_exceed_the_limit_it_says_so():
    """The api's demand grows to 4.4 transactions at once (as its wait at a full pooler lengthens
    its holds): with logs-worker it needs 12 of the 9 left of 12 after the margin."""
    stack = 'pgbouncer_pool_size{database="app"} 12\npgbouncer_max_client_connections 100\n'
    a = capacity.advise(_report_deployment(stack=stack, api_rate=88.0), 0.25)
    text = "\n".join(capacity.render(a))
    assert not a.limits.fits and a.limits.server_at_advice > 12
    assert "does not fit: the services that serve requests and the workers without a throttle already need 12 of the 9" in text


def test_the_advice_is_stable_from_run_to_run():
    """Three runs of the same scenario (rates and holds off by up to 10%): the advice within one
    connection per process (or 20%) and the same verdict."""
    runs = [capacity.advise(_report_deployment(0.10, seed), 0.25, server=(50, "pooler"), client=(200, "pooler"))
            for seed in (1, 2, 3)]  # fmt: skip
    for service in ("api", "content-worker", "logs-worker"):
        picks = [next(sh for sh in a.limits.shares if sh.service == service) for a in runs]
        for field in ("semaphore_advised", "pool_size", "max_overflow"):
            values = [getattr(p, field) or 0 for p in picks]
            assert max(values) - min(values) <= max(1, 0.2 * max(values)), (service, field, values)
    assert len({(a.carries, a.limits.fits, a.limits.binds) for a in runs}) == 1


def test_bad_windows_and_margins():
    with pytest.raises(ValueError, match="at least two scrapes"):
        capacity.from_scrapes([(0.0, [])])
    w = _window([_page({"1": 0}, 0, {}), _page({"1": 0}, 0, {})])
    with pytest.raises(ValueError, match="--margin -1: expected a fraction in"):
        capacity.advise(w, margin=-1)


def _steady(pg, *args: str):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from ... import services

    port = services.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.apps.steady", pg.url(), str(port), *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, f"http://127.0.0.1:{port}/metrics"


def _budget(url: str, window: str = "4s", *extra: str) -> tuple[int, str]:
    import io
    from contextlib import redirect_stdout

    from telemetry.tools import cli

    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["budget", "--metrics-url", url, "--window", window, *extra])
    return code, out.getvalue()


def _stop(proc) -> None:  # type: ignore[no-untyped-def]
    proc.stdin.close()
    proc.terminate()
    proc.wait(timeout=20)
    proc.stdout.close()




@pytest.mark.integration
def test_budget_on_a_real_workload_and_its_advice_holds(pg):
    """4 threads each holding a connection 50 ms at a time against a pool of 2+0: the pool is
    full and callers time out; the advice (read from /metrics over 4 s) asks for more and exits 1.
    The same workload on the advised pool carries, and the advice then exits 0."""
    proc, url = _steady(pg, "2", "0", "4", "0.05")
    try:
        code, text = _budget(url)
    finally:
        _stop(proc)
    assert code == 1, text
    line = next(ln for ln in text.splitlines() if ln.startswith("api (pool main-db, 1 process)"))
    assert "cannot carry the measured load" in line and "(now 2+0" in line, text
    size, overflow = (int(x) for x in line.split("pool_size=")[1].split(" (")[0].split(" max_overflow="))
    assert size + overflow >= 4, line  # the 4 threads' demand, hidden behind the full pool
    proc, url = _steady(pg, str(size), str(overflow), "4", "0.05")
    try:
        code, text = _budget(url)
    finally:
        _stop(proc)
    assert code == 0, text
    assert "carries the load" in text and "the current configuration carries the measured load" in text


@pytest.mark.integration
def test_budget_names_the_holder_to_release_on_a_real_workload(pg):
    """Two threads serving streams of 2 s, each keeping a connection for its life, one thread of
    short work, a pool of 2+1 (full): growing it is not the answer; the stream's owner is named
    (hold threshold 0.5 s for the test, the rule's 5 s by default)."""
    proc, url = _steady(pg, "2", "1", "1", "0.05", "2")
    try:
        code, text = _budget(url, "7s", "--hold-threshold", "0.5")
    finally:
        _stop(proc)
    assert code == 1, text
    assert "release it, do not grow the pool: 'GET /stream' holds" in text, text


def test_a_full_pool_the_load_needs_no_more_of_is_not_resized():
    """Full at moments (a blocked event loop stretching holds), yet the measured load needs fewer
    connections than it has: no shrinking advice called "cannot carry", no re-run with sizes."""
    from telemetry.tools.demo import advice as demo_advice

    first = _page({"1": 0, "2": 0}, 0, {"GET /roadmaps": (0, 0, {"0.25": 0, "+Inf": 0})})
    full = _page({"1": 4, "2": 0}, 50, {"GET /roadmaps": (50, 2, {"0.25": 50, "+Inf": 50})}, timeouts=3)
    idle = [_page({"1": 0, "2": 0}, 50, {"GET /roadmaps": (50, 2, {"0.25": 50, "+Inf": 50})}, timeouts=3) for _ in range(8)]
    a = capacity.advise(_window([first, full, *idle], every=1.0))
    p = a.pools[0]
    assert p.saturated and not p.grow and not p.carries and p.release is None
    assert "size is not the answer" in "\n".join(capacity.render(a))
    assert demo_advice.overrides(a) == {}


def test_the_report_plans_are_judged_against_both_limits():
    """Plan 1 (the demo's ``fixed``): 160 client connections fit the pooler's 200; up to 152
    concurrent transactions do not fit its ~50 server connections; nor do the seed's 77 (the
    incident)."""
    from telemetry.tools.demo import advice as demo_advice
    from telemetry.tools.demo.scenarios import _PLAN1, SEED

    a = capacity.advise(_report_deployment(), 0.25, server=demo_advice.REPORT_LIMITS[0], client=demo_advice.REPORT_LIMITS[1])
    rows = {r["plan"]: r for r in demo_advice.judge_plans(a, {"fixed": _PLAN1, "seed": {}}, SEED)}
    fixed, seed = rows["fixed"], rows["seed"]
    assert (fixed["clients"], fixed["concurrent"]) == (160, 20 + 4 * 8 + 5 * 10 + 5 * 10) and not fixed["fits"]
    assert "160 client connections of 200: fits" in fixed["verdict"] and "152 concurrent transactions of 50" in fixed["verdict"]
    assert seed["clients"] == (4 + 7 + 5 + 5) * 4 == 84 and seed["concurrent"] == 16 + 7 * 3 + 20 + 20 and not seed["fits"]
    # the knobs the demo re-runs with where today's configuration does not fit (pgbouncer's 12):
    # the semaphore from the share, the pool holding its one permit
    stack = 'pgbouncer_pool_size{database="app"} 12\npgbouncer_max_client_connections 100\n'
    over = demo_advice.overrides(capacity.advise(_report_deployment(stack=stack), 0.25))
    assert over["content-worker"] == {"MAX_DB_CONCURRENT": "1", "DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0",
                                      "CELERY_CONTENT_CONCURRENCY": "1"}, over  # and one process: its share


def test_the_alerts_the_advice_proof_reads_are_shipped_ones():
    """A proof that reads an alert no rule defines can never see it fire: every name it reads is
    one of the shipped rules."""
    from telemetry.tools.demo import advice as demo_advice
    from telemetry.tools.deploy.alert_specs import build_alerts
    from telemetry.tools.deploy.rules import RulesConfig

    shipped = {a.name for a in build_alerts(RulesConfig())}
    assert set(demo_advice.POOL_ALERTS) | set(demo_advice.QUEUE_ALERTS) <= shipped
