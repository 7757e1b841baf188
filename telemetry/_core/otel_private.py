"""The one place the package reaches into OpenTelemetry's private names, each guarded (a missing
or changed name falls back to the public API) and checked by ``tests/core/test_otel_private.py`` on the
newest SDK and, in the matrix, the oldest.

* the current context, read on every pool checkout: the SDK's runtime context is one
  ``ContextVar``; reading it directly costs ~40 ns where ``context.get_current()`` costs several
  times that;
* a forked child's ``service.instance.id``: a ``TracerProvider``'s resource is immutable and the
  global provider cannot be replaced, so the child's identity is written into the resource's
  attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


def current_context_getter() -> Callable[[], Any]:
    """A function returning OpenTelemetry's current context (None without OpenTelemetry)."""
    try:
        from opentelemetry.context import _RUNTIME_CONTEXT

        return _RUNTIME_CONTEXT._current_context.get  # type: ignore[attr-defined]
    except Exception:
        with contextlib.suppress(ImportError):
            from opentelemetry.context import get_current

            return get_current

    def none() -> Any:
        return None

    return none


def set_resource_attribute(provider: Any, key: str, value: str) -> None:
    """``provider.resource.attributes[key] = value`` on a live provider (raises on failure: the
    caller counts it)."""
    from opentelemetry.attributes import BoundedAttributes

    resource = provider.resource
    attrs = dict(resource.attributes)
    attrs[key] = value
    resource._attributes = BoundedAttributes(attributes=attrs)
