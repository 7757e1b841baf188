"""Every label whose values come from outside the process is bounded: 10,000 distinct values of
each (HTTP method, route, status, application name, Celery task and queue) give at most the
documented cap, the rest folded into a catch-all and counted; and ``/metrics`` is rendered off
the application's event loop."""

from __future__ import annotations

import asyncio
import random
import string
import threading
from typing import Any

from prometheus_client import CollectorRegistry

import telemetry
from telemetry._core import bounds as _bounds
from telemetry._core import exposition as _exposition
from telemetry.integrations import asgi as _asgi
from telemetry.integrations.celery import tasks as _celery
from telemetry.server_view import model as _shared_model
from telemetry.testing import metrics, sample


def _label_values(name: str, label: str) -> set[str]:
    return {dict(lb)[label] for (n, lb), _v in metrics().items() if n == name and label in dict(lb)}


async def _request(app: Any, method: str, path: str) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [], "server": ("t", 80), "client": ("127.0.0.1", 5000)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


async def _status_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    status = int(scope["path"].rsplit("/", 1)[1])
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_unknown_http_methods_are_recorded_as_other() -> None:
    telemetry.instrument(service="api", tracing=False)
    app = _asgi.TelemetryMiddleware(_status_app)
    rng = random.Random(7)
    methods = ["".join(rng.choices(string.ascii_uppercase, k=8)) for _ in range(10_000)]

    async def run() -> None:
        for m in methods:
            await _request(app, m, "/items/200")
        for m in ("GET", "PATCH", "DELETE"):
            await _request(app, m, "/items/200")

    asyncio.run(run())
    assert _label_values("http_server_request_duration_seconds_count", "method") == {"_OTHER", "GET", "PATCH", "DELETE"}
    assert sample("http_server_request_duration_seconds_count", method="_OTHER") == 10_000
    assert sample("http_server_request_duration_seconds_count") == 10_003  # every request counted


def test_statuses_outside_100_599_share_one_series() -> None:
    telemetry.instrument(service="api", tracing=False)
    app = _asgi.TelemetryMiddleware(_status_app)

    async def run() -> None:
        for status in range(10_000):
            await _request(app, "GET", f"/s/{status}")

    asyncio.run(run())
    statuses = _label_values("http_server_request_duration_seconds_count", "status")
    assert len(statuses) == 501 and "other" in statuses and "200" in statuses
    # 0 is no status at all: recorded as 500, as the server answers it
    assert sample("http_server_request_duration_seconds_count", status="other") == 10_000 - 500 - 1
    assert sample("http_server_request_duration_seconds_count") == 10_000


def test_routes_are_capped() -> None:
    telemetry.instrument(service="api", tracing=False)
    for i in range(10_000):
        _asgi._route_labels("api", "GET", f"/r{i}/{{id}}")
    routes = {labels.route for labels in _asgi._LABELS.values()}
    assert len(routes) == _bounds.ROUTES.cap + 1 and _bounds.OTHER in routes
    assert sample("telemetry_label_values_folded_total", label="route") == 10_000 - _bounds.ROUTES.cap


def test_application_names_are_capped_ours_by_service_foreign_by_name() -> None:
    telemetry.instrument(service="api", tracing=False)
    ours = {_shared_model.app_label(f"svc{i}/{1000 + i}@host") for i in range(10_000)}
    assert len(ours) == _bounds.SERVICES.cap + 1 and "svc0" in ours and "other" in ours
    assert sample("telemetry_label_values_folded_total", label="application") == 10_000 - 100
    _bounds.reset()
    assert {_shared_model.app_label(f"api/{pid}@h{pid}") for pid in range(10_000)} == {"api"}  # one service
    foreign = {_shared_model.app_label(f"rotating-{i}") for i in range(10_000)}
    assert len(foreign) == _bounds.FOREIGN.cap + 1 and "rotating-0" in foreign
    assert _shared_model.app_label("rotating-0") == "rotating-0"  # the first ones keep their names
    assert sample("telemetry_label_values_folded_total", label="application") == 10_000 - 20


