"""A small OTLP trace receiver for the tracing tests: what a collector is to batchgate (the
OpenTelemetry Collector does not install here). Over HTTP it takes ``POST /v1/traces`` with a
protobuf ExportTraceServiceRequest (gzipped or not), as the OTLP exporter sends it; over gRPC it
serves the collector's TraceService/Export. It keeps the spans."""

from __future__ import annotations

import gzip
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict
    events: list[str]
    links: list[tuple[str, str]]  # (trace id, span id)
    status: int
    start_ns: int
    end_ns: int
    resource: dict = field(default_factory=dict)
    trace_state: str = ""


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver:
    def __init__(self, protocol: str = "http") -> None:
        """``protocol``: http (OTLP/HTTP) or grpc (OTLP/gRPC); ``endpoint`` is what batchgate's
        otlp_endpoint is set to."""
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        self.grpc_server = None
        if protocol == "grpc":
            self._serve_grpc()
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver._take(req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _serve_grpc(self) -> None:
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the service's name
                receiver._take(request)
                return ExportTraceServiceResponse()

        self._pool = ThreadPoolExecutor(2)
        self.grpc_server = grpc.server(self._pool)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.grpc_server)
        port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def _take(self, req: ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.kind,
                            {a.key: _value(a.value) for a in s.attributes},
                            [e.name for e in s.events],
                            [(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                            s.status.code,
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            resource,
                            s.trace_state,
                        )
                    )
        with self._lock:
            self.spans += got
            self.requests += 1

    def wait(self, check, timeout: float = 15.0) -> list[Span]:
        """The spans once ``check(spans)`` holds (the exporter sends about once a second)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if check(spans) or time.monotonic() > end:
                return spans
            time.sleep(0.05)

    def close(self) -> None:
        if self.grpc_server is not None:
            self.grpc_server.stop(None)
            self._pool.shutdown(wait=False)
            return
        self.server.shutdown()
        self.server.server_close()
