"""Request tracing with OpenTelemetry, exported over OTLP/HTTP (setting ``tracing: otlp``).

Which requests are traced is decided here, before any OpenTelemetry object is made, so an
untraced request costs a header lookup and a random draw:

- a request that carries a valid W3C ``traceparent`` follows its caller's decision, the sampled
  flag (Triton traces every request with a context, whatever the flag; its users ask for the flag
  to be honoured: batchgate does);
- any other request is traced at the ratio in effect (``trace_sample_ratio``, 0.001 by default:
  the trace-id-ratio decision of a root, whose trace id is random);
- the trace extension (``/v2[/models/M]/trace/setting``, gRPC ``TraceSetting``) changes the level,
  rate and count at run time, for the server or one model: ``trace_level`` OFF stops tracing,
  ``trace_rate`` N traces one request in N, ``trace_count`` N traces N more and stops (-1: no
  limit).

The spans follow Triton's shape, so tools that read Triton's traces read these: a SERVER span
``InferRequest`` per request (events REQUEST_START, ADMITTED, REQUEST_END; the status), a child named
after the model (``triton.model_name``, ``triton.model_version``, ``triton.request_id``; events
QUEUE_START, COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END), and one
``compute`` span per batch execution, a child of its first traced request's model span, with a
**link** to the model span of every traced request it served (OpenTelemetry's answer for
batches). A remote model's call carries the compute span's ``traceparent`` to the upstream
(Triton continues the trace). Spans are queued for a batch span processor (a thread): when its
queue is full they are dropped and counted, and an exporter that cannot reach its collector never
slows a request (``batchgate_trace_spans_total{outcome}``).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from random import random
from typing import Any, cast
from urllib.parse import urlsplit

from ..core.types import printable
from .trace_context import MAX_TRACESTATE, TraceHeaders, trace_headers, valid_traceparent

log = logging.getLogger("batchgate.tracing")

LEVELS = ("OFF", "TIMESTAMPS")
MAX_TRACE_NUMBER = 2**31 - 1  # trace_rate and trace_count: Triton parses them as 32-bit integers
SETTING_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")


# The request spans started and not yet ended: a batch execution looks for traced requests among
# its own only while there are any (most batches hold none: tracing's default ratio is 0.001). Weak:
# a span whose request never reached finish() (a bug) leaves with its request.
LIVE: weakref.WeakSet = weakref.WeakSet()


class Policy:
    """What decides which requests are traced: the level, the rate (one in N; N need not be whole:
    ``trace_sample_ratio`` 0.7 is one in 1.43, each request traced with chance 1/N), the count left."""

    __slots__ = ("level", "rate", "count")

    def __init__(self, level: str, rate: float, count: int):
        self.level, self.rate, self.count = level, rate, count

    def as_triton(self, endpoint: str) -> dict[str, Any]:
        return {
            "trace_level": [self.level],
            "trace_rate": str(max(1, round(self.rate)) if self.rate else 0),  # (Triton's: a whole N)
            "trace_count": str(self.count),
            "log_frequency": "0",
            "trace_file": "",
            "trace_mode": "opentelemetry",
            "otlp_endpoint": endpoint,
        }


def parse_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """A trace settings request's changes, checked (values as Triton sends them: a string or a list
    of strings; None clears a model's own value): ValueError naming what is wrong."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in SETTING_KEYS:
            raise ValueError(f"unknown trace setting '{str(key)[:64]}'; known: {', '.join(SETTING_KEYS[:5])}")
        if value is None:
            out[key] = None
            continue
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else value
        if key == "trace_level":
            levels = value if isinstance(value, list) else [value]
            if not levels or any(not isinstance(x, str) or x.upper() not in (*LEVELS, "TENSORS") for x in levels):
                raise ValueError("trace_level is OFF or TIMESTAMPS")
            if any(x.upper() == "TENSORS" for x in levels):
                raise ValueError(
                    "trace_level TENSORS is not supported (tensors are never put in spans); use TIMESTAMPS"
                )
            if len(levels) > 1 and any(x.upper() == "OFF" for x in levels):  # (refused by Triton too)
                raise ValueError('trace_level OFF cannot be combined with another level: send ["OFF"] alone')
            out[key] = "TIMESTAMPS" if any(x.upper() == "TIMESTAMPS" for x in levels) else "OFF"
        elif key in ("trace_rate", "trace_count", "log_frequency"):
            text = str(value)
            if type(value) not in (str, int) or not re.fullmatch(r"-?[0-9]{1,64}", text):
                raise ValueError(f"{key} must be a whole number, not '{printable(text[:32])}'")
            n = int(text)
            if key == "trace_rate" and not 0 <= n <= MAX_TRACE_NUMBER:
                raise ValueError(
                    f"trace_rate must be from 0 to {MAX_TRACE_NUMBER} (one request in N; 0: only requests with "
                    f"a context), not {text[:32]}"
                )
            if key == "trace_count" and not -1 <= n <= MAX_TRACE_NUMBER:
                raise ValueError(f"trace_count must be from -1 (no limit) to {MAX_TRACE_NUMBER}, not {text[:32]}")
            if key == "log_frequency" and n != 0:
                raise ValueError("log_frequency applies to trace files; batchgate exports spans over OTLP: 0 only")
            if key != "log_frequency":
                out[key] = n
        elif key == "trace_file":
            if str(value):
                raise ValueError(
                    "trace_file cannot be set: spans go to the OTLP endpoint, never to a file a client names"
                )
        elif key == "trace_mode" and str(value).lower() != "opentelemetry":
            raise ValueError("trace_mode is opentelemetry (spans over OTLP) and cannot be changed")
    return out


