"""Turn snapshots into Prometheus metric families, and serve them.

Single-process mode: the collector reads this process's accumulators at scrape time (exact, no
staleness). Multiprocess mode: it reads the host directory (see ``_multiprocess``), so any worker's
``/metrics`` and the standalone server all return the same host aggregate.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from . import multiprocess as _multiprocess
from . import snapshot as _snapshot
from .catalogue import CATALOGUE, COUNTER, GAUGE, HISTOGRAM
from .stats import snapshot

#: a live process whose file was not written for this long is stopped or frozen (SIGSTOP): the
#: shared view's figures it published read as not current (``*_view_up`` 0, the age grows)
STALE_FILE_SECONDS = 10.0


def families(archive: dict[str, Any] | None, live: list[tuple[int, dict[str, Any]]],
             written: dict[int, float] | None = None, stale_after: float = STALE_FILE_SECONDS) -> list[Metric]:
    total = _snapshot.Total()
    now = time.time()
    if archive:
        total.add(archive)
    for _pid, snap in live:
        total.add(snap)
    by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], Any]]] = {}
    for (name, labels), count in total.counters.items():
        by_name.setdefault(name, []).append((labels, count))
    for (name, labels), hist in total.hists.items():
        by_name.setdefault(name, []).append((labels, hist))
    reporting = set()
    host_wide: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
    for pid, snap in live:
        for (name, labels), value in _snapshot.gauges(snap):
            reporting.add((name, labels))
            spec = CATALOGUE.get(name)
            if spec is not None and "pid" not in spec.labels:
                # the shared view's, from the host's one polling process (one value per series
                # even while the poller changes hands); from a file that stopped being written
                # (its writer frozen) the age counts on and the view is not up
                late = now - written[pid] if written and pid in written else 0.0
                if name.endswith("_view_age_seconds"):
                    value = round(value + late, 3)
                elif name.endswith("_view_up") and late > stale_after:
                    value = 0
                host_wide[(name, labels)] = value
                continue
            by_name.setdefault(name, []).append((labels + (("pid", str(pid)),), value))
    for (name, labels), value in host_wide.items():
        by_name.setdefault(name, []).append((labels, value))
    for name, labels in total.gone:  # series whose processes are all gone read 0
        if (name, labels) not in reporting:
            by_name.setdefault(name, []).append((labels + (("pid", ""),), 0))
    out: list[Metric] = []
    for name in sorted(by_name):
        spec = CATALOGUE.get(name)
        if spec is None:
            continue  # a newer process wrote a metric this version does not know
        rows = sorted(by_name[name], key=lambda r: r[0])
        label_names = [k for k, _ in rows[0][0]]
        fam: Metric
        if spec.kind == COUNTER:
            fam = CounterMetricFamily(name.removesuffix("_total"), spec.help, labels=label_names)
            for lb, value in rows:
                fam.add_metric([v for _, v in lb], value)
        elif spec.kind == GAUGE:
            fam = GaugeMetricFamily(name, spec.help, labels=label_names)
            for lb, value in rows:
                fam.add_metric([v for _, v in lb], value)
        elif spec.kind == HISTOGRAM:
            fam = HistogramMetricFamily(name, spec.help, labels=label_names)
            for lb, (counts, total_sum) in rows:
                cumulative, buckets = 0, []
                for bound, n in zip((*spec.buckets, float("inf")), counts, strict=True):
                    cumulative += n
                    buckets.append((floatToGoString(bound), cumulative))
                fam.add_metric([v for _, v in lb], buckets, total_sum)
        else:  # pragma: no cover
            continue
        out.append(fam)
    return out


class TelemetryCollector:
    """A prometheus-client collector over the package's measurements."""

    def __init__(self, directory: str | None = None, own: _multiprocess.ProcessFile | None = None,
                 stale_after: float = STALE_FILE_SECONDS):
        self.directory = directory
        self.own = own
        self.stale_after = stale_after

    def collect(self) -> Iterator[Metric]:
        if self.directory:
            written: dict[int, float] = {}
            archive, live = _multiprocess.read_host(self.directory, self.own, written)
            yield from families(archive, live, written, self.stale_after)
        else:
            yield from families(None, [(os.getpid(), snapshot())])

    def describe(self) -> Iterable[Metric]:
        return []


def host_registry(directory: str | None, own: _multiprocess.ProcessFile | None = None,
                  stale_after: float = STALE_FILE_SECONDS) -> CollectorRegistry:
    """A registry for a host's ``/metrics``: ours, plus prometheus-client's own multiprocess
    metrics (the user's) when ``PROMETHEUS_MULTIPROC_DIR`` is the same directory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(directory, own, stale_after))
    stock = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and stock and os.path.abspath(stock) == os.path.abspath(directory):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, directory)
    return registry


def render(registry: CollectorRegistry, accept: str, accept_encoding: str,
           names: list[str] | None = None) -> tuple[list[tuple[str, str]], bytes]:
    """The exposition in the format the scraper accepts (OpenMetrics or text), gzipped when it
    accepts that; ``names`` restricts it (``?name[]=...``, as prometheus-client serves)."""
    if names:
        registry = registry.restricted_registry(names)  # type: ignore[assignment]
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    headers = [("Content-Type", content_type)]
    if "gzip" in accept_encoding:
        body = gzip.compress(body, compresslevel=1)
        headers.append(("Content-Encoding", "gzip"))
    return headers, body


class MetricsApp:
    """``/metrics`` as an ASGI application: route it (``app.add_route("/metrics", ...)``: a plain
    GET answers 200, no redirect) or mount it. It is a class, not a function, so Starlette treats
    it as an ASGI app rather than a request handler; it answers lifespan messages itself.

    The exposition is built in a worker thread, never on the application's event loop: a large
    one (or a host aggregate read from many process files) would otherwise stall every request
    the loop serves for the whole scrape (docs/benchmarks.md, "Scrape off the event loop")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope.get("type") != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        out_headers, body = await asyncio.to_thread(
            render, self.registry, headers.get("accept", ""), headers.get("accept-encoding", ""),
            query.get("name[]"),
        )  # fmt: skip
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in out_headers]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def asgi_app(registry: CollectorRegistry) -> Any:
    return MetricsApp(registry)


def _guarded(app: Any, basic_auth: tuple[str, str] | None, bearer_token: str | None) -> Any:
    """A WSGI app that answers 401 unless the request carries the expected credentials."""
    import base64
    import hmac

    if basic_auth is not None:
        user, password = basic_auth
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif bearer_token is not None:
        expected = f"Bearer {bearer_token}"
    else:
        return app

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        given = environ.get("HTTP_AUTHORIZATION", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            challenge = 'Basic realm="metrics"' if basic_auth is not None else "Bearer"
            start_response("401 Unauthorized", [("WWW-Authenticate", challenge), ("Content-Type", "text/plain")])
            return [b"unauthorized\n"]
        return app(environ, start_response)

    return guarded


def serve(registry: CollectorRegistry, port: int, addr: str, *, basic_auth: tuple[str, str] | None = None,
          bearer_token: str | None = None) -> Any:  # fmt: skip
    if basic_auth is None and bearer_token is None:
        server, thread = start_http_server(port, addr=addr, registry=registry)
        return server, thread
    import threading
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    app = _guarded(make_wsgi_app(registry), basic_auth, bearer_token)
    server = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
