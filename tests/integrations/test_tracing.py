"""Tracing set-up in fresh processes (the global provider is once per process): spans to a dead
collector are counted as failed or dropped and never slow the caller; no endpoint means no
exporter; a forked child gets a new service.instance.id; bad OTEL_* values are refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from .. import services

pytestmark = pytest.mark.matrix("tracing")

SCRIPT = r"""
import json, os, time
import telemetry
from telemetry._core import stats as _stats
from telemetry.integrations import tracing as _tracing
from opentelemetry import trace
telemetry.instrument(service="api")
tracer = trace.get_tracer("t")
t0 = time.perf_counter()
for i in range(200):
    with tracer.start_as_current_span("s"):
        pass
elapsed = time.perf_counter() - t0
_tracing.flush(3)
counts = {lb[1][1]: v for n, lb, v in _stats.iter_samples() if n == "telemetry_spans_total"}
parent = _tracing.instance_id()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, (_tracing.instance_id() or "").encode()); os._exit(0)
os.waitpid(pid, 0)
child = os.read(r, 100).decode()
processors = trace.get_tracer_provider()._active_span_processor._span_processors
exporting = [p for p in processors if type(p).__name__ != "CallsProcessor"]  # ours notes CLIENT spans only
print(json.dumps({"counts": counts, "elapsed": elapsed, "parent": parent, "child": child,
                  "processors": len(exporting)}))
"""


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dead_collector_spans_counted_not_lost_silently():
    port = services.free_port()  # nothing listens there
    res = _run({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_MAX_QUEUE_SIZE": "20",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})  # fmt: skip
    counts = res["counts"]
    assert counts.get("exported", 0) == 0
    assert counts.get("dropped", 0) > 0 and counts.get("failed", 0) > 0
    # every span is accounted for, up to the few still queued when the flush gave up; "dropped"
    # is read at enqueue and can over-count by the spans an export took at that same instant
    assert 200 - 20 <= counts["dropped"] + counts["failed"] <= 200 + 10
    assert res["elapsed"] < 1.0  # 200 spans: the dead endpoint never blocked the caller
    assert res["parent"] and res["child"] and res["parent"] != res["child"]


def test_no_endpoint_means_no_exporter():
    res = _run({})
    assert res["processors"] == 0 and res["counts"] == {}


def test_bad_exporter_setting_is_refused():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_EXPORTER"] = "zipkin"
    out = subprocess.run([sys.executable, "-c", "import telemetry; telemetry.instrument(service='a')"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode != 0
    assert "OTEL_TRACES_EXPORTER='zipkin': expected one of otlp, console, none" in out.stderr



EXIT_SCRIPT = r"""
import os, sys
import telemetry
from opentelemetry import trace
telemetry.instrument(service="api", sqlalchemy=False, multiproc_dir=sys.argv[1])
with trace.get_tracer("t").start_as_current_span("last"):
    pass
print("exiting", flush=True)
"""


@pytest.mark.parametrize("endpoint", ["refusing", "black-hole"])
def test_exit_is_not_held_up_by_an_unreachable_endpoint(endpoint, tmp_path):
    """A process whose OTLP endpoint refuses, or accepts and never answers, still exits: the
    last export is left behind after the exit bound, counted in the process file and logged.
    (The time it takes is measured by benchmarks/exit_time.py; here the bound is shown to act.)"""
    from telemetry._core import exposition as _exposition

    if endpoint == "refusing":
        port = services.free_port()  # nothing listens there
        hole = None
    else:
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # the kernel accepts into the backlog; nobody ever answers
        port = hole.getsockname()[1]
    directory = tmp_path / "mp"
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_METRICS_EXPORTER="otlp")
    try:
        out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(directory)], capture_output=True,
                             text=True, env=env, timeout=60)  # fmt: skip
    finally:
        if hole is not None:
            hole.close()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exiting" in out.stdout
    logged = out.stdout + out.stderr
    host = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in _exposition.host_registry(str(directory)).collect() for s in fam.samples}  # fmt: skip
    left = sum(v for (n, _lb), v in host.items() if n == "telemetry_exit_flush_timeouts_total")
    failed = sum(v for (n, lb), v in host.items() if n == "telemetry_spans_total" and ("result", "failed") in lb)
    if endpoint == "black-hole":  # it never answers: the export cannot end before the bound
        assert left == 1 and "telemetry_exit_flush_timeout" in logged, (host, logged[-3000:])
    else:  # refused at once by some SDKs (1.25), retried with a back-off by others (1.45): either
        # the export failed within the bound, counted, or it was left at the bound, counted
        assert (left == 1 and "telemetry_exit_flush_timeout" in logged) or (left == 0 and failed >= 1), (host, logged[-3000:])
