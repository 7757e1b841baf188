"""HTTP: request metrics by route template, the pool-wait split, owner, spans.

``TelemetryMiddleware`` is a pure ASGI middleware. For each request (and WebSocket) it resolves
the route *template* before the handler runs (unknown paths map to ``unmatched``, never the raw
path), makes ``"METHOD /template"`` the owner of every connection the request checks out, and
opens a per-request account that the pool hot path adds its wait and hold times to. At the end it
records the duration by status and the request's pool wait and hold, so a dashboard can split
latency into "waiting for the pool" and the rest. A streaming response (SSE) or a WebSocket is in
flight for its whole life, and a session it holds shows up with the route as owner.

``instrument()`` wraps ``Starlette.build_middleware_stack`` so every FastAPI/Starlette app gets
this middleware, wrapped in OpenTelemetry's ASGI middleware (server spans with ``http.route``,
``traceparent`` extracted), without touching the app's code.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ._log import INTERNAL, hook_error
from ._owner import ACCOUNT, OWNER
from ._stats import REGISTRY, LabeledStats

STATS = LabeledStats()
REGISTRY.add(STATS)

UNMATCHED = "unmatched"
_ROUTE_KEY = "telemetry.route"


_CACHE: dict[tuple[Any, str, str], str] = {}
_CACHE_MAX = 2048  # paths with ids in them miss; the cache only stops growing


def route_template(scope: dict[str, Any], app: Any = None) -> str:
    """The matching route's path template, resolved once per request."""
    cached = scope.get(_ROUTE_KEY)
    if cached is not None:
        return str(cached)
    key = (id(app or scope.get("app")), scope.get("method", ""), scope.get("path", ""))
    template = _CACHE.get(key)
    if template is not None:
        scope[_ROUTE_KEY] = template
        return template
    template = UNMATCHED
    try:
        from starlette.routing import Match

        router = getattr(app or scope.get("app"), "router", None)
        for route in getattr(router, "routes", []):
            match, _ = route.matches(scope)
            if match == Match.FULL:
                template = getattr(route, "path", UNMATCHED) or UNMATCHED
                break
    except Exception as exc:
        hook_error("asgi.route", exc)
    if len(_CACHE) < _CACHE_MAX:
        _CACHE[key] = template
    scope[_ROUTE_KEY] = template
    return template


class TelemetryMiddleware:
    def __init__(self, app: Any, *, starlette_app: Any = None) -> None:
        self.app = app
        self.starlette_app = starlette_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            method = scope.get("method", "GET") if kind == "http" else "WEBSOCKET"
            route = route_template(scope, self.starlette_app)
            service = INTERNAL.service
            flight = LabeledStats.labels("http_server_requests_in_flight", service, method, route)
            STATS.add("http_server_requests_in_flight", flight, 1)
            owner_token = OWNER.set(f"{method} {route}")
            account = [0.0, 0.0]
            account_token = ACCOUNT.set(account)
            from ._asyncio import request_trace, watch_event_loop

            watch_event_loop()
            request_trace(asyncio.current_task())
        except Exception as exc:
            hook_error("asgi.start", exc)
            await self.app(scope, receive, send)
            return
        status = [0]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 0))
            elif message.get("type") == "websocket.accept":
                status[0] = 101
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not status[0]:
                status[0] = 500
            raise
        finally:
            try:
                elapsed = time.perf_counter() - t0
                code = str(status[0] or 500)
                STATS.observe("http_server_request_duration_seconds",
                              LabeledStats.labels("http_server_request_duration_seconds", service, method, route, code),
                              elapsed)  # fmt: skip
                split = LabeledStats.labels("http_server_pool_wait_seconds", service, method, route)
                STATS.observe("http_server_pool_wait_seconds", split, account[0])
                STATS.observe("http_server_pool_hold_seconds", split, account[1])
                STATS.add("http_server_requests_in_flight", flight, -1)
                OWNER.reset(owner_token)
                ACCOUNT.reset(account_token)
            except Exception as exc:
                hook_error("asgi.end", exc)


def _span_details(scope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    method = scope.get("method", "WEBSOCKET") if scope.get("type") == "http" else "WEBSOCKET"
    route = route_template(scope)
    return f"{method} {route}", {"http.route": route}


TRACING = {"enabled": True}


def wrap(app: Any, starlette_app: Any = None) -> Any:
    """Our middleware inside OpenTelemetry's (so the request span is current in ours)."""
    wrapped = TelemetryMiddleware(app, starlette_app=starlette_app)
    if not TRACING["enabled"]:
        return wrapped
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(wrapped, default_span_details=_span_details)
    except ImportError:
        return wrapped


_originals: dict[type, Any] = {}


def _classes() -> list[type]:
    """Starlette, and subclasses that override ``build_middleware_stack`` (FastAPI does)."""
    import importlib.util

    from starlette.applications import Starlette

    if importlib.util.find_spec("fastapi") is not None:
        import fastapi  # noqa: F401 - so its subclass exists to be found

    found: list[type] = [Starlette]
    todo: list[type] = [Starlette]
    while todo:
        subclasses: list[type] = todo.pop().__subclasses__()
        for sub in subclasses:
            todo.append(sub)
            if "build_middleware_stack" in sub.__dict__:
                found.append(sub)
    return found


def install() -> None:
    """Every Starlette/FastAPI app, created before or after, gets the middleware when its stack
    is (re)built, which Starlette does lazily on the first request."""
    try:
        import starlette  # noqa: F401
    except ImportError:
        return
    if _originals:
        return
    for cls in _classes():
        original = cls.__dict__["build_middleware_stack"]

        def build_middleware_stack(self: Any, _original: Any = original) -> Any:
            stack = _original(self)
            if getattr(self, "_telemetry_exclude", False):
                return stack
            return wrap(stack, self)

        _originals[cls] = original
        cls.build_middleware_stack = build_middleware_stack  # type: ignore[attr-defined]


def instrument_app(app: Any) -> None:
    """Make sure ``app`` (already started or not) is rebuilt with the middleware."""
    install()
    app.middleware_stack = None


def uninstall() -> None:
    _CACHE.clear()
    for cls, original in _originals.items():
        cls.build_middleware_stack = original  # type: ignore[attr-defined]
    _originals.clear()
    STATS.reset()
