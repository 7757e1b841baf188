"""The ASGI middleware on apps laid out as real apps are: every route's full template (routers in
modules, prefix chains, nested include_router, an APIRoute subclass, a mounted sub-application,
WebSocket and streaming routes) in request metrics and as the owner of the pool checkouts; one
count per request through a mount; WebSocket refusals; /metrics served where the README says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import telemetry

from .. import asgi_driver
from ..conftest import sample

pytestmark = pytest.mark.matrix("asgi")

EXPECTED = {
    ("GET", "/api/v1/items/7"): "/api/v1/items/{item_id}",
    ("POST", "/api/v1/items/"): "/api/v1/items/",
    ("GET", "/api/v1/users/3/posts/9"): "/api/v1/users/{user_id}/posts/{post_id}",
    ("GET", "/api/v1/timed/abc"): "/api/v1/timed/{key}",
    ("GET", "/api/v1/stream/3"): "/api/v1/stream/{n}",
    ("GET", "/legacy/v2/things/5"): "/legacy/v2/things/{thing_id}",
}


@pytest.fixture
async def routers_app() -> AsyncIterator[Any]:
    """The router-based app; its engine disposed after the test (aiosqlite keeps a thread per
    connection, and a thread left running can hang a later test's forked child)."""
    telemetry.instrument(service="api")
    from ..apps.routers_app import db
    from ..apps.routers_app.main import app

    yield app
    await db.engine.dispose()


def _requests(route: str, method: str = "GET") -> float:
    return sample("http_server_request_duration_seconds_count", route=route, method=method)


async def test_every_route_of_a_router_based_app_has_its_template(routers_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=routers_app), base_url="http://t") as client:
        for (method, path), _template in EXPECTED.items():
            for _ in range(3):
                response = await client.request(method, path)
                assert response.status_code == 200, (path, response.text)
        assert (await client.get("/api/v1/nowhere/1")).status_code == 404
    for (method, _path), template in EXPECTED.items():
        assert _requests(template, method) == 3, template
        owner = f"{method} {template}"
        # the dependency's session (or the stream's sessions) checked out as this route
        holds = sample("db_connection_hold_seconds_count", owner=owner)
        assert holds == (9 if template.endswith("{n}") else 3), owner
    assert _requests("unmatched") == 1
    with pytest.raises(KeyError):
        sample("db_connection_hold_seconds_count", owner="GET unmatched")


async def test_websocket_template_and_refusal_before_accept(routers_app):
    """A WebSocket route inside an included router has its template; one closed before accept
    is answered 403 (the ASGI spec), not counted as a server error."""
    sent = await asgi_driver.websocket(routers_app, "/api/v1/ws/lobby")
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    sent = await asgi_driver.websocket(routers_app, "/api/v1/ws/closed")
    assert [m["type"] for m in sent] == ["websocket.close"]
    route = "/api/v1/ws/{room}"
    assert sample("http_server_request_duration_seconds_count", route=route, status="101") == 1
    assert sample("http_server_request_duration_seconds_count", route=route, status="403") == 1
    with pytest.raises(KeyError):
        sample("http_server_request_duration_seconds_count", route=route, status="500")
    assert sample("db_connection_hold_seconds_count", owner=f"WEBSOCKET {route}") == 1


