"""Two real uvicorn workers behind one /metrics: the host sum and the per-process view."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import ROOT

from .. import services

pytestmark = pytest.mark.matrix("asgi")


def _scrape(port: int) -> list:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


@contextlib.contextmanager
def two_workers(pg, tmp_path, flush_interval: float = 0.1) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """tests/apps/pool_app.py under uvicorn --workers 2, multiprocess mode; yields the port."""
    port = services.free_port()
    env = dict(os.environ, APP_DATABASE_URL=pg.url("asyncpg"), TELEMETRY_MULTIPROC_DIR=str(tmp_path),
               TELEMETRY_FLUSH_INTERVAL_SECONDS=str(flush_interval))  # fmt: skip
    root = ROOT
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.apps.pool_app:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=root, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        services.wait_port(port, 30)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.integration
def test_two_workers_one_metrics_endpoint(pg, tmp_path):
    with two_workers(pg, tmp_path) as port:
        served_by = set()
        for _ in range(40):
            with httpx.Client(timeout=10) as client:  # a new connection each time
                served_by.add(client.get(f"http://127.0.0.1:{port}/work").text)
        deadline = time.monotonic() + 15
        while True:
            samples = _scrape(port)
            ok = sum(s.value for s in samples
                     if s.name == "db_pool_checkouts_total" and s.labels.get("result") == "ok")  # fmt: skip
            pids = {s.labels["pid"] for s in samples if s.name == "db_pool_size"}
            holds = sum(s.value for s in samples if s.name == "db_connection_hold_seconds_count"
                        and s.labels["owner"] == "GET /work")  # fmt: skip
            # a hold is recorded at checkin, which may follow the response: wait for all of them
            # (a loaded CI machine scraped 40 checkouts and 39 holds)
            if (ok >= 40 and holds >= 40 and len(pids) == 2) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # the summed view: every request's checkout, whichever worker served it or /metrics
        assert ok == 40
        assert holds == 40
        # the per-process view: one series per worker, each with its own pool
        assert len(pids) == 2
        assert served_by <= pids
        in_use = {s.labels["pid"]: s.value for s in samples if s.name == "db_pool_connections_in_use"}
        assert set(in_use) == pids and sum(in_use.values()) == 0
        maxes = [s.value for s in samples if s.name == "db_pool_connections_max"]
        assert maxes == [4, 4]


@pytest.mark.integration
def _uvicorn_replaces_dead_workers() -> bool:
    """uvicorn 0.30 and later restart a worker that died; 0.29 runs on with one fewer."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("uvicorn").split(".")[:2])
    return (major, minor) >= (0, 30)


def test_kill_9_of_a_uvicorn_worker(pg, tmp_path):
    """A worker killed with SIGKILL (uvicorn 0.30+ replaces it): the host view drops its gauges
    at the next scrape and its flushed counters stay (nothing goes backwards)."""
    with two_workers(pg, tmp_path) as port:
        pids = set()
        for _ in range(30):
            with httpx.Client(timeout=10) as client:
                pids.add(client.get(f"http://127.0.0.1:{port}/work").text)
        time.sleep(0.5)  # a flush interval
        before = _scrape(port)
        ok_before = sum(s.value for s in before if s.name == "db_pool_checkouts_total" and s.labels["result"] == "ok")
        victim = sorted(pids)[0]
        expected_live = 2 if _uvicorn_replaces_dead_workers() else 1
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                after = _scrape(port)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            live = {s.labels["pid"] for s in after if s.name == "db_pool_size"}
            if victim not in live and len(live) == expected_live:
                break
            time.sleep(0.2)
        assert victim not in live and len(live) == expected_live  # (replaced,) its gauges gone
        ok_after = sum(s.value for s in after if s.name == "db_pool_checkouts_total" and s.labels["result"] == "ok")
        assert ok_after >= ok_before == 30


def _monotonic_series(samples: list) -> dict:
    """Every sample that must never decrease: counters and histogram buckets, counts and sums."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in samples
        if s.name.endswith(("_total", "_bucket", "_count", "_sum"))
    }


@pytest.mark.integration
def test_scrapes_never_go_backwards_whichever_worker_answers(pg, tmp_path):
    """uvicorn --workers 2 under load, scraped every 0.1 s on new connections (so both workers
    answer), with the default 1 s flush: no counter or bucket ever reads less than in an earlier
    scrape. Then the worker that answered a scrape is killed with SIGKILL right after it
    answered: what it showed is not lost either."""
    import threading

    with two_workers(pg, tmp_path, flush_interval=1.0) as port:
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                with httpx.Client(timeout=10) as c:
                    try:
                        while not stop.is_set():
                            c.get(f"http://127.0.0.1:{port}/work")
                    except httpx.HTTPError:
                        continue  # its worker was the one killed: reconnect to the other

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            previous: dict = {}
            decreases: list = []
            answered: set[str] = set()
            killed = None
            for i in range(80):
                with httpx.Client(timeout=10) as c:  # a new connection: any worker may answer
                    try:
                        response = c.get(f"http://127.0.0.1:{port}/metrics")
                    except httpx.HTTPError:
                        continue  # the killed worker's connection
                answered.add(response.headers["x-served-by"])
                if i == 50:  # kill the worker that just answered, before it flushes again
                    killed = response.headers["x-served-by"]
                    os.kill(int(killed), signal.SIGKILL)
                current = _monotonic_series(
                    [s for fam in text_string_to_metric_families(response.text) for s in fam.samples]
                )
                for key, value in current.items():
                    if value < previous.get(key, 0):
                        decreases.append((i, key, previous[key], value))
                previous.update(current)
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert killed is not None and len(answered) >= 2
        ok = [v for k, v in previous.items() if k[0] == "db_pool_checkouts_total" and ("result", "ok") in k[1]]
        assert ok and ok[0] > 50  # the load really ran
        assert decreases == []
