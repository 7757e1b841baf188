"""Overhead per HTTP request and per Celery task: bare, the peers, and the package, in one run.

* request: a FastAPI endpoint called through its ASGI interface in-process (no network, so the
  figure is the middleware's own cost):
  - ``bare``;
  - peers: ``instrumentator`` (prometheus-fastapi-instrumentator), ``starlette-exporter``,
    ``otel-fastapi`` (OpenTelemetry's FastAPI instrumentation, SDK provider, no exporter);
  - the package: ``metrics`` (``TELEMETRY_TRACING=false``: metrics, owner, pool-wait split),
    ``metrics+bare-sdk-span`` (the floor under any standard span: the package's metrics plus one
    SDK span per request, per task run and per publish, no attribute, not current, no
    propagation),
    ``metrics+spans`` (the default: plus one SERVER span per request, SDK provider, no
    exporter), and on a FastAPI with native telemetry (0.16x) ``metrics+spans+fastapi-native``,
    where FastAPI's own spans (server, dependencies, endpoint) come on with any SDK provider
    and the package's span stands down; ``metrics+spans`` then passes
    ``FastAPI(telemetry={"tracing": False})`` so the span measured is the package's.
* task (worker side): ``task.apply()`` runs a no-op task in-process through Celery's tracer,
  which sends the same prerun/postrun signals a worker sends, with the headers a published
  message carries: bare / metrics / metrics+spans (run span, context extracted from the message).
* publish (producer side): ``before_task_publish`` + ``after_task_publish`` as ``apply_async``
  sends them (publish time stamped; with spans, the publish span and ``traceparent`` written).

Each configuration runs in its own child process, which measures the bare app and the
configured one side by side, interleaved (on these noisy 2-core machines the spread between
processes is larger than the overheads measured); a figure is the best bare and the best
configured batch of that child, and the table shows the median over rounds.

    python benchmarks/request_task_overhead.py [--rounds 5] [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS = ["bare", "instrumentator", "starlette-exporter", "otel-fastapi", "metrics", "metrics+bare-sdk-span",
           "metrics+spans", "metrics+spans+fastapi-native"]  # fmt: skip
PACKAGE = ("metrics", "metrics+bare-sdk-span", "metrics+spans", "metrics+spans+fastapi-native")


class _BareSpan:
    """The floor under any standard span: one SDK span per request, started and ended around the
    app, with no attribute, not made current, no propagation (``metrics+bare-sdk-span``)."""

    def __init__(self, app: Any) -> None:
        from opentelemetry import trace

        self.app, self.tracer = app, trace.get_tracer("floor")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        span = self.tracer.start_span("GET")
        try:
            await self.app(scope, receive, send)
        finally:
            span.end()


def _fastapi_native() -> bool:
    from fastapi import FastAPI

    return "telemetry" in inspect.signature(FastAPI.__init__).parameters


def _app(kwargs: dict) -> Any:
    from fastapi import FastAPI

    app = FastAPI(**kwargs)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    return app


async def _call(app: Any) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/items/7", "raw_path": b"/items/7", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "app": app}  # fmt: skip

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    await app(scope, receive, send)


def _pairs(bare: Any, configured: Any, batch: int, batches: int = 9) -> tuple[float, float]:
    """Best batch of each, alternating (microseconds per call)."""
    best = [float("inf"), float("inf")]
    for _ in range(batches):
        for i, fn in enumerate((bare, configured)):
            best[i] = min(best[i], fn(batch))
    return best[0], best[1]


def child(config: str, n: int) -> dict[str, float]:
    native = config == "metrics+spans+fastapi-native"
    off = {"telemetry": {"tracing": False, "metrics": False, "logs": False}} if _fastapi_native() else {}
    bare_app = _app(off)
    loop = asyncio.new_event_loop()

    def requests_of(app: Any) -> Any:
        def run(count: int) -> float:
            async def go() -> float:
                t0 = time.perf_counter()
                for _ in range(count):
                    await _call(app)
                return (time.perf_counter() - t0) / count * 1e6

            return loop.run_until_complete(go())

        return run

    loop.run_until_complete(_call(bare_app))  # its middleware stack is built now: stays bare
    telemetry: Any = None
    if config in PACKAGE:
        os.environ["TELEMETRY_TRACING"] = "true" if "+spans" in config else "false"
        import telemetry as telemetry_module

        telemetry = telemetry_module
        telemetry.instrument(service="bench", sqlalchemy=False, loop_blocked_seconds=60)
    if config in ("otel-fastapi", "metrics+bare-sdk-span"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    app = _app({} if native else off)
    if config == "instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(app)
    elif config == "starlette-exporter":
        from starlette_exporter import PrometheusMiddleware

        app.add_middleware(PrometheusMiddleware)
    elif config == "otel-fastapi":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app)
    elif config == "metrics+bare-sdk-span":
        app.add_middleware(_BareSpan)
    for _ in range(200):
        loop.run_until_complete(_call(app))
        loop.run_until_complete(_call(bare_app))
    bare_us, configured_us = _pairs(requests_of(bare_app), requests_of(app), max(200, n // 9))
    result = {"request": configured_us - bare_us, "request_bare": bare_us}
    if telemetry is None or native:
        return result

    # tasks: the same process with and without the package (uninstrument() removes every signal)
    from celery import Celery, signals

    celery = Celery("bench", broker="memory://", backend="cache+memory://")

    @celery.task(name="noop")
    def noop() -> int:
        return 1

    def publish() -> dict:
        headers = {"id": "t", "task": "noop"}
        signals.before_task_publish.send(sender="noop", headers=headers, body=None)
        signals.after_task_publish.send(sender="noop", headers=headers, body=None, exchange="", routing_key="content")
        return headers

    def timed(fn: Any) -> Any:
        def run(count: int) -> float:
            t0 = time.perf_counter()
            for _ in range(count):
                fn()
            return (time.perf_counter() - t0) / count * 1e6

        return run

    headers = publish()  # what a published message carries (traceparent with spans on)
    floor: dict[str, Any] = {}

    def floor_start(task_id: str = "", **_: Any) -> None:
        floor[task_id] = tracer.start_span("run")

    def floor_end(task_id: str = "", **_: Any) -> None:
        floor.pop(task_id).end()

    def floor_publish(headers: dict, **_: Any) -> None:
        floor[headers["id"]] = tracer.start_span("publish")

    def floor_published(headers: dict, **_: Any) -> None:
        floor.pop(headers["id"]).end()

    if config == "metrics+bare-sdk-span":
        from opentelemetry import trace

        tracer = trace.get_tracer("floor")
    settings = {"service": "bench", "sqlalchemy": False, "loop_blocked_seconds": 60}
    best = {"task": [float("inf")] * 2, "publish": [float("inf")] * 2}
    batch = max(200, n // 9)
    for _ in range(9):
        for on in (False, True):
            if on:
                telemetry.instrument(**settings)
            else:
                telemetry.uninstrument()
            if config == "metrics+bare-sdk-span":
                for signal, receiver in ((signals.task_prerun, floor_start), (signals.task_postrun, floor_end),
                                         (signals.before_task_publish, floor_publish),
                                         (signals.after_task_publish, floor_published)):  # fmt: skip
                    if on:
                        signal.connect(receiver, weak=False)
                    else:
                        signal.disconnect(receiver)
            for op, fn in (("task", lambda: noop.apply(headers=headers)), ("publish", publish)):
                timed(fn)(50)
                best[op][on] = min(best[op][on], timed(fn)(batch))
    for op, (off_us, on_us) in best.items():
        result[op] = on_us - off_us
        result[f"{op}_bare"] = off_us
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=4500)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    configs = CONFIGS[1:] if _fastapi_native() else CONFIGS[1:-1]
    runs: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            out = subprocess.run([sys.executable, __file__, "--child", config, "--n", str(args.n)],
                                 check=True, capture_output=True, text=True, env=env)  # fmt: skip
            for op, us in json.loads(out.stdout.strip().splitlines()[-1]).items():
                runs[config].setdefault(op, []).append(us)
    import fastapi
    import starlette

    med = {c: {op: statistics.median(v) for op, v in ops.items()} for c, ops in runs.items()}
    print(f"rounds: {args.rounds}   n: {args.n}   fastapi {fastapi.__version__}   starlette "
          f"{starlette.__version__}   (microseconds per operation over bare, measured side by side "
          f"in one process; median of rounds)")  # fmt: skip
    print(f"{'configuration':<30}{'request':>14}{'task (worker)':>16}{'publish (producer)':>20}")
    print("-" * 80)
    bare = {op: statistics.median(v for c in configs for v in runs[c].get(f"{op}_bare", []))
            for op in ("request", "task", "publish") if any(runs[c].get(f"{op}_bare") for c in configs)}  # fmt: skip
    print(f"{'bare (absolute)':<30}" + "".join(f"{bare.get(op, float('nan')):11.1f} us".rjust(w)
                                                for op, w in (("request", 14), ("task", 16), ("publish", 20))))  # fmt: skip
    for config in configs:
        cells = []
        for op, width in (("request", 14), ("task", 16), ("publish", 20)):
            cells.append((f"+{med[config][op]:.1f} us" if op in med[config] else "-").rjust(width))
        print(f"{config:<30}" + "".join(cells))


if __name__ == "__main__":
    main()
