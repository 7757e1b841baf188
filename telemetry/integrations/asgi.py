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

from telemetry._core import bounds as _bounds
from telemetry._core.integration import Integration
from telemetry._core.log import INTERNAL, hook_error
from telemetry._core.owner import ACCOUNT, OWNER, RequestAccount
from telemetry._core.stats import REGISTRY, Histogram, LabeledStats

from . import tracing as _tracing
from .asyncio import (
    forget_request_span,
    note_thread_limiter,
    remember_request_span,
    watch_event_loop,
)

STATS = LabeledStats()
REGISTRY.add(STATS)

UNMATCHED = "unmatched"
_ROUTE_KEY = "telemetry.route"


_CACHE: dict[tuple[Any, str, str], str] = {}
_CACHE_MAX = 2048  # paths with ids in them miss; the cache only stops growing


def route_template(scope: dict[str, Any], app: Any = None) -> str:
    """The matching route's full path template, resolved once per request and cached per path.

    Routing is replayed on a copy of the scope, through every container a real app nests routes
    in: ``Mount`` (sub-applications, static files), ``Host``, and FastAPI's included routers
    (0.137 and later keep them nested instead of copying their routes onto the app). A path that
    only matches with the trailing slash toggled (what ``redirect_slashes`` answers 307 to) is
    labelled with the route it redirects to; anything else is ``unmatched``, never the raw path.
    """
    cached = scope.get(_ROUTE_KEY)
    if cached is not None:
        return str(cached)
    app = app or scope.get("app")
    key = (id(app), scope.get("method", ""), scope.get("path", ""))
    template = _CACHE.get(key)
    if template is not None:
        scope[_ROUTE_KEY] = template
        return template
    template = UNMATCHED
    try:
        routes = getattr(getattr(app, "router", app), "routes", None) or []
        probe = dict(scope)
        found = _resolve(routes, probe, "", 0)
        path = str(scope.get("path", ""))
        if found is None and scope.get("type") == "http" and path not in ("", "/"):
            toggled = path[:-1] if path.endswith("/") else path + "/"
            found = _resolve(routes, dict(scope, path=toggled), "", 0)
        if found is None:
            found = _frontend(app, scope)
        template = found or UNMATCHED
    except Exception as exc:
        hook_error("asgi.route", exc)
    if len(_CACHE) < _CACHE_MAX:
        _CACHE[key] = template
    scope[_ROUTE_KEY] = template
    return template


_MAX_DEPTH = 10


def _frontend(app: Any, scope: dict[str, Any]) -> str | None:
    """FastAPI's ``app.frontend(path, directory=...)`` (0.141+): static files and the navigation
    fallback, tried after every route; labelled like a mount, ``{path}/{path}``."""
    from starlette.routing import Match

    group = getattr(getattr(app, "router", app), "_frontend_routes", None)
    for route in getattr(group, "routes", None) or ():
        match, _child = route.matches(scope)
        if match == Match.FULL:
            return f"{str(route.path).rstrip('/')}/{{path}}"
    return None


def _resolve(routes: Any, scope: dict[str, Any], prefix: str, depth: int) -> str | None:
    """The first full match's template (else the first partial one, as Starlette picks)."""
    from starlette.routing import Match

    partial: str | None = None
    for route in routes:
        match, template = _match(route, scope, prefix, depth)
        if match == Match.FULL:
            return template
        if match == Match.PARTIAL and partial is None:
            partial = template
    return partial


def _match(route: Any, scope: dict[str, Any], prefix: str, depth: int) -> tuple[Any, str | None]:
    from starlette.routing import Host, Match, Mount

    if getattr(route, "path", None) is None and hasattr(route, "_match"):
        return _match_included(route, scope, prefix, depth)
    match, child = route.matches(scope)
    if match == Match.NONE:
        return match, None
    inner = {**scope, **child}
    if isinstance(route, Mount):
        base = prefix + route.path
        found = _resolve(route.routes, inner, base, depth + 1) if depth < _MAX_DEPTH else None
        return match, found or f"{base}/{{path}}"
    if isinstance(route, Host):
        return match, _resolve(route.routes, inner, prefix, depth + 1) if depth < _MAX_DEPTH else None
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return match, (prefix + path) if path else None


