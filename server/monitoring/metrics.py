"""Every Prometheus metric batchgate exports: the figures, their snapshot and rendering (the
family table itself, names, labels and buckets, is ``families.py``).

The hot path only adds to plain integers and bucket lists (a fraction of a
microsecond); a collector turns them into Prometheus families when
``/metrics`` is scraped. prometheus-client's own metric objects take a lock on
every update, which ``bench/serving.py`` showed costing several percent of
throughput at five updates per request.

Everything a process holds is read as one :class:`Snapshot` (plain data); ``/metrics``
renders a snapshot, and snapshots of several processes add up with
:meth:`Snapshot.merge`, each family by the rule the :data:`FAMILIES` table declares:
counters and histograms are summed (and, kept for a process that has gone, never go
backwards), gauges are summed, maxed or and-ed according to what they mean.

:meth:`Metrics.exposition` is the text ``/metrics`` serves: one snapshot rendered as the
batchgate families, then the process collectors (``process_*``, ``python_*``), then, with
``triton_metrics``, Triton's ``nv_inference_*`` families (``triton.py``) from the same snapshot.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.registry import Collector

from ..core.rate import LineBudget
from ..core.stats import FAIL, ModelStats
from .families import (  # noqa: F401  (the table is part of this module's interface)
    BATCH_BUCKETS,
    DELTA_BUCKETS,
    DRIFT_LAG_BUCKETS_S,
    FAMILIES,
    LATENCY_BUCKETS_S,
    LATENCY_DELTA_BUCKETS_S,
    MAX,
    ROLLOUT_STATE_CODES,
    SUM,
    Family,
)
from .snapshot import (  # noqa: F401  (part of this module's interface)
    HistValue,
    Labels,
    RuntimeFamily,
    Snapshot,
    _Scrape,
    by_worker,
    exposition,
    render,
)
from .triton import OTHER, STATUS_REASONS


class Histogram:
    """Bucket counts and a sum; ``observe`` is one bisect and two additions."""

    __slots__ = ("counts", "sum", "buckets")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` observations of ``seconds``."""
        self.counts[bisect_left(self.buckets, seconds)] += n
        self.sum += seconds * n

    def value(self) -> HistValue:
        return tuple(self.counts), self.sum

    @property
    def count(self) -> int:
        return sum(self.counts)


