"""Every Prometheus metric batchgate exports, defined in this one module.

Names start with ``batchgate_``; the Helm chart and the autoscaler read them, so
a rename here is a breaking change. Per-model metrics carry ``model`` and
``version``; request metrics also ``protocol`` (grpc | http) and ``status`` (OK
or the error code, e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED).

The hot path only adds to plain integers and bucket lists (a fraction of a
microsecond); a collector turns them into Prometheus families when
``/metrics`` is scraped. prometheus-client's own metric objects take a lock on
every update, which ``bench/serving.py`` showed costing several percent of
throughput at five updates per request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Latency buckets from 50 µs to 10 s: CPU models answer in well under a millisecond.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_LE = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL = ["model", "version"]

# name, type, help, extra labels
FAMILIES = {
    "batchgate_requests": ("counter", "Inference requests answered, by outcome", ["protocol", "status"]),
    "batchgate_request_duration_seconds": (
        "histogram", "Time from a request's arrival at the gateway to its answer", ["protocol"]),
    "batchgate_queue_duration_seconds": ("histogram", "Time a request waited in the scheduler queue", []),
    "batchgate_compute_duration_seconds": (
        "histogram", "Time of one backend execution (input preparation, inference, output extraction)", []),
    "batchgate_inference_count": ("counter", "Inferences performed (a batch of n counts n)", []),
    "batchgate_execution_count": ("counter", "Backend executions (batches)", []),
    "batchgate_queue_depth": ("gauge", "Requests accepted and waiting to execute", []),
    "batchgate_queue_oldest_age_seconds": (
        "gauge", "How long the longest-waiting queued request has waited (0 when the queue is empty)", []),
    "batchgate_batch_size": ("histogram", "Rows per backend execution", []),
    "batchgate_refusals": (
        "counter", "Requests a scheduler turned away or dropped unexecuted, by reason "
        "(queue_full, deadline_unmeetable, deadline_expired, queue_timeout)", ["reason"]),
    "batchgate_inflight_requests": ("gauge", "Requests accepted and not yet answered", []),
    "batchgate_model_ready": ("gauge", "1 when the model version is loaded and serving, else 0", []),
    "batchgate_model_load_duration_seconds": ("gauge", "Time the last load of the model version took", []),
}
LOAD_FAILURES = ("batchgate_model_load_failures", "Model loads that failed")
# Remote models (backends/remote.py): one series per model and upstream address.
UPSTREAM = ["model", "upstream"]
UPSTREAM_FAMILIES = {
    "batchgate_upstream_requests": ("counter", "Calls sent to an upstream V2 server", []),
    "batchgate_upstream_errors": ("counter", "Upstream calls that failed, by gRPC status code", ["code"]),
    "batchgate_upstream_request_duration_seconds": ("histogram", "Time of one upstream call", []),
    "batchgate_upstream_ejections": (
        "counter", "Times the upstream was taken out of rotation after consecutive failures", []),
    "batchgate_upstream_outstanding": ("gauge", "Calls sent to the upstream and not yet answered", []),
    "batchgate_upstream_healthy": ("gauge", "1 while the upstream is in rotation (ready, not ejected), else 0", []),
}


_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


def _families(specs: dict, labels: list[str]) -> dict:
    """Empty Prometheus families for a table of (kind, help, extra labels) by name."""
    return {name: _KINDS[kind](name, doc, labels=labels + extra) for name, (kind, doc, extra) in specs.items()}


class Histogram:
    """Bucket counts and a sum; ``observe`` is one bisect and two additions."""

    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, n in zip(_LE, self.counts):
            total += n
            out.append((le, total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class ModelMetrics:
    """The figures of one model version. Request figures are updated on the event loop;
    execution figures in worker threads, under the model's statistics lock."""

    def __init__(self, model: str, version: str):
        self.model, self.version = model, version
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.queue = Histogram()
        self.compute = Histogram()
        self.inferences = 0
        self.executions = 0
        self.batch_rows: dict[int, int] = {}  # rows per execution -> executions
        self.refusals: dict[str, int] = {}
        self.ready = 0
        self.load_seconds: float | None = None
        self._queue_depth: Callable[[], int] | None = None
        self._in_flight: Callable[[], int] | None = None
        self._oldest_age: Callable[[], float] | None = None
        self._ready: Callable[[], bool] | None = None
        self._owner: object = None

    def track(self, owner: object, queue_depth: Callable[[], int], in_flight: Callable[[], int],
              oldest_age: Callable[[], float], ready: Callable[[], bool] | None = None) -> None:
        """Export live gauges read from ``owner`` (a served model version) from now on;
        ``ready`` is asked at each scrape where readiness can change while loaded."""
        self._owner = owner
        self._queue_depth, self._in_flight, self._oldest_age = queue_depth, in_flight, oldest_age
        self._ready = ready
        self.ready = 1

    def retired(self, owner: object) -> None:
        """Stop the gauges, unless a reload of the same version has taken them over."""
        if self._owner is owner:
            self._owner = self._queue_depth = self._in_flight = self._oldest_age = self._ready = None
            self.ready = 0

    def request_done(self, protocol: str, status: str, seconds: float) -> None:
        key = (protocol, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.durations.get(protocol)
        if h is None:
            h = self.durations[protocol] = Histogram()
        h.observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


class UpstreamMetrics:
    """The figures of one upstream of one remote model (updated on the event loop)."""

    def __init__(self):
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.latency = Histogram()
        self.ejections = 0
        self.outstanding = 0
        self.healthy = 0
        self.owner: object = None  # the connection that reports the gauges now


class Metrics:
    """One registry per gateway, so several gateways in one process (tests) do not clash."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._load_failures: dict[str, int] = {}
        self._upstreams: dict[tuple[str, str], UpstreamMetrics] = {}
        self.registry.register(self)

    def upstream(self, model: str, address: str) -> UpstreamMetrics:
        """The figures of one upstream of a remote model; a reload continues them."""
        key = (model, address)
        um = self._upstreams.get(key)
        if um is None:
            um = self._upstreams[key] = UpstreamMetrics()
        return um

    def bind(self, model: str, version: str) -> ModelMetrics:
        """The figures of one model version; a reload of the same version continues them."""
        key = (model, version)
        mm = self._models.get(key)
        if mm is None:
            mm = self._models[key] = ModelMetrics(model, version)
        return mm

    def load_failed(self, model: str) -> None:
        self._load_failures[model] = self._load_failures.get(model, 0) + 1

    # prometheus_client collector protocol -------------------------------------------
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        fams = _families(FAMILIES, MODEL)
        for (model, version), m in list(self._models.items()):
            mv = [model, version]
            for (protocol, status), n in list(m.requests.items()):
                fams["batchgate_requests"].add_metric(mv + [protocol, status], n)
            for protocol, h in list(m.durations.items()):
                fams["batchgate_request_duration_seconds"].add_metric(mv + [protocol], h.cumulative(), h.sum)
            fams["batchgate_queue_duration_seconds"].add_metric(mv, m.queue.cumulative(), m.queue.sum)
            fams["batchgate_compute_duration_seconds"].add_metric(mv, m.compute.cumulative(), m.compute.sum)
            fams["batchgate_inference_count"].add_metric(mv, m.inferences)
            fams["batchgate_execution_count"].add_metric(mv, m.executions)
            ready = m._ready
            fams["batchgate_model_ready"].add_metric(mv, int(ready()) if m.ready and ready is not None else m.ready)
            depth, inflight, oldest = m._queue_depth, m._in_flight, m._oldest_age
            if depth is not None and inflight is not None and oldest is not None:
                fams["batchgate_queue_depth"].add_metric(mv, depth())
                fams["batchgate_inflight_requests"].add_metric(mv, inflight())
                fams["batchgate_queue_oldest_age_seconds"].add_metric(mv, oldest())
            for reason, n in list(m.refusals.items()):
                fams["batchgate_refusals"].add_metric(mv + [reason], n)
            rows_seen = dict(m.batch_rows)
            buckets = [(str(b), sum(n for r, n in rows_seen.items() if r <= b)) for b in BATCH_BUCKETS]
            buckets.append(("+Inf", sum(rows_seen.values())))
            fams["batchgate_batch_size"].add_metric(mv, buckets, sum(r * n for r, n in rows_seen.items()))
            if m.load_seconds is not None:
                fams["batchgate_model_load_duration_seconds"].add_metric(mv, m.load_seconds)
        failures = CounterMetricFamily(LOAD_FAILURES[0], LOAD_FAILURES[1], labels=["model"])
        for model, n in list(self._load_failures.items()):
            failures.add_metric([model], n)
        yield from fams.values()
        yield failures
        yield from self._collect_upstreams()

    def _collect_upstreams(self) -> Iterator:
        fams = _families(UPSTREAM_FAMILIES, UPSTREAM)
        for (model, address), u in list(self._upstreams.items()):
            lv = [model, address]
            fams["batchgate_upstream_requests"].add_metric(lv, u.requests)
            for code, n in list(u.errors.items()):
                fams["batchgate_upstream_errors"].add_metric(lv + [code], n)
            fams["batchgate_upstream_request_duration_seconds"].add_metric(lv, u.latency.cumulative(), u.latency.sum)
            fams["batchgate_upstream_ejections"].add_metric(lv, u.ejections)
            fams["batchgate_upstream_outstanding"].add_metric(lv, u.outstanding)
            fams["batchgate_upstream_healthy"].add_metric(lv, u.healthy)
        yield from fams.values()
