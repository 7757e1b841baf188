"""How long does a process take to exit when its OTLP endpoint is down? A child instruments
itself (spans and OTLP metrics on), finishes one span and exits; the parent times from the
child's "exiting" line to its end. Cases: no export, a healthy local receiver, an endpoint that
refuses connections, and one that accepts and never answers (a black hole). Each case runs
``--runs`` times (default 5); the table gives the median and the worst.

    python benchmarks/exit_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.otlp_down import black_hole, refused  # noqa: E402

CHILD = r"""
import telemetry
from opentelemetry import trace
telemetry.instrument(service="bench", sqlalchemy=False)
with trace.get_tracer("bench").start_as_current_span("last"):
    pass
print("exiting", flush=True)
"""


def exit_seconds(extra: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    env.update(extra)
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    t0 = time.perf_counter()
    assert line.strip() == "exiting", line
    proc.wait(timeout=120)
    proc.stdout.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from ..tests.otlp import OtlpReceiver

    healthy = OtlpReceiver()
    otlp = {"OTEL_METRICS_EXPORTER": "otlp"}
    cases = {
        "no export": {},
        "endpoint healthy": {"OTEL_EXPORTER_OTLP_ENDPOINT": healthy.endpoint, **otlp},
        "endpoint refuses": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{refused()}", **otlp},
        "endpoint black hole": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{black_hole()}", **otlp},
    }
    print(f"{'case':<22}{'exit median (s)':>17}{'worst (s)':>11}{'added (median)':>16}")
    print("-" * 66)
    base = None
    for name, env in cases.items():
        times = [exit_seconds(env) for _ in range(args.runs)]
        med = statistics.median(times)
        base = med if base is None else base
        print(f"{name:<22}{med:>17.3f}{max(times):>11.3f}{med - base:>16.3f}")
    healthy.close()


if __name__ == "__main__":
    main()
