"""An in-process OTLP/HTTP receiver: collects the spans real processes export to it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        #: every metrics export received, decoded: (resource attributes, {name: metric proto})
        self.metric_exports: list[tuple[dict[str, str], dict[str, Any]]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    outer._add(body)
                    resp = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                else:
                    outer._add_metrics(body)
                    resp = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _add(self, body: bytes) -> None:
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        rows = []
        for rs in req.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    rows.append({
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "kind": span.kind,
                        "service": resource.get("service.name"),
                        "instance": resource.get("service.instance.id"),
                        "attributes": {a.key: a.value for a in span.attributes},
                    })  # fmt: skip
        with self._lock:
            self.spans.extend(rows)

    def _add_metrics(self, body: bytes) -> None:
        req = metrics_service_pb2.ExportMetricsServiceRequest()
        req.ParseFromString(body)
        for rm in req.resource_metrics:
            resource = {a.key: a.value.string_value for a in rm.resource.attributes}
            metrics = {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
            with self._lock:
                self.metric_exports.append((resource, metrics))

    def latest_per_instance(self) -> dict[str, dict[str, Any]]:
        """The last export of each process (cumulative: the last one is its total)."""
        with self._lock:
            exports = list(self.metric_exports)
        return {resource["service.instance.id"]: metrics for resource, metrics in exports}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
