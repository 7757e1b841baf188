"""Overhead per HTTP request and per Celery task: bare, the peers, and the package, in one run.

* request: a FastAPI endpoint called through its ASGI interface in-process (no network, so the
  figure is the middleware's own cost):
  - ``bare``;
  - peers: ``instrumentator`` (prometheus-fastapi-instrumentator), ``starlette-exporter``,
    ``otel-fastapi`` (OpenTelemetry's FastAPI instrumentation, SDK provider, no exporter);
  - the package: ``metrics`` (``TELEMETRY_TRACING=false``: metrics, owner, pool-wait split),
    ``metrics+spans`` (the default: plus one SERVER span per request, SDK provider, no
    exporter), and on a FastAPI with native telemetry (0.16x) ``metrics+spans+fastapi-native``,
    where FastAPI's own spans (server, dependencies, endpoint) come on with any SDK provider
    and the package's span stands down; ``metrics+spans`` then passes
    ``FastAPI(telemetry={"tracing": False})`` so the span measured is the package's.
* task: ``task.apply()`` runs a no-op task in-process through Celery's tracer, which sends the
  same prerun/postrun signals a worker sends, after a publish-side ``before_task_publish``
  (headers stamped, context injected): bare / metrics / metrics+spans (run span, context
  extracted from the message).

Each configuration runs in its own child process; rounds alternate; the best round is kept.

    python benchmarks/request_task_overhead.py [--rounds 5] [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import subprocess
import sys
import time

CONFIGS = ["bare", "instrumentator", "starlette-exporter", "otel-fastapi", "metrics", "metrics+spans",
           "metrics+spans+fastapi-native"]  # fmt: skip
PACKAGE = ("metrics", "metrics+spans", "metrics+spans+fastapi-native")


def _fastapi_native() -> bool:
    from fastapi import FastAPI

    return "telemetry" in inspect.signature(FastAPI.__init__).parameters


def child(config: str, n: int) -> dict[str, float]:
    if config in PACKAGE:
        os.environ["TELEMETRY_TRACING"] = "false" if config == "metrics" else "true"
        import telemetry

        telemetry.instrument(service="bench", sqlalchemy=False)
    if config == "otel-fastapi":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
    from celery import Celery
    from fastapi import FastAPI

    kwargs = {}
    if config != "metrics+spans+fastapi-native" and _fastapi_native():
        kwargs["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(**kwargs)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    if config == "instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(app)
    elif config == "starlette-exporter":
        from starlette_exporter import PrometheusMiddleware

        app.add_middleware(PrometheusMiddleware)
    elif config == "otel-fastapi":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app)

    async def call() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/items/7", "raw_path": b"/items/7", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80), "app": app}  # fmt: skip
        sent = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    async def requests(count: int) -> float:
        for _ in range(200):
            await call()
        t0 = time.perf_counter()
        for _ in range(count):
            await call()
        return (time.perf_counter() - t0) / count * 1e6

    celery = Celery("bench", broker="memory://", backend="cache+memory://")

    @celery.task(name="noop")
    def noop() -> int:
        return 1

    from celery import signals

    def one_task() -> None:
        headers = {"id": "t", "task": "noop"}
        signals.before_task_publish.send(sender="noop", headers=headers, body=None)
        signals.after_task_publish.send(sender="noop", headers=headers, body=None)
        noop.apply(headers=headers)

    def tasks(count: int) -> float:
        for _ in range(100):
            one_task()
        t0 = time.perf_counter()
        for _ in range(count):
            one_task()
        return (time.perf_counter() - t0) / count * 1e6

    result = {"request": asyncio.run(requests(n))}
    if config in ("bare", *PACKAGE[:2]):
        result["task"] = tasks(max(500, n // 2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    configs = CONFIGS if _fastapi_native() else CONFIGS[:-1]
    best: dict[str, dict[str, float]] = {c: {} for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            out = subprocess.run([sys.executable, __file__, "--child", config, "--n", str(args.n)],
                                 check=True, capture_output=True, text=True, env=env)  # fmt: skip
            for op, us in json.loads(out.stdout.strip().splitlines()[-1]).items():
                best[config][op] = min(us, best[config].get(op, float("inf")))
    import fastapi
    import starlette

    print(f"rounds: {args.rounds}   n: {args.n}   fastapi {fastapi.__version__}   starlette "
          f"{starlette.__version__}   (best round, microseconds per operation, + over bare)")  # fmt: skip
    print(f"{'configuration':<30}{'request':>26}{'task':>26}")
    print("-" * 82)
    for config in configs:
        cells = []
        for op in ("request", "task"):
            if op in best[config]:
                cells.append(f"{best[config][op]:8.1f} us  +{best[config][op] - best['bare'][op]:6.1f} us")
            else:
                cells.append("-")
        print(f"{config:<30}" + "".join(c.rjust(26) for c in cells))


if __name__ == "__main__":
    main()
