"""Host aggregation across processes: forked children start clean, dead processes are archived
with counters preserved, pid reuse is detected, scrapes during churn never go backwards."""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool
from structlog.testing import capture_logs

import telemetry
from telemetry._core import exposition as _exposition
from telemetry._core import multiprocess as _multiprocess
from tests import ROOT

from .. import services

# fork, exit and multiprocess exposition: their behaviour moves with Python and prometheus-client
pytestmark = pytest.mark.matrix("python", "prometheus_client")


def _host(directory: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the host aggregate, as {(name, sorted labels): value}."""
    out = {}
    for family in _exposition.host_registry(directory).collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(host: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lb), v in host.items() if n == name and all((k, w) in lb for k, w in labels.items()))


def _checkouts(url: str, n: int) -> None:
    engine = create_engine(url, poolclass=QueuePool, pool_size=2, max_overflow=2)
    for _ in range(n):
        with engine.connect():
            pass
    engine.dispose()  # closed here, not by a garbage collection in another thread during a fork


def _child_checkouts(url: str, n: int) -> None:
    """In a forked child: a hang dumps every thread's stack and exits (never a hung test run)."""
    faulthandler.dump_traceback_later(20, exit=True)  # exit=True: the watchdog ends with us
    # a thread left by an earlier test may have held stdout's or stderr's buffer lock at the
    # moment of fork; multiprocessing flushes both as the child exits and would wait forever
    # (CPython does not renew those locks in a child): the child gets streams of its own
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the child
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    _checkouts(url, n)


def test_forked_children_start_clean_and_dead_ones_are_archived(tmp_path):
    directory = str(tmp_path / "mp")
    os.mkdir(directory)
    url = f"sqlite:///{tmp_path}/db.sqlite"
    telemetry.instrument(service="worker", multiproc_dir=directory, flush_interval_seconds=0.05)
    _checkouts(url, 3)  # the parent's own, before forking
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_child_checkouts, args=(url, 5), daemon=True) for _ in range(4)]
    try:
        for p in children:
            p.start()
        for p in children:
            p.join(30)
        assert [p.exitcode for p in children] == [0] * 4  # a hung child dumps its threads (stderr)
    finally:
        for p in children:
            if p.is_alive():
                p.kill()
    telemetry.flush()
    host = _host(directory)
    # 3 in the parent + 4 x 5 in children: nothing counted twice, nothing lost at os._exit
    assert _total(host, "db_pool_checkouts_total", result="ok") == 23
    assert _total(host, "db_connection_hold_seconds_count") == 23
    pids = {dict(lb)["pid"] for (n, lb) in host if n == "db_pool_connections_in_use"}
    assert pids == {str(os.getpid())}  # dead children's gauges are gone
    files = {f for f in os.listdir(directory) if f.startswith("telemetry-")}
    assert files == {"telemetry-archive.json", _multiprocess.file_name(*_multiprocess._identity())}
    # a second scrape reads the archive: same totals
    assert _total(_host(directory), "db_pool_checkouts_total", result="ok") == 23


def test_pid_reuse_and_interrupted_merge_are_not_double_counted(tmp_path):
    directory = str(tmp_path)
    telemetry.instrument(service="api", multiproc_dir=directory)
    snap = {"c": [["db_pool_connects_total", [["service", "api"], ["pool", "p"]], 7]], "g": [
        ["db_pool_connections_in_use", [["service", "api"], ["pool", "p"]], 3]], "h": []}
    # same pid as this live process, another start time: a previous process with a reused pid
    stale = os.path.join(directory, _multiprocess.file_name(os.getpid(), "1"))
    with open(stale, "w") as fh:
        json.dump({"pid": os.getpid(), "start": "1", "snap": snap}, fh)
    host = _host(directory)
    assert _total(host, "db_pool_connects_total", pool="p") == 7
    assert _total(host, "db_pool_connections_in_use", pool="p") == 0  # its gauge died with it
    assert not os.path.exists(stale)
    # a crash after the archive was written but before the file was deleted: the file reappears
    with open(os.path.join(directory, _multiprocess.ARCHIVE)) as fh:
        archive = json.load(fh)
    archive["merged"] = [os.path.basename(stale)]
    with open(os.path.join(directory, _multiprocess.ARCHIVE), "w") as fh:
        json.dump(archive, fh)
    with open(stale, "w") as fh:
        json.dump({"pid": os.getpid(), "start": "1", "snap": snap}, fh)
    assert _total(_host(directory), "db_pool_connects_total", pool="p") == 7
    assert not os.path.exists(stale)