class ModelMetrics:
    """The figures of one model version. Request figures are updated on the event loop;
    execution figures in worker threads, under the model's statistics lock."""

    def __init__(
        self,
        model: str,
        version: str,
        duration_buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
        failure_lines: LineBudget | None = None,
    ):
        self.model, self.version = model, version
        # the log lines of its failed executions: its gateway's budget, shared by all its models
        self.failure_lines = failure_lines if failure_lines is not None else LineBudget(100)
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.duration_buckets = duration_buckets
        self.queue = Histogram()
        self.compute = Histogram()
        self.inferences = 0
        self.executions = 0
        self.batch_rows: dict[int, int] = {}  # rows per execution -> executions
        self.refusals: dict[str, int] = {}
        self.forwards: dict[str, int] = {}  # a remote model's requests by path: raw | decoded
        self.ready = 0
        self.load_seconds: float | None = None
        self._queue_depth: Callable[[], int] | None = None
        self._in_flight: Callable[[], int] | None = None
        self._oldest_age: Callable[[], float] | None = None
        self._ready: Callable[[], bool] | None = None
        self._owner: object = None
        self.stats: ModelStats | None = None  # the V2 statistics of the version now tracked
        self.failures: dict[str, int] = {}  # its failed requests by Triton reason (not OTHER), since tracked

    def track(
        self,
        owner: object,
        stats: ModelStats,
        queue_depth: Callable[[], int],
        in_flight: Callable[[], int],
        oldest_age: Callable[[], float],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Export live gauges read from ``owner`` (a served model version) from now on;
        ``ready`` is asked at each scrape where readiness can change while loaded."""
        self._owner = owner
        self.stats = stats
        self._queue_depth, self._in_flight, self._oldest_age = queue_depth, in_flight, oldest_age
        self._ready = ready
        self.ready = 1
        self.failures = {}  # a new version's statistics start at zero: so do its reasons

    def retired(self, owner: object) -> None:
        """Stop the gauges, unless a reload of the same version has taken them over."""
        if self._owner is owner:
            self._owner = self._queue_depth = self._in_flight = self._oldest_age = self._ready = None
            self.stats = None
            self.ready = 0

    def is_ready(self) -> int:
        ready = self._ready
        return int(ready()) if self.ready and ready is not None else self.ready

    def gauges(self) -> tuple[int, int, float] | None:
        """Queue depth, requests in flight, oldest queued age; None once retired."""
        depth, inflight, oldest = self._queue_depth, self._in_flight, self._oldest_age
        if depth is None or inflight is None or oldest is None:
            return None
        return depth(), inflight(), oldest()

    def request_done(self, protocol: str, status: str, seconds: float, weight: int = 1) -> None:
        """One answered call; ``weight``: the client requests it stands for (a front worker's
        call to the model owner), which Triton's failure reasons count, as the statistics do."""
        key = (protocol, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status != "OK":
            reason = STATUS_REASONS.get(status)
            if reason is not None:
                self.failures[reason] = self.failures.get(reason, 0) + weight
        h = self.durations.get(protocol)
        if h is None:
            h = self.durations[protocol] = Histogram(self.duration_buckets)
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


class ShadowMetrics:
    """The comparison figures of one shadow of one route (updated on the event loop)."""

    def __init__(self):
        self.outcomes: dict[str, int] = {}
        self.agreements = 0
        self.rows = 0
        self.flips = 0
        self.delta = Histogram(DELTA_BUCKETS)
        self.latency_delta = Histogram(LATENCY_DELTA_BUCKETS_S)
        self.error_delta: dict[str, int] = {}

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


class RouteMetrics:
    """The figures of one route: answers by variant, weights and rollout gauges, its shadows."""

    def __init__(self):
        self.requests: dict[tuple[str, str], int] = {}
        self.weights: dict[str, int] = {}
        self.rollout_state = 0
        self.canary_percent: float | None = None
        self.shadows: dict[str, ShadowMetrics] = {}
        self.failures: dict[str, int] = {}  # failed answers by Triton reason (not OTHER), since the route began
        # The route's statistics start again when its definition changes (a new served route), these
        # figures do not: the statistics object last seen, the failures counted before it, and the
        # reasons of the latest failures (OTHER too), to tell which of them are the new statistics'.
        self.stats_seen: object = None
        self.failures_before: dict[str, int] = {}
        self.recent: deque[str] = deque(maxlen=256)
        self.variants: frozenset[str] | None = None  # the route's variants now (None: any)

    def keep(self, variants: Collection[str], shadows: Collection[str]) -> None:
        """The route's definition now: the series of variants and shadows it no longer has go, as
        a removed route's do (a new name each release would grow /metrics for ever)."""
        self.variants = frozenset(variants)
        self.requests = {k: n for k, n in list(self.requests.items()) if k[0] in self.variants}
        self.shadows = {k: sm for k, sm in list(self.shadows.items()) if k in shadows}

    def answered(self, variant: str, status: str) -> None:
        if self.variants is not None and variant not in self.variants:
            return  # (a request still in flight on a variant the route no longer has)
        key = (variant, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status != "OK":
            reason = STATUS_REASONS.get(status, OTHER)
            self.recent.append(reason)
            if reason != OTHER:
                self.failures[reason] = self.failures.get(reason, 0) + 1

    def failures_of(self, stats: ModelStats) -> dict[str, int]:
        """The failures by reason that belong to ``stats``, the route's statistics now (read at a
        scrape: when they are new, the newest failures, as many as they count, are theirs)."""
        if self.stats_seen is not stats:
            before = {}
            if self.stats_seen is not None:
                before = dict(self.failures)
                owned = stats.totals[FAIL]
                for reason in list(self.recent)[-owned:] if owned else ():
                    if reason in before:
                        before[reason] -= 1
            self.failures_before, self.stats_seen = before, stats
        before = self.failures_before
        return {r: n - before.get(r, 0) for r, n in list(self.failures.items())}

    def shadow(self, name: str) -> ShadowMetrics:
        sm = self.shadows.get(name)
        if sm is None:
            sm = self.shadows[name] = ShadowMetrics()
        return sm


class DriftMetrics:
    """The figures of one drift monitor. The gateway's reader thread writes them (whole values,
    replaced per window), the scrape reads them."""

    def __init__(self):
        self.scores: dict[tuple[str, str], float] = {}
        self.detected: dict[str, int] = {}
        self.quality: dict[tuple[str, str], int] = {}
        self.active = 0
        self.drifted = 0
        self.detections = 0
        self.samples: dict[str, int] = {"used": 0, "dropped": 0, "invalid": 0}
        self.windows = 0
        self.window_seconds: float | None = None
        self.lag = Histogram(DRIFT_LAG_BUCKETS_S)


class DetectorMetrics:
    """The drift detector process and its events, one per gateway."""

    def __init__(self):
        self.queue_depth: Callable[[], int] = lambda: 0
        self.events: dict[str, int] = {}
        self.dead_letter = 0
        self.up = 0
        self.restarts = 0
        self.cpu_seconds = 0.0


class Metrics:
    """One registry per gateway, so several gateways in one process (tests) do not clash.

    A registry made here also holds prometheus_client's process, platform and GC collectors
    (``process_*``, ``python_*``); a registry handed in is the caller's to fill."""

    def __init__(self, registry: CollectorRegistry | None = None, triton: bool = True):
        own = registry is None
        self.registry = registry or CollectorRegistry()
        self.triton = triton  # Triton's nv_inference_* families too (setting triton_metrics)
        # The statistics of the routes (served as models); the gateway sets it when it has routes.
        self.route_stats: Callable[[], Iterable[ModelStats]] | None = None
        self.shm: Any = None  # the registered shared-memory regions (shm.SharedMemory); the gateway sets it
        self.unsent: Any = None  # the process's unsent answer bytes (byte_budget.UnsentAnswers); the gateway sets it
        # the request-duration buckets (families.latency_buckets: a latency SLO's threshold among them)
        self.duration_buckets: tuple[float, ...] = LATENCY_BUCKETS_S
        self.tracing: Any = None  # the request tracing (tracing.Tracing), when it is on; the gateway sets it
        self.access_log: Any = None  # the access log (access_log.AccessLog), when it is on; the gateway sets it
        self.audit_refused: Any = None  # the bound on audit records of refused attempts (audit.RefusedRecords)
        self.tls: Any = None  # TLS (tls.ServerTls), when on; the gateway sets it
        # (file label, what watches it: its reload_failures), the leader process's only; the gateway sets it
        self.watched_files: list[tuple[str, Any]] = []
        self.stalls: Any = None  # loop-lag and collector-pause histograms (runtime.RuntimeStalls); the gateway sets it
        # the budgets of failure log lines ("request ... failed", a model's "failed to execute"), each a
        # core.rate.LineBudget counting the lines it left out. The models' own (the gateway sets its
        # limit and adds its dataplane's budget to the list):
        self.model_failure_lines = LineBudget(100)
        self.failure_budgets: list[Any] = [self.model_failure_lines]
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._load_failures: dict[str, int] = {}
        self._request_errors: dict[tuple[str, str, str], int] = {}
        self._offline: dict[str, int] = {}  # requests marked x-batchgate-offline, per model or route
        self._connections_refused: dict[str, int] = {}
        self._upstreams: dict[tuple[str, str], UpstreamMetrics] = {}
        self._routes: dict[str, RouteMetrics] = {}
        self.routes_reloads: dict[str, int] = {}
        self.state_dir: Any = None  # the StateDir routes keep their state in, when one is set
        self._drift: dict[str, DriftMetrics] = {}
        self.detector: DetectorMetrics | None = None
        self.registry.register(self)
        self._runtime: tuple[Collector, ...] = (
            (
                ProcessCollector(registry=self.registry),
                PlatformCollector(registry=self.registry),
                GCCollector(registry=self.registry),
            )
            if own
            else ()
        )

    def drift_monitors(self) -> dict[str, DriftMetrics]:
        return dict(self._drift)

    def drift(self, model: str) -> DriftMetrics:
        """The figures of one drift monitor (and, the first time, of the detector process)."""
        if self.detector is None:
            self.detector = DetectorMetrics()
        dm = self._drift.get(model)
        if dm is None:
            dm = self._drift[model] = DriftMetrics()
        return dm

    def route(self, name: str) -> RouteMetrics:
        """The figures of one route; a reload of the routes continues them."""
        rm = self._routes.get(name)
        if rm is None:
            rm = self._routes[name] = RouteMetrics()
        return rm

    def drop_route(self, name: str) -> None:
        """A route removed from the configuration: its gauges go (its counters with them)."""
        self._routes.pop(name, None)

    def upstream(self, model: str, address: str) -> UpstreamMetrics:
        """The figures of one upstream of a remote model; a reload continues them."""
        key = (model, address)
        um = self._upstreams.get(key)
        if um is None:
            um = self._upstreams[key] = UpstreamMetrics()
        return um

    def keep_upstreams(self, model: str, addresses: Collection[str]) -> None:
        """Drop the series of ``model``'s upstreams not in ``addresses`` (a reload without them,
        every one on an unload): a closed upstream's health gauge reads 0, down for ever."""
        for key in [k for k in self._upstreams if k[0] == model and k[1] not in addresses]:
            del self._upstreams[key]

    def bind(self, model: str, version: str) -> ModelMetrics:
        """The figures of one model version; a reload of the same version continues them."""
        key = (model, version)
        mm = self._models.get(key)
        if mm is None:
            mm = self._models[key] = ModelMetrics(model, version, self.duration_buckets, self.model_failure_lines)
        return mm

    def connection_refused(self, reason: str) -> None:
        self._connections_refused[reason] = self._connections_refused.get(reason, 0) + 1

    def connections_refused(self) -> dict[str, int]:
        return dict(self._connections_refused)

    def offline(self, model: str) -> None:
        self._offline[model] = self._offline.get(model, 0) + 1

    def request_error(self, protocol: str, code: str, reason: str) -> None:
        key = (protocol, code, reason)
        self._request_errors[key] = self._request_errors.get(key, 0) + 1

    def load_failed(self, model: str) -> None:
        self._load_failures[model] = self._load_failures.get(model, 0) + 1

    # the snapshot seam and the prometheus_client collector protocol -----------------
    def snapshot(self) -> Snapshot:
        """Every figure of this process, read once (see :class:`Snapshot`)."""
        snap = Snapshot()
        if self.duration_buckets is not LATENCY_BUCKETS_S:
            snap.buckets["batchgate_request_duration_seconds"] = self.duration_buckets
        add = snap.add
        for (model, version), m in list(self._models.items()):
            mv = (model, version)
            for (protocol, status), n in list(m.requests.items()):
                add("batchgate_requests", mv + (protocol, status), n)
            for protocol, h in list(m.durations.items()):
                add("batchgate_request_duration_seconds", mv + (protocol,), h.value())
            add("batchgate_queue_duration_seconds", mv, m.queue.value())
            add("batchgate_compute_duration_seconds", mv, m.compute.value())
            add("batchgate_inference_count", mv, m.inferences)
            add("batchgate_execution_count", mv, m.executions)
            add("batchgate_model_ready", mv, m.is_ready())
            gauges = m.gauges()
            if gauges is not None:
                add("batchgate_queue_depth", mv, gauges[0])
                add("batchgate_inflight_requests", mv, gauges[1])
                add("batchgate_queue_oldest_age_seconds", mv, gauges[2])
            for reason, n in list(m.refusals.items()):
                add("batchgate_refusals", mv + (reason,), n)
            for path, n in list(m.forwards.items()):
                add("batchgate_remote_requests", mv + (path,), n)
            add("batchgate_batch_size", mv, _batch_histogram(dict(m.batch_rows)))
            if m.load_seconds is not None:
                add("batchgate_model_load_duration_seconds", mv, m.load_seconds)
            if m.stats is not None:
                snap.stats[mv] = m.stats.as_dict()
                if m.failures:
                    snap.failures[mv] = dict(m.failures)
        for model, n in list(self._load_failures.items()):
            add("batchgate_model_load_failures", (model,), n)
        for labels, n in list(self._request_errors.items()):
            add("batchgate_request_errors", labels, n)
        for model, n in list(self._offline.items()):
            add("batchgate_offline_requests", (model,), n)
        tracing = self.tracing
        if tracing is not None:
            for outcome, n in list(tracing.counts.counts.items()):
                add("batchgate_trace_spans", (outcome,), n)
        dropped = sum(budget.dropped for budget in self.failure_budgets)
        if dropped:
            add("batchgate_failure_log_dropped", (), dropped)
        alog = self.access_log
        if alog is not None:
            add("batchgate_access_log_lines", (), alog.lines)
            for reason, n in list(alog.dropped.items()):
                add("batchgate_access_log_dropped", (reason,), n + alog.unwritten if reason == "error" else n)
        if self.audit_refused is not None:
            add("batchgate_audit_log_dropped", (), self.audit_refused.dropped)
        for file, watched in self.watched_files:
            add("batchgate_reload_failures", (file,), watched.reload_failures)
        if self.tls is not None and self.tls.not_after is not None:
            add("batchgate_tls_certificate_expiry_timestamp_seconds", (), self.tls.not_after)
        for reason, n in list(self._connections_refused.items()):
            add("batchgate_http_connections_refused", (reason,), n)
        stalls = self.stalls
        if stalls is not None:
            add("batchgate_event_loop_lag_seconds", (), stalls.loop_lag.value())
            for generation, h in stalls.gc_pauses.items():
                add("batchgate_gc_pause_seconds", (str(generation),), h.value())
        for (model, address), u in list(self._upstreams.items()):
            lv = (model, address)
            add("batchgate_upstream_requests", lv, u.requests)
            for code, n in list(u.errors.items()):
                add("batchgate_upstream_errors", lv + (code,), n)
            add("batchgate_upstream_request_duration_seconds", lv, u.latency.value())
            add("batchgate_upstream_ejections", lv, u.ejections)
            add("batchgate_upstream_outstanding", lv, u.outstanding)
            add("batchgate_upstream_healthy", lv, u.healthy)
        for outcome, n in list(self.routes_reloads.items()):
            add("batchgate_routes_reloads", (outcome,), n)
        if self.state_dir is not None:
            add("batchgate_state_write_failures", (), self.state_dir.failures)
        if self.unsent is not None:
            add("batchgate_unsent_answer_bytes", (), self.unsent.total)
        shm = self.shm
        if shm is not None:
            add("batchgate_shm_regions", (), len(shm.regions))
            add("batchgate_shm_bytes", (), shm.bytes)
            for (action, outcome), n in list(shm.counts.items()):
                add("batchgate_shm_requests", (action, outcome), n)
        for route, r in list(self._routes.items()):
            self._route_snapshot(add, route, r)
        if self.route_stats is not None:
            for st in self.route_stats():
                key = (st.name, st.version)
                snap.stats[key] = st.as_dict()
                rm = self._routes.get(st.name)
                if rm is not None:
                    snap.failures[key] = rm.failures_of(st)
        for model, dm in list(self._drift.items()):
            self._drift_snapshot(add, model, dm)
        d = self.detector
        if d is not None:
            add("batchgate_drift_queue_depth", (), d.queue_depth())
            for outcome, n in list(d.events.items()):
                add("batchgate_drift_events", (outcome,), n)
            add("batchgate_drift_dead_letter_events", (), d.dead_letter)
            add("batchgate_drift_detector_up", (), d.up)
            add("batchgate_drift_detector_restarts", (), d.restarts)
            add("batchgate_drift_detector_cpu_seconds", (), d.cpu_seconds)
        return snap

    @staticmethod
    def _drift_snapshot(add: Callable, model: str, dm: DriftMetrics) -> None:
        m = (model,)
        for (feature, test), v in list(dm.scores.items()):
            add("batchgate_drift_score", (model, feature, test), v)
        for feature, on in list(dm.detected.items()):
            add("batchgate_drift_detected", (model, feature), on)
        for (feature, kind), on in list(dm.quality.items()):
            add("batchgate_drift_quality_alarm", (model, feature, kind), on)
        add("batchgate_drift_active", m, dm.active)
        add("batchgate_drift_features_drifted", m, dm.drifted)
        add("batchgate_drift_detections", m, dm.detections)
        for outcome, n in list(dm.samples.items()):
            add("batchgate_drift_samples", m + (outcome,), n)
        add("batchgate_drift_windows", m, dm.windows)
        if dm.window_seconds is not None:
            add("batchgate_drift_window_seconds", m, dm.window_seconds)
        add("batchgate_drift_lag_seconds", m, dm.lag.value())

    @staticmethod
    def _route_snapshot(add: Callable, route: str, r: RouteMetrics) -> None:
        for (variant, status), n in list(r.requests.items()):
            add("batchgate_route_requests", (route, variant, status), n)
        for variant, w in list(r.weights.items()):
            add("batchgate_route_weight", (route, variant), w)
        add("batchgate_rollout_state", (route,), r.rollout_state)
        if r.canary_percent is not None:
            add("batchgate_rollout_canary_percent", (route,), r.canary_percent)
        for shadow, sm in list(r.shadows.items()):
            rs = (route, shadow)
            for outcome, n in list(sm.outcomes.items()):
                add("batchgate_shadow_requests", rs + (outcome,), n)
            add("batchgate_shadow_agreements", rs, sm.agreements)
            add("batchgate_shadow_rows_compared", rs, sm.rows)
            add("batchgate_shadow_top1_flips", rs, sm.flips)
            add("batchgate_shadow_abs_delta", rs, sm.delta.value())
            add("batchgate_shadow_latency_delta_seconds", rs, sm.latency_delta.value())
            for side, n in list(sm.error_delta.items()):
                add("batchgate_shadow_error_delta", rs + (side,), n)

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        yield from render(self.snapshot())

    def exposition(self) -> bytes:
        """What ``/metrics`` serves, Prometheus text format 0.0.4, from one snapshot: the batchgate
        families, the process collectors', and with :attr:`triton` Triton's families."""
        return exposition(self.snapshot(), [m for c in self._runtime for m in c.collect()], self.triton)

    def runtime_samples(self) -> list[RuntimeFamily]:
        """The process, platform and GC collectors' figures as plain data (what a worker process
        sends the supervisor, which labels them with the worker)."""
        return [
            (m.name, m.type, m.documentation, [(x.name, dict(x.labels), x.value) for x in m.samples])
            for c in self._runtime
            for m in c.collect()
        ]


def _batch_histogram(rows_seen: dict[int, int]) -> HistValue:
    """Executions by rows (rows -> executions) in the batch-size buckets."""
    counts = [0] * (len(BATCH_BUCKETS) + 1)
    for rows, n in rows_seen.items():
        counts[bisect_left(BATCH_BUCKETS, rows)] += n
    return tuple(counts), float(sum(r * n for r, n in rows_seen.items()))
