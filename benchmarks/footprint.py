"""What ``instrument()`` adds to a process: resident memory and start-up time.

An app as the incident's API process starts (FastAPI with routes, an async SQLAlchemy engine, a
Celery app it enqueues to, a redis-py client; nothing connects), then, in the same process,
``import telemetry; telemetry.instrument()``: the growth of VmRSS and the wall time of that step,
and how much of that time went to garbage collections of the app's own objects that the step's
allocations happened to trigger (a collection the app pays at its next threshold anyway).
Each configuration runs in ``--runs`` fresh processes (bytecode compiled beforehand, as an
installed package has it); the table gives the median and the best.

    python benchmarks/footprint.py [--runs 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

APP = r"""
import json, sys, time

def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

from fastapi import FastAPI, APIRouter
from sqlalchemy.ext.asyncio import create_async_engine
from celery import Celery
import redis.asyncio

app = FastAPI()
router = APIRouter(prefix="/api")

@router.get("/items/{item_id}")
async def item(item_id: int) -> dict:
    return {"id": item_id}

app.include_router(router)
engine = create_async_engine("sqlite+aiosqlite:////tmp/footprint.db", pool_size=2, max_overflow=2)
celery_app = Celery("content", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/1")
client = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0")
import gc
collecting = [0.0, 0.0]

def on_gc(phase, info):
    if phase == "start":
        collecting[1] = time.perf_counter()
    else:
        collecting[0] += time.perf_counter() - collecting[1]

gc.callbacks.append(on_gc)
base, t0 = rss_mb(), time.perf_counter()
mode = sys.argv[1]
if mode != "app":
    import telemetry
    telemetry.instrument(service="api", tracing=(mode == "tracing"))
elapsed = time.perf_counter() - t0
print(json.dumps({"rss_mb": rss_mb() - base, "ms": elapsed * 1000, "gc_ms": collecting[0] * 1000}))
"""

MODES = ("app", "instrument", "tracing")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "OTEL_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.dirname(os.path.dirname(__file__)) + "/telemetry"],
                   check=True)  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.runs):
        for mode in MODES:  # alternating, so drift on the machine hits every mode alike
            out = subprocess.run([sys.executable, "-c", APP, mode], capture_output=True, text=True, env=env,
                                 check=True, timeout=120)  # fmt: skip
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'configuration':<34} {'+RSS MB median':>15} {'best':>6} {'+ms median':>11} {'best':>6} "
          f"{'of which the app GC':>20}")
    print("-" * 97)
    for mode, label in (("app", "the app alone"), ("instrument", "instrument() (core: no tracing)"),
                        ("tracing", "instrument() with tracing")):  # fmt: skip
        rss = [r["rss_mb"] for r in results[mode]]
        ms = [r["ms"] for r in results[mode]]
        gc_ms = [r["gc_ms"] for r in results[mode]]
        print(f"{label:<34} {statistics.median(rss):>15.1f} {min(rss):>6.1f} {statistics.median(ms):>11.1f} "
              f"{min(ms):>6.1f} {statistics.median(gc_ms):>20.1f}")


if __name__ == "__main__":
    main()