def _short_lived(url: str, n: int) -> None:
    _child_checkouts(url, n)


def test_scrapes_during_churn_never_go_backwards(tmp_path):
    directory = str(tmp_path / "mp")
    os.mkdir(directory)
    url = f"sqlite:///{tmp_path}/db.sqlite"
    telemetry.instrument(service="worker", multiproc_dir=directory)
    seen: list[float] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            seen.append(_total(_host(directory), "db_pool_checkouts_total", result="ok"))

    t = threading.Thread(target=scraper)
    t.start()
    ctx = multiprocessing.get_context("fork")
    exits = []
    try:
        for _ in range(12):
            p = ctx.Process(target=_short_lived, args=(url, 2), daemon=True)
            p.start()
            p.join(30)
            exits.append(p.exitcode)
            if p.is_alive():
                p.kill()
    finally:
        stop.set()
        t.join()
    assert exits == [0] * 12  # a hung child dumps its threads (stderr) and exits 1
    final = _total(_host(directory), "db_pool_checkouts_total", result="ok")
    assert final == 24
    assert len(seen) > 5
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False)), seen


def test_bad_directory_fails_at_start_naming_the_setting(tmp_path):
    with pytest.raises(telemetry.ConfigError, match="TELEMETRY_MULTIPROC_DIR.*existing directory"):
        telemetry.instrument(service="api", multiproc_dir=str(tmp_path / "missing"))
    assert not telemetry.is_instrumented()


