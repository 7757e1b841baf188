"""The one lifecycle every integration has.

An integration (SQLAlchemy pools, asyncio, ASGI, Celery, tracing) is an object that the runtime
installs once, ticks from its housekeeper thread, resets in a forked child and uninstalls. It
records everything it attaches (patched methods, event listeners, signal receivers,
instrumentors) in ``install`` so that ``uninstall`` removes exactly that, and it never reaches
into another module's private state: what it needs from the runtime it gets as the argument of
``install``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .runtime import Runtime


class Integration:
    #: unique key in the runtime (one instance per process)
    name: ClassVar[str] = ""

    def install(self, runtime: Runtime) -> None:
        """Attach to the library; record what was attached."""

    def uninstall(self) -> None:
        """Remove everything ``install`` attached and forget what was measured."""

    def after_fork(self) -> None:
        """In a forked child (uvicorn worker, Celery prefork child): the parent's per-process
        state (held connections, running tasks, watched loops, locks) does not carry over."""

    def tick(self, now: float) -> None:
        """Called by the housekeeper thread every watchdog interval (``now``: perf_counter)."""

    def flush(self) -> None:
        """Push out what is buffered (spans) before the process exits."""
