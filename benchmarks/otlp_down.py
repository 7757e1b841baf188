"""Does a dead collector slow the app? Cost per traced operation with no exporter, with a healthy
local OTLP receiver, with the OTLP
endpoint refusing connections, and with an endpoint that accepts and never answers (a black
hole), plus the spans counted as dropped/failed and the process's peak RSS.

Each case runs in its own child process: 20,000 spans (a span around a trivial operation, as a
request would make) at full speed, then a flush with a 2 s limit.

    python benchmarks/otlp_down.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

CHILD = r"""
import json, resource, time, os
import telemetry
from telemetry._core import stats as _stats
from telemetry.integrations import tracing as _tracing
from opentelemetry import trace
telemetry.instrument(service="bench", sqlalchemy=False)
tracer = trace.get_tracer("bench")
n = 20000
t0 = time.perf_counter()
for i in range(n):
    with tracer.start_as_current_span("op"):
        pass
per_span = (time.perf_counter() - t0) / n * 1e6
_tracing.flush(2)
counts = {lb[1][1]: v for name, lb, v in _stats.iter_samples() if name == "telemetry_spans_total"}
print(json.dumps({"us_per_span": per_span, "counts": counts,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def black_hole() -> int:
    """Accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(100)
    held = []

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            held.append(conn)

    threading.Thread(target=loop, daemon=True).start()
    return int(srv.getsockname()[1])


def refused() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def run(extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    common = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2", "OTEL_BSP_MAX_QUEUE_SIZE": "2048"}
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ..tests.otlp import OtlpReceiver

    healthy = OtlpReceiver()
    cases = {
        "no exporter": {},
        "endpoint healthy": {"OTEL_EXPORTER_OTLP_ENDPOINT": healthy.endpoint, **common},
        "endpoint refuses": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{refused()}", **common},
        "endpoint black hole": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{black_hole()}", **common},
    }
    results = {name: run(env) for name, env in cases.items()}
    base = results["no exporter"]["us_per_span"]
    print(f"{'case':<22}{'us per span':>14}{'x':>7}{'exported':>10}{'failed':>8}{'dropped':>9}{'peak RSS':>10}")
    print("-" * 80)
    for name, r in results.items():
        c = r["counts"]
        print(f"{name:<22}{r['us_per_span']:>14.1f}{r['us_per_span'] / base:>7.2f}{c.get('exported', 0):>10.0f}"
              f"{c.get('failed', 0):>8.0f}{c.get('dropped', 0):>9.0f}{r['rss_mb']:>8.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