class SpanCounts:
    """Spans handed to the batch processor, and what became of them (thread-safe)."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.queued = 0
        self.counts = {"exported": 0, "failed": 0, "dropped": 0}
        self.lock = threading.Lock()

    def throttled(self) -> None:
        """A request that would have been traced, past trace_max_per_s (no span made)."""
        with self.lock:
            self.counts["throttled"] = self.counts.get("throttled", 0) + 1


class Tracing:
    """The tracer, its export pipeline and the sampling policy of a gateway (None when off)."""

    def __init__(
        self,
        endpoint: str,
        ratio: float,
        service_name: str,
        queue_size: int = 2048,
        export_timeout_s: float = 5.0,
        worker: str | None = None,
        max_per_s: int = 100,
        protocol: str = "http/protobuf",
    ):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        from .. import __version__

        self.endpoint = endpoint
        # OpenTelemetry asks service.instance.id to be unique among a service's instances: the host
        # (the pod's name in Kubernetes), and the worker process there. It was the worker's name
        # alone ("worker 0" in every pod, none without workers) until 2026-12-06, so the spans of
        # different replicas could not be told apart.
        host = socket.gethostname()
        attrs = {"service.name": service_name, "service.version": __version__, "host.name": host}
        attrs["service.instance.id"] = host if worker is None else f"{host}/{worker}"
        self.counts = SpanCounts(queue_size)
        try:
            inner = _exporter(endpoint, protocol, export_timeout_s)
        except Exception as e:  # noqa: BLE001 - e.g. the SDK's OTEL_* settings: said at start, not as a traceback
            raise ValueError(f"tracing: the OTLP exporter cannot be made: {e}") from None
        exporter = self._exporter = _Counting(inner, self.counts, redacted(endpoint))
        self.export_timeout_s = export_timeout_s
        # The decision is made before a span exists (see the module): the SDK keeps what it is given.
        self.provider = TracerProvider(resource=Resource.create(attrs), sampler=ALWAYS_ON)
        # (_Counting and _Gate have the SDK's exporter and processor methods; they are not its
        # subclasses so that the SDK is imported only when tracing is on)
        batch = BatchSpanProcessor(
            cast(Any, exporter),
            max_queue_size=queue_size,
            max_export_batch_size=min(512, queue_size),
            schedule_delay_millis=1000,
        )
        self.provider.add_span_processor(cast(Any, _Gate(batch, self.counts)))
        self.tracer = self.provider.get_tracer("batchgate", __version__)
        rate = 0.0 if ratio <= 0 else max(1.0, 1 / ratio)  # exact: 0.7 traces 7 in 10, not every request
        self.policy = Policy("TIMESTAMPS", rate, -1)
        self.started = Policy("TIMESTAMPS", rate, -1)  # what a null clears a server setting back to
        self.models: dict[str, dict[str, Any]] = {}  # a model's own settings (over the server's)
        # A collector down is counted (batchgate_trace_spans_total), not logged per batch; a client's
        # malformed tracestate is dropped, not quoted in a warning per request.
        for noisy in ("opentelemetry.sdk._shared_internal", "opentelemetry.exporter", "opentelemetry.trace"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        self.max_per_s = max_per_s
        self._bucket = float(max_per_s)
        self._stamp = time.monotonic()

    # ------------------------------------------------------------------ the decision
    def _policy(self, model: str) -> Policy:
        own = self.models.get(model)
        if not own:
            return self.policy
        p = self.policy
        return Policy(own.get("trace_level", p.level), own.get("trace_rate", p.rate), own.get("trace_count", p.count))

    def begin(self, model: str, traceparent: str | None, tracestate: str | None, protocol: str, start: float) -> Any:
        """The request's SERVER span when it is traced, else None. ``start``: its arrival on the
        perf_counter clock."""
        own = self.models.get(model)
        policy = self.policy if own is None else self._policy(model)
        if policy.level == "OFF" or policy.count == 0:
            return None
        valid, sampled = valid_traceparent(traceparent)
        if valid:
            if not sampled:
                return None
        elif policy.rate == 0 or (policy.rate > 1 and random() * policy.rate >= 1.0):
            return None
        if not self._take():  # past trace_max_per_s (a caller's sampled flag cannot buy every request a trace)
            self.counts.throttled()
            return None
        if policy.count > 0:  # a count left: this trace takes one
            if own is not None and "trace_count" in own:
                own["trace_count"] -= 1
            else:
                self.policy.count -= 1
        return self._start(model, traceparent if valid else None, tracestate, protocol, start)

    def _take(self) -> bool:
        now = time.monotonic()
        self._bucket = min(float(self.max_per_s), self._bucket + (now - self._stamp) * self.max_per_s)
        self._stamp = now
        if self._bucket < 1.0:
            return False
        self._bucket -= 1.0
        return True

    def _start(self, model: str, traceparent: str | None, tracestate: str | None, protocol: str, start: float) -> Any:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        ctx = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent}
            if tracestate and len(tracestate) <= MAX_TRACESTATE:
                carrier["tracestate"] = tracestate
            ctx = TraceContextTextMapPropagator().extract(carrier)
        t = perf_to_epoch_ns(start)
        span = self.tracer.start_span(
            "InferRequest",
            context=ctx,
            kind=SpanKind.SERVER,
            start_time=t,
            attributes={"batchgate.model": model[:128], "batchgate.protocol": protocol},
        )
        span.add_event("REQUEST_START", timestamp=t)
        LIVE.add(span)
        return span

    def finish(self, span: Any, note: Any, status: str | int, error: str) -> None:
        """End a request's span with what its answer was."""
        from opentelemetry.trace import Status, StatusCode

        if note.version:
            span.set_attribute("batchgate.model.version", note.version[:64])
        if note.variant:
            span.set_attribute("batchgate.variant", note.variant[:128])
        if note.request_id:
            span.set_attribute("batchgate.request.id", note.request_id[:128])
        if isinstance(status, int):
            span.set_attribute("http.response.status_code", status)
        else:
            span.set_attribute("rpc.response.status_code", status)
        if error:
            span.set_attribute("error.type", error)
            if server_fault(status):  # (a caller's own mistake leaves a SERVER span's status unset)
                span.set_status(Status(StatusCode.ERROR, error))
        now = time.time_ns()
        span.add_event("REQUEST_END", timestamp=now)
        span.end(end_time=now)
        LIVE.discard(span)

    # ------------------------------------------------------------------ batches

    # ------------------------------------------------------------------ shadows
    def shadow_span(self, root: Any, route: str, shadow: str, model: str) -> Any:
        """A span for a traced request's copy sent to a shadow (a child of its request's span;
        it may end after it: shadows answer later), from the copy's offer to its comparison."""
        from opentelemetry.trace import set_span_in_context

        return self.tracer.start_span(
            "shadow",
            context=set_span_in_context(root),
            attributes={"batchgate.route": route, "batchgate.variant": shadow, "batchgate.model": model},
        )

    @staticmethod
    def end_shadow(span: Any, outcome: str, disagreed: bool | None = None, error: str = "") -> None:
        span.set_attribute("batchgate.shadow.outcome", outcome)
        if disagreed is not None:
            span.set_attribute("batchgate.shadow.disagreed", disagreed)
        if error:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", "shadow_failed")
            span.set_status(Status(StatusCode.ERROR, error[:256]))
        span.end()

    # ------------------------------------------------------------------ the trace extension
    def settings(self, model: str = "") -> dict[str, Any]:
        return (self._policy(model) if model else self.policy).as_triton(self.endpoint)

    def change(self, model: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply checked changes (``parse_changes``) to the server's settings or a model's own."""
        if not model:
            p = self.policy
            for key, value in changes.items():
                if value is None:  # cleared: the server's setting goes back to its value at start, as on Triton
                    value = getattr(self.started, key.removeprefix("trace_"), None)
                if key == "trace_level":
                    p.level = value
                elif key == "trace_rate":
                    p.rate = value
                elif key == "trace_count":
                    p.count = value
            return self.settings()
        own = dict(self.models.get(model, {}))
        for key, value in changes.items():
            if key not in ("trace_level", "trace_rate", "trace_count"):
                continue
            if value is None:
                own.pop(key, None)
            else:
                own[key] = value
        if own:
            self.models[model] = own
        else:
            self.models.pop(model, None)
        return self.settings(model)

    def close(self) -> None:
        """Export what is queued, for at most the exporter's timeout: past it the rest is counted
        ``failed`` unsent. The batch processor exports its queue a batch at a time on shutdown,
        each export waiting up to that timeout, so a collector that hangs held a stopping gateway
        for as many timeouts as the queue had batches (four of a full queue: 18 s)."""
        self._exporter.deadline = time.monotonic() + self.export_timeout_s
        closing = threading.Thread(target=self.provider.shutdown, name="batchgate-trace-close", daemon=True)
        closing.start()
        closing.join(self.export_timeout_s)  # (an export still waiting ends within its own timeout)


def batch_trace(requests: Sequence[Any], model: str, version: str) -> BatchTrace | None:
    """A batch execution's spans, when any of its requests is traced (``requests``: the batch's
    InferRequests); None otherwise (and at once while no request span is open)."""
    if not LIVE:
        return None
    roots = []
    tracing = None
    for r in requests:
        note = r.note
        if note is not None and note.span is not None:
            roots.append((r, note.span))
            tracing = note.tracing
    if tracing is None:
        return None
    return BatchTrace(tracing.tracer, roots, model, version, len(requests))


class BatchTrace:
    """One batch execution's spans: each traced request's model span and the batch's compute span
    (started when the execution starts, ended by :meth:`finish`)."""

    def __init__(self, tracer: Any, roots: list[tuple[Any, Any]], model: str, version: str, requests: int):
        from opentelemetry.trace import Link, set_span_in_context

        self.t0 = time.time_ns()
        self.spans = []
        for request, root in roots:
            ms = tracer.start_span(
                model,
                context=set_span_in_context(root),
                start_time=monotonic_to_epoch_ns(request.arrival),
                attributes={
                    "triton.model_name": model,
                    "triton.model_version": version,
                    "triton.request_id": request.id[:128],
                },
            )
            ms.add_event("QUEUE_START", timestamp=monotonic_to_epoch_ns(request.arrival))
            ms.add_event("COMPUTE_START", timestamp=self.t0)
            self.spans.append(ms)
        self.compute = tracer.start_span(
            "compute",
            context=set_span_in_context(self.spans[0]),
            start_time=self.t0,
            links=[Link(ms.get_span_context()) for ms in self.spans],
            attributes={"batchgate.batch.requests": requests, "batchgate.model": model},
        )

    def headers(self) -> TraceHeaders:
        return trace_headers(self.compute)

    def finish(self, t0: int, t1: int, t2: int, t3: int, rows: int, error: str = "") -> None:
        """The execution's phases on the perf_counter_ns clock (input ready, inference done,
        outputs split) and its rows; ``error``: why it failed."""
        offset = time.time_ns() - time.perf_counter_ns()
        c = self.compute
        c.set_attribute("batchgate.batch_size", rows)
        if t1:
            c.add_event("COMPUTE_INPUT_END", timestamp=t1 + offset)
        if t2:
            c.add_event("COMPUTE_OUTPUT_START", timestamp=t2 + offset)
        end = (t3 + offset) if t3 else time.time_ns()
        if error:
            from opentelemetry.trace import Status, StatusCode

            c.set_status(Status(StatusCode.ERROR, error[:256]))
        c.end(end_time=end)
        for ms in self.spans:
            if t1:
                ms.add_event("COMPUTE_INPUT_END", timestamp=t1 + offset)
            if t2:
                ms.add_event("COMPUTE_OUTPUT_START", timestamp=t2 + offset)
            ms.add_event("COMPUTE_END", timestamp=end)
            ms.end(end_time=end)


# The gRPC codes a server span counts as its own failure (OpenTelemetry's RPC conventions); the
# others (INVALID_ARGUMENT, NOT_FOUND, CANCELLED, RESOURCE_EXHAUSTED...) are the caller's to mind.
GRPC_SERVER_FAULTS = frozenset(
    ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)


def server_fault(status: str | int) -> bool:
    """Whether a request answered with ``status`` (an HTTP status, or a gRPC status name) failed
    on the server's side: 5xx, or a gRPC code of :data:`GRPC_SERVER_FAULTS`. OpenTelemetry's
    conventions leave a SERVER span's status unset for the rest (HTTP 4xx), so that what keeps
    error traces (a Collector's tail sampling on status) keeps the server's failures, not every
    malformed request a client sends."""
    return status >= 500 if isinstance(status, int) else status in GRPC_SERVER_FAULTS


def perf_to_epoch_ns(t: float) -> int:
    return time.time_ns() - int((time.perf_counter() - t) * 1e9)


def monotonic_to_epoch_ns(t: float) -> int:
    return time.time_ns() - int((time.monotonic() - t) * 1e9)


class _Gate:
    """In front of the batch processor: a span is queued only while the queue has room, else it
    is dropped and counted (the SDK's own processor would log a warning for each)."""

    def __init__(self, inner: Any, counts: SpanCounts):
        self.inner, self.counts = inner, counts

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def _on_ending(self, span: Any) -> None:
        pass

    def on_end(self, span: Any) -> None:
        c = self.counts
        with c.lock:
            if c.queued >= c.max_queue:
                c.counts["dropped"] += 1
                return
            c.queued += 1
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Counting:
    """The OTLP exporter, counting what it exported and what it failed to."""

    def __init__(self, inner: Any, counts: SpanCounts, endpoint: str = ""):
        self.inner, self.counts, self.endpoint = inner, counts, endpoint
        self._said = False
        self.deadline: float | None = None  # set on close: spans left after it are not sent

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            late = self.deadline is not None and time.monotonic() >= self.deadline
            result = SpanExportResult.FAILURE if late else self.inner.export(spans)
        except Exception as e:  # noqa: BLE001 - an exporter's failure is counted, never raised into the SDK
            log.debug("span export failed: %s", e)
            result = SpanExportResult.FAILURE
        if result != SpanExportResult.SUCCESS and not self._said:  # (the SDK's own warnings are silenced)
            self._said = True
            log.warning(
                "spans could not be exported to %s (a collector down, a TLS or address mistake?); "
                'counted from now on in batchgate_trace_spans_total{outcome="failed"}',
                self.endpoint,
            )
        c = self.counts
        with c.lock:
            c.queued -= len(spans)
            c.counts["exported" if result == SpanExportResult.SUCCESS else "failed"] += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _exporter(endpoint: str, protocol: str, timeout_s: float) -> Any:
    """The SDK's OTLP span exporter for ``protocol``: over HTTP spans are POSTed to
    ``endpoint``/v1/traces; over gRPC the endpoint's scheme says whether the channel uses TLS
    (https://, system roots or OTEL_EXPORTER_OTLP_CERTIFICATE) or not (http://)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"), timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    return OTLPSpanExporter(endpoint=url, timeout=timeout_s)


def redacted(url: str) -> str:
    """``url`` as it may be quoted in a message or a log line: without credentials, cut short."""
    return re.sub(r"//[^/@\s]*@", "//***@", url)[:96]


def checked_endpoint(url: str, protocol: str) -> str:
    """The collector's address as the exporter takes it, or ValueError naming what is wrong: an
    http:// or https:// URL with a host, no credentials, query or fragment; over gRPC no path,
    and port 4317 when none is given (gRPC would dial 443)."""
    example = "http://collector:4317 with otlp_protocol: grpc" if protocol == "grpc" else "http://collector:4318"
    if not url:
        raise ValueError(f"tracing: otlp needs otlp_endpoint, an http:// or https:// URL (e.g. {example})")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        u, port = None, None
    if u is None or u.scheme not in ("http", "https") or not u.hostname or any(c.isspace() for c in url):
        raise ValueError(
            f"otlp_endpoint must be an http:// or https:// URL with a host (e.g. {example}), not '{redacted(url)}'"
        )
    if u.username is not None or u.password is not None or u.query or u.fragment:
        raise ValueError(f"otlp_endpoint takes no credentials, query or fragment: '{redacted(url)}'")
    if protocol != "grpc":
        return url
    if u.path not in ("", "/"):
        raise ValueError(f"otlp_protocol: grpc takes an endpoint without a path ({example}), not '{redacted(url)}'")
    return f"{u.scheme}://{u.netloc}" if port is not None else f"{u.scheme}://{u.netloc}:4317"


def open_tracing(settings: Any, worker: str | None = None) -> Tracing | None:
    """The tracing the settings ask for (None: off). ``settings``: the observability section."""
    if settings.tracing == "off":
        return None
    return Tracing(
        checked_endpoint(settings.otlp_endpoint, settings.otlp_protocol),
        settings.trace_sample_ratio,
        settings.service_name,
        settings.trace_queue_spans,
        worker=worker,
        max_per_s=settings.trace_max_per_s,
        protocol=settings.otlp_protocol,
    )
