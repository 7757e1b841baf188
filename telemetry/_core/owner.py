"""Who is taking connections: the owner context.

Every checkout is attributed to the value of :data:`OWNER` at that moment. The Celery integration
sets it to the running task's name, the HTTP integration to the route template, and users narrow
it with ``with telemetry.db_owner("resume-step"):``. With nothing set the owner is
:data:`DEFAULT_OWNER`.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

DEFAULT_OWNER = "unattributed"
OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("telemetry_owner", default=DEFAULT_OWNER)

class RequestAccount:
    """Per-request totals the pool hot path adds to: seconds waiting for checkouts, seconds
    holding connections (overlapping holds add up). Set by the ASGI middleware."""

    __slots__ = ("wait", "hold", "server_wait", "ended")

    def __init__(self) -> None:
        self.wait = 0.0
        self.hold = 0.0
        self.ended = 0.0  # perf_counter when the request or task ended: a connection still held is leaked
        self.server_wait = 0.0  # first statements of transactions: waiting for a server connection


ACCOUNT: contextvars.ContextVar[RequestAccount | None] = contextvars.ContextVar(
    "telemetry_account", default=None
)

F = TypeVar("F", bound=Callable[..., Any])


def current_owner() -> str:
    """Who the connections checked out now are attributed to (route, task or ``db_owner``)."""
    return OWNER.get()


class db_owner:  # noqa: N801 - reads as a verb at the call site, like contextlib helpers
    """Attribute the connections checked out inside the block to ``name``.

    Works as ``with``, ``async with`` and as a decorator of sync or async functions. Nesting is
    allowed; the innermost name wins and the outer one is restored on exit.
    """

    __slots__ = ("name", "_tokens")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"db_owner name must be a non-empty string, got {name!r}")
        self.name = name
        self._tokens: list[contextvars.Token[str]] = []

    def __enter__(self) -> db_owner:
        self._tokens.append(OWNER.set(self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        OWNER.reset(self._tokens.pop())

    async def __aenter__(self) -> db_owner:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()

    def __call__(self, fn: F) -> F:
        import inspect

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                token = OWNER.set(self.name)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    OWNER.reset(token)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = OWNER.set(self.name)
            try:
                return fn(*args, **kwargs)
            finally:
                OWNER.reset(token)

        return wrapper  # type: ignore[return-value]