async def test_a_mounted_sub_application_counts_each_request_once():
    telemetry.instrument(service="api")
    v1 = FastAPI()

    @v1.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    app = FastAPI()
    app.mount("/v1", v1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for i in range(3):
            assert (await client.get(f"/v1/items/{i}")).status_code == 200
    assert sample("http_server_request_duration_seconds_count") == 3
    assert _requests("/v1/items/{item_id}") == 3


async def test_metrics_route_answers_200_under_its_own_template(routers_app):
    """``app.add_route("/metrics", telemetry.metrics_app())`` (the README's line): a plain GET
    gets the exposition, not a redirect, and is labelled "/metrics"."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=routers_app), base_url="http://t") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    # the scrape sees itself: the /metrics request is in flight while the exposition is built
    assert 'http_server_requests_in_flight{method="GET",pid="' in response.text
    assert 'route="/metrics",service="api"} 1.0' in response.text
    assert _requests("/metrics") == 1


async def test_metrics_app_under_a_lifespan_aware_server():
    """Mounted, routed or alone, the metrics app answers lifespan messages instead of failing
    (prometheus_client's ASGI app asserts on them)."""
    telemetry.instrument(service="api")
    bare = telemetry.metrics_app()
    assert await asgi_driver.lifespan(bare) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    app = FastAPI()
    app.mount("/metrics", telemetry.metrics_app())
    assert await asgi_driver.lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/metrics/")).status_code == 200


async def test_trailing_slash_redirect_is_labelled_with_its_target():
    telemetry.instrument(service="api")
    app = FastAPI()

    @app.get("/things/")
    async def things() -> list:
        return []

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/things")).status_code == 307
    assert sample("http_server_request_duration_seconds_count", route="/things/", status="307") == 1


def _fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    return app


def _starlette_app():  # type: ignore[no-untyped-def]
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def item(request):  # type: ignore[no-untyped-def]
        return JSONResponse({"id": request.path_params["item_id"]})

    async def boom(request):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/items/{item_id}", item), Route("/boom", boom)])


@pytest.mark.parametrize("make_app", [_starlette_app, _fastapi_app], ids=["starlette", "fastapi"])
async def test_one_server_span_per_request_with_semantic_conventions(make_app):
    """Tracing on: exactly one SERVER span per request and no per-message receive/send spans,
    named "METHOD /template", with the HTTP semantic-convention attributes, a child of the
    incoming traceparent, ERROR on 5xx. On a FastAPI with native telemetry (0.16x) the span is
    FastAPI's and ours stands down; elsewhere it is ours."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first test of the session to need one
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(service="api", tracing=True)
    app = make_app()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://testserver") as client:  # fmt: skip
        assert (await client.get("/items/7", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})).status_code == 200
        assert (await client.get("/boom")).status_code == 500
    spans = exporter.get_finished_spans()
    exporter.clear()
    assert not [s.name for s in spans if s.name.endswith((" http receive", " http send"))]
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["GET /items/{item_id}", "GET /boom"]
    first, second = servers
    assert format(first.context.trace_id, "032x") == trace_id
    assert format(first.parent.span_id, "016x") == "00f067aa0ba902b7"
    attrs = dict(first.attributes)
    assert {k: attrs.get(k) for k in ("http.request.method", "http.route", "http.response.status_code", "url.scheme",
                                      "server.address")} == {  # fmt: skip
        "http.request.method": "GET", "http.route": "/items/{item_id}", "http.response.status_code": 200,
        "url.scheme": "http", "server.address": "testserver",
    }  # fmt: skip
    assert second.status.status_code == StatusCode.ERROR
    assert second.attributes["http.response.status_code"] == 500
    assert second.attributes["error.type"] == "RuntimeError"


async def test_a_fastapi_frontend_is_labelled_like_a_mount(tmp_path):
    """``app.frontend("/", directory=...)`` (FastAPI 0.141+) serves / and /index.html after
    every route: labelled ``/{path}``, not ``unmatched``; the app's own routes keep theirs."""
    if not hasattr(FastAPI, "frontend"):
        pytest.skip("FastAPI before 0.141 has no app.frontend()")
    (tmp_path / "index.html").write_text("<html>app</html>")
    telemetry.instrument(service="api")
    app = FastAPI()

    @app.get("/api/items/{item_id}")
    async def item(item_id: int) -> dict:
        return {"id": item_id}

    app.frontend("/", directory=str(tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/index.html")).status_code == 200
        assert (await client.get("/api/items/3")).status_code == 200
    assert sample("http_server_request_duration_seconds_count", route="/{path}") == 2
    assert sample("http_server_request_duration_seconds_count", route="/api/items/{item_id}") == 1
    with pytest.raises(KeyError):
        sample("http_server_request_duration_seconds_count", route="unmatched")