def _match_included(route: Any, scope: dict[str, Any], prefix: str, depth: int) -> tuple[Any, str | None]:
    """FastAPI >= 0.137: an included router matches through its effective (prefixed) routes."""
    from starlette.routing import Match, Mount

    match, child, inner_route, context = route._match(scope)
    if match == Match.NONE or inner_route is None or depth >= _MAX_DEPTH:
        return Match.NONE, None
    inner = {**scope, **child}
    if getattr(inner_route, "path", None) is None and hasattr(inner_route, "_match"):
        return _match_included(inner_route, inner, prefix, depth + 1)
    effective = getattr(context, "starlette_route", None) or inner_route
    if isinstance(effective, Mount):
        base = prefix + effective.path
        found = _resolve(effective.routes, inner, base, depth + 1)
        return match, found or f"{base}/{{path}}"
    path = getattr(context, "path_format", None) or getattr(effective, "path_format", None)
    return match, (prefix + path) if path else None


#: set on the scope by the outermost instrumented app: a mounted sub-application's own middleware
#: sees it and stays out of the way, so a request is counted once, with its full template
_ACTIVE_KEY = "telemetry.active"


class _RouteLabels:
    """Per (service, method, route): the owner string and direct handles on the route's
    in-flight gauge and histograms, built once (building label tuples and looking series up per
    request was most of the middleware's own cost)."""

    __slots__ = ("owner", "flight", "wait", "hold", "server_wait", "durations", "service", "method",
                 "route", "generation")  # fmt: skip

    def __init__(self, service: str, method: str, route: str) -> None:
        self.service, self.method, self.route = service, method, route
        self.owner = f"{method} {route}"
        self.generation = STATS.generation
        flight = LabeledStats.labels("http_server_requests_in_flight", service, method, route)
        split = LabeledStats.labels("http_server_pool_wait_seconds", service, method, route)
        self.flight = STATS.gauge_cell("http_server_requests_in_flight", flight)
        self.wait = STATS.histogram("http_server_pool_wait_seconds", split)
        self.hold = STATS.histogram("http_server_pool_hold_seconds", split)
        self.server_wait = STATS.histogram("http_server_db_server_wait_seconds", split)
        self.durations: dict[int, Histogram] = {}

    def duration(self, status: int) -> Histogram:
        hist = self.durations.get(status)
        if hist is None and not 100 <= status <= 599:
            status = 0  # every status outside 100-599 shares one series: status="other"
            hist = self.durations.get(status)
        if hist is None:
            labels = LabeledStats.labels(
                "http_server_request_duration_seconds", self.service, self.method, self.route,
                _bounds.http_status(status),
            )
            hist = self.durations[status] = STATS.histogram("http_server_request_duration_seconds", labels)
        return hist


_LABELS: dict[tuple[str, str, str], _RouteLabels] = {}  # bounded: templates, not paths
_perf = time.perf_counter


def _route_labels(service: str, method: str, route: str) -> _RouteLabels:
    key = (service, method, route)
    labels = _LABELS.get(key)
    if labels is None or labels.generation != STATS.generation:  # counts reset (fork, uninstall)
        folded = _bounds.ROUTES(route)  # templates are the app's own; capped all the same
        labels = _LABELS.get((service, method, folded))
        if labels is None or labels.generation != STATS.generation:
            labels = _LABELS[(service, method, folded)] = _RouteLabels(service, method, folded)
        _LABELS[key] = labels
    return labels