def test_celery_task_and_queue_names_from_messages_are_capped() -> None:
    telemetry.instrument(service="worker", tracing=False)
    for i in range(10_000):
        _celery._task_labels(f"task{i}", f"queue{i % 10_000}")
    tasks = {lb.name for lb in _celery._TASK_LABELS.values()}
    queues = {lb.queue for lb in _celery._TASK_LABELS.values()}
    assert len(tasks) == _bounds.TASKS.cap + 1 and len(queues) == _bounds.QUEUES.cap + 1
    assert len(_celery._TASK_LABELS) <= _celery._MAX_TASK_KEYS


def test_metrics_are_rendered_off_the_event_loop() -> None:
    """A collector that can only finish once the loop has run something else: the scrape and
    the loop progress together (rendered on the loop, the collector would wait in vain)."""
    loop_ran = threading.Event()
    rendering = threading.Event()

    class Slow:
        def collect(self) -> Any:
            rendering.set()
            assert loop_ran.wait(10), "the event loop did not run while /metrics was rendered"
            return iter(())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Slow())  # type: ignore[arg-type]
    app = _exposition.MetricsApp(registry)

    async def run() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def ticker() -> None:
            while not rendering.is_set():
                await asyncio.sleep(0.01)
            loop_ran.set()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
                 "headers": [(b"accept-encoding", b"gzip")]}  # fmt: skip
        await asyncio.gather(app(scope, None, send), ticker())
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 200 and (b"content-encoding", b"gzip") in sent[0]["headers"]


def test_a_span_keeps_the_original_method() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first test of the session to need one
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(service="api", tracing=True)
    app = _asgi.TelemetryMiddleware(_status_app, spans=True)
    asyncio.run(_request(app, "FOOBAR", "/items/200"))
    spans = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    exporter.clear()
    assert len(spans) == 1 and spans[0].name == "HTTP unmatched"
    assert spans[0].attributes["http.request.method"] == "_OTHER"
    assert spans[0].attributes["http.request.method_original"] == "FOOBAR"


def test_leak_call_sites_and_suspect_owners_are_capped() -> None:
    """10,000 leaks from distinct lines: 20 call_site values per pool and counter, the rest
    folded into 'other'; the owners whose checkouts note their line stay at 32."""
    from telemetry._core import holds as _holds
    from telemetry._core import pools as _pools
    from telemetry.integrations.sqlalchemy.state import PoolState

    telemetry.instrument(service="api", tracing=False)
    state = PoolState("leaky")
    for i in range(10_000):
        h = _holds.Held()
        h.state, h.owner, h.site, h.since, h.context = state, f"owner-{i % 50}", f"app.py:{i} in f", 0.0, None
        _pools.count_leak(h, "leaked", 100)
        _holds.suspect(h.owner)
    sites = {site for _owner, site in state.leaked}
    assert len(sites - {"other"}) == _pools.MAX_LEAK_SITES and "other" in sites
    assert sum(state.leaked.values()) == 10_000
    assert len(_holds.SUSPECTS) == _holds.MAX_SUSPECTS


def test_statement_texts_the_server_view_names_are_capped() -> None:
    """10,000 distinct statements (a client that interpolates values the literal stripper cannot
    see, or generated SQL): 50 texts keep their names, the rest are 'other' and counted."""
    from telemetry.server_view.model import statement

    _bounds.reset()
    seen = {_bounds.STATEMENTS(statement(f"select * from t{i} where id = {i}", 160)) for i in range(10_000)}
    assert len(seen) == _bounds.STATEMENTS.cap + 1 and "other" in seen
    assert "select * from t0 where id = ?" in seen  # the first keep their names, literals removed


def test_the_awaited_calls_and_the_traces_kept_are_capped() -> None:
    """10,000 distinct call names: 50 keep their names; 10,000 traces noted: the last 1,000 kept."""
    from telemetry._core import calls as _calls

    _bounds.reset()
    seen = {_bounds.CALLS(f"POST host-{i}/v1") for i in range(10_000)}
    assert len(seen) == _bounds.CALLS.cap + 1 and "other" in seen
    recent = _calls.RecentCalls()
    for trace in range(10_000):
        for n in range(20):
            recent.note(trace, 1_000 + n, n, f"call {n}")
    assert len(recent._calls) == _calls.MAX_TRACES and all(len(v) == _calls.PER_TRACE for v in recent._calls.values())
    assert recent.awaited(9_999, 0) == ("call 19", 19 / 1e9) and recent.awaited(0, 0) is None