def test_stock_env_set_too_late_is_reported(tmp_path, monkeypatch):
    """PROMETHEUS_MULTIPROC_DIR set after prometheus_client was imported: said at start-up."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with capture_logs() as logs:
        telemetry.instrument(service="api")
    late = [e for e in logs if e["event"] == "telemetry_multiproc_env_late"]
    assert late and late[0]["setting"] == "PROMETHEUS_MULTIPROC_DIR"


def test_prepare_dir_empties_it(tmp_path):
    (tmp_path / "telemetry-1-2.json").write_text("{}")
    (tmp_path / "counter_1.db").write_text("")
    (tmp_path / "keep.txt").write_text("")
    assert telemetry.prepare_multiproc_dir(str(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["keep.txt"]


@pytest.mark.integration
def test_real_prometheus_scraping_through_worker_churn(tmp_path):
    """A real Prometheus scrapes the host every 500 ms while 60 children live and die: no failed
    scrape, no counter reset, and the final total is every checkout of every child. (At 200 ms the
    scrape timeout is 200 ms too, and a loaded machine failed a scrape on time alone.)"""
    binary = services.binary("prometheus", "prometheus")
    directory = tmp_path / "mp"
    directory.mkdir()
    target, prom = services.free_port(), services.free_port()
    root = ROOT
    (tmp_path / "p.yml").write_text(
        "global: {scrape_interval: 500ms, scrape_timeout: 500ms, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: host\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    server = subprocess.Popen([binary, f"--config.file={tmp_path}/p.yml", f"--storage.tsdb.path={tmp_path}/tsdb",
                               f"--web.listen-address=127.0.0.1:{prom}", "--log.level=warn"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    services.wait_ready(prom, 60)
    api = f"http://127.0.0.1:{prom}/api/v1"
    host = subprocess.Popen([sys.executable, "-m", "tests.apps.churn", str(directory), str(target), "60"], cwd=root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert host.stdout is not None and host.stdin is not None
        assert host.stdout.readline().strip() == "ready"

        def query(q: str) -> list:
            return httpx.get(f"{api}/query", params={"query": q}, timeout=10).json()["data"]["result"]

        deadline = time.monotonic() + 60
        while not [r for r in query("up") if r["value"][1] == "1"]:
            assert time.monotonic() < deadline, "Prometheus never scraped the host"
            time.sleep(0.2)
        host.stdin.write("go\n")
        host.stdin.flush()
        line = host.stdout.readline().strip()
        assert line == "done 300", line
        # until a scrape after the last child died shows every checkout, and enough scrapes were
        # taken to judge (a fixed sleep here flaked on a loaded machine)
        deadline = time.monotonic() + 60
        while True:
            final = query('sum(db_pool_checkouts_total{result="ok"})')
            scrapes = query("count_over_time(up[1m])")
            if final and float(final[0]["value"][1]) == 300 and scrapes and float(scrapes[0]["value"][1]) >= 10:
                break
            assert time.monotonic() < deadline, f"never scraped the final total of 300: {final}, scrapes {scrapes}"
            time.sleep(0.2)
        assert float(query("min_over_time(up[1m])")[0]["value"][1]) == 1  # no failed scrape
        resets = query('resets(db_pool_checkouts_total{result="ok"}[1m])')
        assert resets and all(float(r["value"][1]) == 0 for r in resets)  # never went backwards
    finally:
        if host.stdin is not None:
            host.stdin.close()
        if host.stdout is not None:
            host.stdout.close()
        host.wait(timeout=20)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def test_a_child_forked_during_a_scrape_does_not_keep_the_host_locked(tmp_path):
    """A Celery prefork parent may fork a replacement child while its metrics thread is inside a
    scrape: the child must not inherit the scrape lock, or every later scrape would hang."""
    directory = str(tmp_path)
    telemetry.instrument(service="worker", multiproc_dir=directory)
    r, w = os.pipe()
    with _multiprocess._locked(directory):
        pid = os.fork()
        if pid == 0:  # the child lives on, like a prefork worker waiting for tasks
            os.close(r)
            os.write(w, b"x")
            time.sleep(30)
            os._exit(0)
    try:
        os.read(r, 1)
        done = threading.Event()
        t = threading.Thread(target=lambda: (_host(directory), done.set()), daemon=True)
        t.start()
        assert done.wait(5), "the scrape is blocked by the forked child"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_temporary_file_of_a_process_killed_while_writing_is_removed(tmp_path):
    """A process killed between creating its temporary file and renaming it leaves a .tmp-*
    file; the next scrape removes it (dead writer), and leaves a live writer's alone."""
    from telemetry._core import multiprocess as _multiprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".tmp-{child.pid}-abc123"
    dead.write_text("{")
    alive = tmp_path / f".tmp-{os.getpid()}-def456"
    alive.write_text("{")
    _multiprocess.read_host(str(tmp_path))
    assert not dead.exists()
    assert alive.exists()
    old = time.time() - 2 * _multiprocess.TMP_MAX_AGE_SECONDS
    os.utime(alive, (old, old))  # a live pid's file this old was abandoned (pid reused)
    _multiprocess.read_host(str(tmp_path))
    assert not alive.exists()


def _child_with_own_pool(url: str) -> None:
    engine = create_engine(url, poolclass=QueuePool, pool_size=2, max_overflow=0, pool_logging_name="child-only")
    held = engine.connect()  # still held when the child exits: in use 1 in its last flush
    telemetry.flush()
    held.close()
    telemetry.flush()


def test_a_gone_process_count_gauge_reads_zero_not_absent(tmp_path):
    """A pool only a recycled child had: after the child is gone, the host view still has its
    "in use" series, at 0 and without a pid, so a dashboard tells idle from not reporting; its
    size gauge (not a count of things in flight) is dropped with the process."""
    directory = str(tmp_path / "mp")
    os.mkdir(directory)
    telemetry.instrument(service="worker", multiproc_dir=directory)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_with_own_pool, args=(f"sqlite:///{tmp_path}/db.sqlite",))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    host = _host(directory)
    rows = {dict(lb).get("pid"): v for (n, lb), v in host.items()
            if n == "db_pool_connections_in_use" and ("pool", "child-only") in lb}  # fmt: skip
    assert rows == {"": 0}
    assert not [lb for (n, lb) in host if n == "db_pool_size" and ("pool", "child-only") in lb]
    assert _total(host, "db_pool_checkouts_total", pool="child-only", result="ok") == 1
