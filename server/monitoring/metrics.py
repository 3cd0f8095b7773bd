"""Every Prometheus metric batchgate exports, defined in this one module.

Names start with ``batchgate_``; the Helm chart and the autoscaler read them, so
a rename here is a breaking change. Per-model metrics carry ``model`` and
``version``; request metrics also ``protocol`` (grpc | http) and ``status`` (OK
or the error code, e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 50 µs to 10 s: CPU models answer in well under a millisecond.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
MODEL = ("model", "version")


class Metrics:
    """One registry per gateway, so several gateways in one process (tests) do not clash."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "batchgate_requests", "Inference requests answered, by outcome",
            MODEL + ("protocol", "status"), registry=r)
        self.request_duration = Histogram(
            "batchgate_request_duration_seconds",
            "Time from a request's arrival at the gateway to its answer",
            MODEL + ("protocol",), buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_duration = Histogram(
            "batchgate_queue_duration_seconds", "Time a request waited in the scheduler queue",
            MODEL, buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute_duration = Histogram(
            "batchgate_compute_duration_seconds",
            "Time of one backend execution (input preparation, inference, output extraction)",
            MODEL, buckets=LATENCY_BUCKETS_S, registry=r)
        self.inferences = Counter(
            "batchgate_inference_count", "Inferences performed (a batch of n counts n)", MODEL, registry=r)
        self.executions = Counter(
            "batchgate_execution_count", "Backend executions (batches)", MODEL, registry=r)
        self.queue_depth = Gauge(
            "batchgate_queue_depth", "Requests accepted and waiting to execute", MODEL, registry=r)
        self.in_flight = Gauge(
            "batchgate_inflight_requests", "Requests accepted and not yet answered", MODEL, registry=r)
        self.model_ready = Gauge(
            "batchgate_model_ready", "1 when the model version is loaded and serving, else 0", MODEL, registry=r)
        self.model_load_duration = Gauge(
            "batchgate_model_load_duration_seconds", "Time the last load of the model version took",
            MODEL, registry=r)
        self._owners: dict[tuple[str, str], ModelMetrics] = {}
        self.model_load_failures = Counter(
            "batchgate_model_load_failures", "Model loads that failed", ("model",), registry=r)

    def bind(self, model: str, version: str) -> "ModelMetrics":
        """Children for one model version; a reload of the same version takes them over."""
        mm = ModelMetrics(self, model, version)
        self._owners[(model, version)] = mm
        return mm


class ModelMetrics:
    """The children of every per-model metric for one model version, looked up once."""

    def __init__(self, m: Metrics, model: str, version: str):
        self._m = m
        self.model, self.version = model, version
        self.queue = m.queue_duration.labels(model, version)
        self.compute = m.compute_duration.labels(model, version)
        self.inferences = m.inferences.labels(model, version)
        self.executions = m.executions.labels(model, version)
        self._per_protocol: dict[str, tuple] = {}
        self._requests: dict[tuple[str, str], Counter] = {}

    def track(self, queue_depth, in_flight) -> None:
        """Export live gauges read from callables (the scheduler's queue, the in-flight count)."""
        self._m.queue_depth.labels(self.model, self.version).set_function(queue_depth)
        self._m.in_flight.labels(self.model, self.version).set_function(in_flight)
        self._m.model_ready.labels(self.model, self.version).set(1)

    def loaded(self, seconds: float) -> None:
        self._m.model_load_duration.labels(self.model, self.version).set(seconds)

    def request_done(self, protocol: str, status: str, seconds: float) -> None:
        key = (protocol, status)
        c = self._requests.get(key)
        if c is None:
            c = self._requests[key] = self._m.requests.labels(self.model, self.version, protocol, status)
        c.inc()
        h = self._per_protocol.get(protocol)
        if h is None:
            h = self._per_protocol[protocol] = self._m.request_duration.labels(self.model, self.version, protocol)
        h.observe(seconds)

    def retired(self) -> None:
        """Stop exporting this version's gauges (counters stay, as Prometheus expects),
        unless a reload of the same version has taken them over."""
        if self._m._owners.get((self.model, self.version)) is not self:
            return
        del self._m._owners[(self.model, self.version)]
        for g in (self._m.queue_depth, self._m.in_flight):
            try:
                g.remove(self.model, self.version)
            except KeyError:
                pass
        self._m.model_ready.labels(self.model, self.version).set(0)