class TelemetryMiddleware:
    """Request metrics, owner and pool-wait split; with tracing on, one SERVER span per request
    (HTTP semantic conventions, ``traceparent`` honoured) and nothing per message."""

    def __init__(self, app: Any, *, starlette_app: Any = None, spans: bool = False) -> None:
        self.app = app
        self.starlette_app = starlette_app
        self.spans = spans

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket") or scope.get(_ACTIVE_KEY):
            await self.app(scope, receive, send)
            return
        span = context_token = remembered = None
        try:
            scope[_ACTIVE_KEY] = True
            method = _bounds.http_method(scope.get("method", "GET")) if kind == "http" else "WEBSOCKET"
            labels = _route_labels(INTERNAL.service, method, route_template(scope, self.starlette_app))
            labels.flight[0] += 1
            owner_token = OWNER.set(labels.owner)
            account = RequestAccount()
            account_token = ACCOUNT.set(account)
            loop = asyncio.get_running_loop()
            watch_event_loop(loop)  # uvloop loops skip the run_forever hook
            note_thread_limiter(loop)  # sync routes run in its threads
            if self.spans:
                native = scope.get("fastapi.telemetry")  # FastAPI >= 0.16x opened its own span
                if native is None or getattr(native, "span", None) is None:
                    span, context_token = _tracing.start_server_span(scope, labels.method, labels.route)
                remembered = remember_request_span(
                    asyncio.current_task(), span or getattr(native, "span", None)
                )
        except Exception as exc:
            hook_error("asgi.start", exc)
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            kind = message.get("type")
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                status = int(message.get("status", 0))
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and not status:
                status = 403  # closed before accept: the server answers the handshake 403
            await send(message)

        t0 = _perf()
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            error = exc
            if not status:
                status = 500
            raise
        finally:
            try:
                end = _perf()
                account.ended = end  # a connection still checked out after this is leaked
                elapsed = end - t0
                labels.duration(status or 500).observe(elapsed)
                labels.wait.observe(account.wait)
                labels.hold.observe(account.hold)
                labels.server_wait.observe(account.server_wait)
                labels.flight[0] -= 1
                OWNER.reset(owner_token)
                ACCOUNT.reset(account_token)
                if remembered is not None:
                    forget_request_span(remembered)
                if span is not None:
                    _tracing.end_server_span(span, context_token, status or 500, error)
            except Exception as exc:
                hook_error("asgi.end", exc)


def _span_details(scope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    method = scope.get("method", "WEBSOCKET") if scope.get("type") == "http" else "WEBSOCKET"
    route = route_template(scope)
    return f"{method} {route}", {"http.route": route}


def wrap(app: Any, starlette_app: Any = None) -> Any:
    """Our middleware; with tracing, it opens the request's server span itself. With
    ``http_spans="opentelemetry"`` OpenTelemetry's ASGI middleware wraps ours instead (its
    server span plus a span per message received and sent, about four times the cost)."""
    integration = _installed
    if integration is None or not integration.tracing:
        return TelemetryMiddleware(app, starlette_app=starlette_app)
    if integration.http_spans == "server":
        return TelemetryMiddleware(app, starlette_app=starlette_app, spans=True)
    wrapped = TelemetryMiddleware(app, starlette_app=starlette_app)
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
    _LABELS.clear()
    for cls, original in _originals.items():
        cls.build_middleware_stack = original  # type: ignore[attr-defined]
    _originals.clear()
    STATS.reset()


_installed: ASGIIntegration | None = None


class ASGIIntegration(Integration):
    """The middleware on every Starlette/FastAPI app, created before or after."""

    name = "asgi"

    def __init__(self) -> None:
        self.tracing = False
        self.http_spans = "server"

    def install(self, runtime: Any) -> None:
        global _installed
        self.tracing = runtime.settings.tracing and _tracing.available()
        self.http_spans = runtime.settings.http_spans
        _installed = self
        install()

    def uninstall(self) -> None:
        global _installed
        _installed = None
        uninstall()
