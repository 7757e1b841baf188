"""The floor under any standard OpenTelemetry span: the SDK's own cost to start and end one span
(default sampler, no processor), bare and with the attributes a server span carries.

    python benchmarks/sdk_span_floor.py
"""

from __future__ import annotations

import timeit

from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind


def main() -> None:
    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("floor")
    attributes = {"http.request.method": "GET", "http.route": "/items/{item_id}", "url.scheme": "http",
                  "url.path": "/items/7", "server.address": "127.0.0.1", "server.port": 80}  # fmt: skip

    def bare() -> None:
        tracer.start_span("x").end()

    def server() -> None:
        span = tracer.start_span("GET /items/{item_id}", kind=SpanKind.SERVER, attributes=attributes)
        token = context.attach(trace.set_span_in_context(span))
        span.set_attribute("http.response.status_code", 200)
        span.end()
        context.detach(token)

    print("SDK span, start + end (best of 9 x 5,000)")
    for name, fn in (("bare span", bare), ("server span, 7 attributes, made current", server)):
        best = min(timeit.repeat(fn, number=5000, repeat=9)) / 5000 * 1e6
        print(f"  {name:<42} {best:6.1f} us")


if __name__ == "__main__":
    main()
