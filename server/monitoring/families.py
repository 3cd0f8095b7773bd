"""The table of every Prometheus family batchgate exports: name, kind, help, labels, how the
figures of several processes combine, and histogram buckets (``metrics.py`` keeps the figures
and renders them from this table).

Names start with ``batchgate_``; the Helm chart and the autoscaler read them, so a rename here is
a breaking change. Per-model families carry ``model`` and ``version``; request families also
``protocol`` (grpc | http) and ``status`` (OK or the error code).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

# The process's stalls (monitoring/runtime.py): from 100 µs (a young generation's collection; the
# loop's timer resolves about a millisecond) to seconds.
STALL_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Latency buckets from 50 µs to 10 s: CPU models answer in well under a millisecond.
LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def latency_buckets(slo_ms: float = 0.0) -> tuple[float, ...]:
    """The request-duration buckets, with the threshold ``slo_ms`` among them when it is not 0: a
    latency SLO's threshold must be a bucket boundary (the share of requests under it is that
    bucket over the count), so setting ``observability.latency_slo_ms`` adds it. In seconds as a
    decimal shift, not a float division: the chart's rule asks for le="0.0131" of 13.1 ms, and
    13.1 / 1000 is 0.013099999999999999."""
    slo_s = float(Decimal(repr(float(slo_ms))).scaleb(-3))
    if not slo_s or slo_s in LATENCY_BUCKETS_S:
        return LATENCY_BUCKETS_S
    return tuple(sorted((*LATENCY_BUCKETS_S, slo_s)))


BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# |primary - shadow| of a compared output (the largest per row), from 1e-6 to 100.
DELTA_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 100.0)
# Shadow latency minus primary latency: negative when the shadow answered first.
LATENCY_DELTA_BUCKETS_S = (-1.0, -0.1, -0.01, -0.001, 0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# batchgate_rollout_state's values.
ROLLOUT_STATE_CODES = {"none": 0, "running": 1, "paused": 2, "promoted": 3, "rolled_back": 4}

# How the figures of several processes (worker processes) combine, by what each means.
SUM, MAX, ALL = "sum", "max", "all"  # ALL: the least (1 only when every process says 1: readiness)


@dataclass(frozen=True)
class Family:
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]  # every label, in order
    merge: str = SUM  # counters and histograms always SUM; a gauge says what it means
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S  # histograms only


def _model(kind: str, doc: str, extra: tuple[str, ...] = (), **kw) -> Family:
    return Family(kind, doc, ("model", "version") + extra, **kw)


def _upstream(kind: str, doc: str, extra: tuple[str, ...] = (), **kw) -> Family:
    return Family(kind, doc, ("model", "upstream") + extra, **kw)


FAMILIES: dict[str, Family] = {
    "batchgate_requests": _model("counter", "Inference requests answered, by outcome", ("protocol", "status")),
    "batchgate_request_duration_seconds": _model(
        "histogram", "Time from a request's arrival at the gateway to its answer", ("protocol",)
    ),
    "batchgate_queue_duration_seconds": _model("histogram", "Time a request waited in the scheduler queue"),
    "batchgate_compute_duration_seconds": _model(
        "histogram", "Time of one backend execution (input preparation, inference, output extraction)"
    ),
    "batchgate_inference_count": _model("counter", "Inferences performed (a batch of n counts n)"),
    "batchgate_execution_count": _model("counter", "Backend executions (batches)"),
    "batchgate_queue_depth": _model(
        "gauge", "Requests admitted and not yet executing (queued, or still being read and decoded)"
    ),
    "batchgate_queue_oldest_age_seconds": _model(
        "gauge", "How long the longest-waiting queued request has waited (0 when the queue is empty)", merge=MAX
    ),
    "batchgate_batch_size": _model("histogram", "Rows per backend execution", buckets=BATCH_BUCKETS),
    "batchgate_refusals": _model(
        "counter",
        "Requests a scheduler turned away or dropped unexecuted, by reason "
        "(inflight_limit, queue_full, queue_wait, queue_target, deadline_unmeetable, deadline_expired, queue_timeout)",
        ("reason",),
    ),
    "batchgate_remote_requests": _model(
        "counter",
        "Requests to a remote model by the path they took: raw (the caller's gRPC request forwarded as it came, "
        "no tensor decoded) or decoded (checked, batched or sampled at the gateway)",
        ("path",),
    ),
    "batchgate_inflight_requests": _model("gauge", "Requests accepted and not yet answered"),
    "batchgate_model_ready": _model("gauge", "1 when the model version is loaded and serving, else 0", merge=ALL),
    "batchgate_model_load_duration_seconds": _model("gauge", "Time the last load of the model version took", merge=MAX),
    "batchgate_model_load_failures": Family("counter", "Model loads that failed", ("model",)),
    "batchgate_http_connections_refused": Family(
        "counter",
        "HTTP connections answered and closed by a limit: header_bytes, header_fields (past max_header_fields), "
        "header_timeout, body_timeout, connections, "
        "malformed (not HTTP/1.1), transfer_encoding (a coding other than chunked), "
        "upgrade (an upgrade not served as HTTP/1.1), pipeline (past "
        "max_pipelined_requests), send_timeout (an answer its client did not take), "
        "unsent_answers (it held the most of max_unsent_answer_bytes) (HTTP/1.1); "
        "on the h2 gRPC engine grpc_connections, grpc_header_bytes, grpc_protocol (an HTTP/2 error), "
        "grpc_resets (a reset flood), "
        "grpc_buffered_bytes (a call refused, its connection kept), grpc_handshake_timeout, grpc_body_timeout "
        "(a call failed), grpc_send_timeout (an answer dropped), grpc_unsent_answers (aborted: it held the "
        "most of max_unsent_answer_bytes), grpc_idle_timeout (closed gracefully), "
        "grpc_flood (frames that carry nothing), grpc_streams (past grpc_max_streaming_calls), "
        "grpc_malformed (a call reset: its headers break HTTP/2's rules), "
        "grpc_concurrent_streams (a stream past grpc_max_concurrent_streams, reset REFUSED_STREAM); "
        "on the metrics port metrics_connections (past ops_max_connections), metrics_peer (past "
        "ops_max_connections_per_peer), metrics_timeout; on the health port the h2 engine's with health_ for "
        "grpc_ (health_connections, health_peer...); "
        "overload_hold, overload_retry_hold (a retry held at overload_retries_per_s) (either)",
        ("reason",),
    ),
    "batchgate_event_loop_lag_seconds": Family(
        "histogram",
        "How late the event loop ran a timer due every 100 ms: what a request arriving then waited before "
        "being read (monitoring/runtime.py)",
        (),
        buckets=STALL_BUCKETS_S,
    ),
    "batchgate_gc_pause_seconds": Family(
        "histogram",
        "How long each collection of the cyclic garbage collector took (the process stops meanwhile), by generation",
        ("generation",),
        buckets=STALL_BUCKETS_S,
    ),
    "batchgate_trace_spans": Family(
        "counter",
        "Tracing spans by outcome: exported (the collector took them), failed (it did not), dropped (the export "
        "queue was full)",
        ("outcome",),
    ),
    "batchgate_access_log_lines": Family("counter", "Access log lines written (see access_log)", ()),
    "batchgate_access_log_dropped": Family(
        "counter",
        "Access log lines not written: past access_log_max_lines_per_s (rate) or a full write queue (queue)",
        ("reason",),
    ),
    "batchgate_failure_log_dropped": Family(
        "counter",
        "Failure log lines not written (a request's 'failed', a model's 'failed to execute'): past "
        "failure_log_max_lines_per_s",
        (),
    ),
    "batchgate_reload_failures": Family(
        "counter",
        "Changes of a watched file that could not be used, the previous contents still in force: "
        "api_keys (api_keys_file) or tls (the certificate, key or client CA files)",
        ("file",),  # (with worker processes, the leader's count: each reads the same files)
    ),
    "batchgate_tls_certificate_expiry_timestamp_seconds": Family(
        "gauge",
        "When the served TLS certificate expires (Unix time; with TLS on): alert well before it, a renewal "
        "that did not happen or was not picked up",
        (),
        merge=ALL,  # (the earliest of the worker processes': one that has not picked a renewal up)
    ),
    "batchgate_audit_log_dropped": Family(
        "counter",
        "Audit records of refused attempts (UNAUTHENTICATED, PERMISSION_DENIED) not written: past "
        "audit_refused_per_s (one summary record says how many)",
        (),
    ),
    "batchgate_offline_requests": Family(
        "counter",
        "Inference requests marked x-batchgate-offline (batch scoring), kept out of drift and rollout figures",
        ("model",),
    ),
    "batchgate_request_errors": Family(
        "counter",
        "Inference requests answered with an error, by protocol, code and the limit that refused them "
        "(reason: the setting's name, or none)",
        ("protocol", "code", "reason"),
    ),
    "batchgate_unsent_answer_bytes": Family(
        "gauge",
        "Bytes of answers written for clients that have not taken them, held past a connection's "
        "64 KiB (at most max_unsent_answer_bytes in each process)",
        (),
    ),
    # The system shared-memory extension (shm.py).
    # Every worker process holds every registration: the same figure in each.
    "batchgate_shm_regions": Family(
        "gauge", "Shared-memory regions registered (at most shm_max_regions)", (), merge=MAX
    ),
    "batchgate_shm_bytes": Family(
        "gauge", "Bytes of the registered shared-memory regions (at most shm_max_bytes)", (), merge=MAX
    ),
    "batchgate_shm_requests": Family(
        "counter",
        "Shared-memory registrations and unregistrations by action and outcome (OK or the error code)",
        ("action", "outcome"),
    ),
    # Remote models (backends/remote.py): one series per model and upstream address.
    "batchgate_upstream_requests": _upstream("counter", "Calls sent to an upstream V2 server"),
    "batchgate_upstream_errors": _upstream("counter", "Upstream calls that failed, by gRPC status code", ("code",)),
    "batchgate_upstream_request_duration_seconds": _upstream("histogram", "Time of one upstream call"),
    "batchgate_upstream_ejections": _upstream(
        "counter", "Times the upstream was taken out of rotation after consecutive failures"
    ),
    "batchgate_upstream_outstanding": _upstream("gauge", "Calls sent to the upstream and not yet answered"),
    "batchgate_upstream_healthy": _upstream(
        "gauge", "1 while the upstream is in rotation (ready, not ejected), else 0", merge=ALL
    ),
}


def _shadow(kind: str, doc: str, extra: tuple[str, ...] = (), **kw) -> Family:
    return Family(kind, doc, ("route", "shadow") + extra, **kw)


# Routes (routes.py, shadows.py): route, variant and shadow names come from the configuration
# (checked against the model-name alphabet), never from a request.
FAMILIES.update(
    {
        "batchgate_route_requests": Family(
            "counter",
            "Requests answered through a route, by the variant that answered and status",
            ("route", "variant", "status"),
        ),
        "batchgate_route_weight": Family(
            "gauge", "A variant's weight in its route now (config, runtime or rollout)", ("route", "variant"), merge=MAX
        ),
        "batchgate_rollout_state": Family(
            "gauge",
            "A route's rollout: 0 none, 1 running, 2 paused, 3 promoted, 4 rolled back",
            ("route",),
            merge=MAX,
        ),
        "batchgate_rollout_canary_percent": Family(
            "gauge", "The canary's percentage at the rollout's current step", ("route",), merge=MAX
        ),
        "batchgate_routes_reloads": Family(
            "counter", "Reloads of the routes file, by outcome (ok, error)", ("outcome",)
        ),
        "batchgate_state_write_failures": Family(
            "counter",
            "Writes of routes' runtime state (weights, rollouts) to state_dir that failed: the change "
            "serves, but a restart would not keep it (the log says why)",
            (),
        ),
        "batchgate_shadow_requests": _shadow(
            "counter",
            "Copies of requests for a shadow, by outcome: compared (answer compared with the primary's), "
            "answered (nothing to compare), dropped (its budget was full), failed (the shadow failed)",
            ("outcome",),
        ),
        "batchgate_shadow_agreements": _shadow(
            "counter", "Compared answers where the shadow agreed with the primary on every row"
        ),
        "batchgate_shadow_rows_compared": _shadow("counter", "Rows of the compared output compared"),
        "batchgate_shadow_top1_flips": _shadow(
            "counter", "Rows whose top-1 class differed between primary and shadow (classification)"
        ),
        "batchgate_shadow_abs_delta": _shadow(
            "histogram", "Largest |primary - shadow| per row of the compared output", buckets=DELTA_BUCKETS
        ),
        "batchgate_shadow_latency_delta_seconds": _shadow(
            "histogram", "Shadow latency minus primary latency of one request", buckets=LATENCY_DELTA_BUCKETS_S
        ),
        "batchgate_shadow_error_delta": _shadow(
            "counter", "Requests where only one side failed (side: shadow_only, primary_only)", ("side",)
        ),
    }
)

# Drift (monitoring/drift.py): model names from the configuration, feature names from the
# reference profile (checked against a small alphabet, at most drift_max_features a monitor).
DRIFT_LAG_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAMILIES.update(
    {
        "batchgate_drift_score": Family(
            "gauge",
            "A feature's score in the last drift window, by test (psi, ks: distance, chi2: statistic, "
            "adwin: |standardised mean|, missing / out_of_range / unseen: rates)",
            ("model", "feature", "test"),
            merge=MAX,
        ),
        "batchgate_drift_detected": Family(
            "gauge",
            "1 while a feature is drifted (debounced over debounce_windows windows)",
            ("model", "feature"),
            merge=MAX,
        ),
        "batchgate_drift_active": Family(
            "gauge",
            "1 while the model's monitor is in the drifted state (debounced; what events announce)",
            ("model",),
            merge=MAX,
        ),
        "batchgate_drift_features_drifted": Family("gauge", "Features drifted now (debounced)", ("model",), merge=MAX),
        "batchgate_drift_detections": Family("counter", "Times the monitor entered the drifted state", ("model",)),
        "batchgate_drift_samples": Family(
            "counter",
            "Sampled requests by outcome: used (scored in a window), dropped (the detector's queue was full), "
            "invalid (tensors that do not fit the profile)",
            ("model", "outcome"),
        ),
        "batchgate_drift_windows": Family("counter", "Drift windows scored", ("model",)),
        "batchgate_drift_window_seconds": Family(
            "gauge", "How long the last scored window took to fill", ("model",), merge=MAX
        ),
        "batchgate_drift_lag_seconds": Family(
            "histogram",
            "From a window's last sample offered to the window scored, in the detector process",
            ("model",),
            buckets=DRIFT_LAG_BUCKETS_S,
        ),
        "batchgate_drift_quality_alarm": Family(
            "gauge",
            "1 when the last window's missing, out_of_range or unseen rate was past its threshold, beyond chance",
            ("model", "feature", "kind"),
            merge=MAX,
        ),
        "batchgate_drift_queue_depth": Family("gauge", "Sampled requests waiting for the detector process", ()),
        "batchgate_drift_events": Family(
            "counter",
            "Drift events by outcome: delivered, retried (an attempt failed), dead_lettered, "
            "failed (a dead-letter retry)",
            ("outcome",),
        ),
        "batchgate_drift_dead_letter_events": Family("gauge", "Drift events waiting in the dead letter", (), merge=SUM),
        "batchgate_drift_detector_up": Family("gauge", "1 while the drift detector process runs", (), merge=ALL),
        "batchgate_drift_detector_restarts": Family("counter", "Times the drift detector process was restarted", ()),
        "batchgate_drift_detector_cpu_seconds": Family("counter", "CPU time the drift detector process has used", ()),
    }
)

# The supervisor's own, with several worker processes: ``worker`` is the slot (0 .. workers-1), the
# same across a worker's restarts.
FAMILIES.update(
    {
        "batchgate_workers": Family("gauge", "Worker processes the supervisor keeps running (setting workers)", ()),
        "batchgate_worker_up": Family(
            "gauge", "1 while the worker in this slot serves (listening, ready), else 0", ("worker",)
        ),
        "batchgate_worker_restarts": Family(
            "counter", "Times the worker in this slot was started again after it exited", ("worker",)
        ),
        "batchgate_worker_requests": Family(
            "counter",
            "Inference requests answered by the worker in this slot, all its lives (a share of batchgate_requests)",
            ("worker",),
        ),
    }
)
