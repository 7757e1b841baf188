"""The ASGI middleware on apps laid out as real apps are: every route's full template (routers in
modules, prefix chains, nested include_router, an APIRoute subclass, a mounted sub-application,
WebSocket and streaming routes) in request metrics and as the owner of the pool checkouts; one
count per request through a mount; WebSocket refusals; /metrics served where the README says."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

import telemetry

from . import asgi_driver
from .conftest import sample

EXPECTED = {
    ("GET", "/api/v1/items/7"): "/api/v1/items/{item_id}",
    ("POST", "/api/v1/items/"): "/api/v1/items/",
    ("GET", "/api/v1/users/3/posts/9"): "/api/v1/users/{user_id}/posts/{post_id}",
    ("GET", "/api/v1/timed/abc"): "/api/v1/timed/{key}",
    ("GET", "/api/v1/stream/3"): "/api/v1/stream/{n}",
    ("GET", "/legacy/v2/things/5"): "/legacy/v2/things/{thing_id}",
}


def _requests(route: str, method: str = "GET") -> float:
    return sample("http_server_request_duration_seconds_count", route=route, method=method)


async def test_every_route_of_a_router_based_app_has_its_template():
    telemetry.instrument(service="api")
    from .apps.routers_app.main import app

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
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


async def test_websocket_template_and_refusal_before_accept():
    """A WebSocket route inside an included router has its template; one closed before accept
    is answered 403 (the ASGI spec), not counted as a server error."""
    telemetry.instrument(service="api")
    from .apps.routers_app.main import app

    sent = await asgi_driver.websocket(app, "/api/v1/ws/lobby")
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    sent = await asgi_driver.websocket(app, "/api/v1/ws/closed")
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


async def test_metrics_route_answers_200_under_its_own_template():
    """``app.add_route("/metrics", telemetry.metrics_app())`` (the README's line): a plain GET
    gets the exposition, not a redirect, and is labelled "/metrics"."""
    telemetry.instrument(service="api")
    from .apps.routers_app.main import app

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert "db_pool_checkouts_total" in response.text or "http_server" in response.text
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
