"""``telemetry/_core/otel_private.py``, the one place the package uses OpenTelemetry's private names:
each does what its public counterpart would, on the SDK installed here (the newest in the main
suite, the oldest claimed in the matrix), so an SDK that changes them fails here, not in a user's
process."""

from __future__ import annotations

import pytest
from opentelemetry import context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from telemetry._core import otel_private as _otel_private
from telemetry.integrations.sqlalchemy import pool as _pool

pytestmark = pytest.mark.matrix("tracing")


def test_the_fast_context_read_is_the_current_context():
    get = _otel_private.current_context_getter()
    assert get is not context.get_current  # the fast path is in force on this SDK
    tracer = TracerProvider().get_tracer("check")
    with tracer.start_as_current_span("outer"):
        assert get() is context.get_current()
        assert _pool._otel_context_get() is context.get_current()
    assert get() is context.get_current()


def test_a_forked_child_gets_its_own_instance_id():
    provider = TracerProvider(resource=Resource.create({"service.name": "api", "service.instance.id": "parent"}))
    _otel_private.set_resource_attribute(provider, "service.instance.id", "child")
    assert provider.resource.attributes["service.instance.id"] == "child"
    assert provider.resource.attributes["service.name"] == "api"
