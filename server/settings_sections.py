"""The settings' sections: one frozen dataclass per section of the YAML file, each field a row
of the settings table (help text, allowed values, bounds), and ``Settings`` holding them all.
``config.py`` reads, merges and validates them; this module only declares them."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core.drift_monitors import MonitorSpec
from .core.routing import RouteSpec
from .remote_models import RemoteModel
from .settings_field import setting as _setting
from .settings_limits import LimitSettings


@dataclass(frozen=True)
class ServerSettings:
    """Section ``server``: listeners, shutdown, threads and logs."""

    host: str = _setting(
        "0.0.0.0",
        "address the HTTP, gRPC, metrics and health listeners bind; :: takes IPv6 and IPv4 both",
        metavar="HOST",
    )
    http_port: int = _setting(8000, "V2 HTTP/REST port; 0 picks a free port")
    grpc_port: int = _setting(8001, "V2 gRPC port; 0 picks a free port")
    metrics_port: int = _setting(8002, "Prometheus /metrics port; 0 picks a free port, -1 turns it off")
    triton_metrics: bool = _setting(
        True, "also export Triton's nv_inference_* families on /metrics (Triton's names, labels and units)"
    )
    exit_timeout_s: float = _setting(30.0, "grace period for in-flight work on SIGTERM", positive=True)
    grpc_engine: str = _setting(
        "h2",
        "gRPC server engine: h2 (batchgate's own, HTTP/2 on the event loop) or grpcio (grpc.aio over gRPC core)",
        choices=("grpcio", "h2"),
    )
    grpc_max_connection_age_s: float = _setting(
        0.0,
        "close gRPC connections this old, so long-lived clients reconnect and reach new replicas; 0 = never",
        minimum=0,
    )
    strict_readiness: bool = _setting(
        True, "ready only while every model that should be loaded is ready (Triton's strict readiness)"
    )
    http_header_timeout_s: float = _setting(
        10.0,
        "an HTTP request head must arrive within this; else 408 and the connection closed (h2 gRPC engine: "
        "a connection's HTTP/2 preface and SETTINGS, else closed)",
        positive=True,
    )
    http_body_timeout_s: float = _setting(
        60.0,
        "an HTTP request body must arrive within this of its head; else 408 and closed (h2 gRPC engine: a "
        "request message, from its first byte; else DEADLINE_EXCEEDED); and an answer its client does not "
        "read may wait this long, a second more per 16 KiB it takes (else aborted / reset)",
        positive=True,
    )
    grpc_idle_timeout_s: float = _setting(
        300.0,
        "h2 gRPC engine: a connection without calls this long is closed gracefully (GOAWAY; clients reconnect "
        "on their next call), so idle clients do not hold max_connections slots; 0 = never",
        minimum=0,
    )
    http_idle_timeout_s: float = _setting(
        75.0, "an idle keep-alive HTTP connection is closed after this", positive=True
    )
    cors_allowed_origins: tuple[str, ...] = _setting(
        (),
        "CORS: origins (scheme://host[:port]) whose browser apps may call the V2 HTTP port, or * for any; "
        "empty = off (repeatable)",
        metavar="ORIGIN",
    )
    cors_allow_credentials: bool = _setting(
        False, "CORS: let browsers send cookies and HTTP auth with cross-origin calls (not with *)"
    )
    cors_allow_headers: tuple[str, ...] = _setting(
        (),
        "CORS: request headers allowed besides batchgate's own (a route's sticky header, say) (repeatable)",
        metavar="HEADER",
    )
    cors_max_age_s: int = _setting(
        600, "CORS: how long a browser may keep a preflight's answer", minimum=0, maximum=86400
    )
    admin_host: str = _setting(
        "127.0.0.1", "address the admin listeners bind (admin API, repository API)", metavar="HOST"
    )
    admin_port: int = _setting(
        8003, "admin gRPC port (batchgate.admin.v1.AdminService); 0 picks a free port, -1 turns it off"
    )
    admin_http_port: int = _setting(
        8005,
        "admin HTTP port: the admin API under /admin/v1/, the repository API, health; 0 picks a free port, -1 = off",
    )
    health_port: int = _setting(
        -1,
        "plaintext port serving the gRPC health service only, for kubelet gRPC probes when TLS is on; "
        "0 picks a free port, -1 = off",
    )
    infer_threads: int = _setting(
        0,
        "threads that run models; 0 = one per core of this process's share, at least 4",
        minimum=0,
        maximum=1024,  # (100,000 ended start-up in a traceback: the process ran out of threads)
    )
    workers: str = _setting(
        "1",
        "worker processes serving the HTTP and gRPC ports together (SO_REUSEPORT); auto = the container's "
        "CPU quota, else the core count",
        metavar="N|auto",
    )
    workers_mode: str = _setting(
        "replicate",
        "with several workers: replicate = each worker loads and batches every model; front = the workers "
        "handle the protocols and forward to one process that owns the models and batches",
        choices=("replicate", "front"),
    )
    worker_hang_s: float = _setting(
        30.0,
        "with several workers: a worker that has not answered the supervisor for this long is killed and "
        "started again (a hung process keeps its share of the port's connections), and a pod-wide change "
        "(load, unload, ...) waiting for it is answered; 0 = never (such a change waits for it)",
        minimum=0,
    )
    log_format: str = _setting("plain", "plain lines or one JSON object per line", choices=("plain", "json"))
    log_level: str = _setting("info", "lowest level logged", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class RepositorySettings:
    """Section ``repository``: where models come from and how they are loaded."""

    model_repository: str = _setting(
        "", "the Triton-layout model repository (may be left out when remote_models are given)", metavar="DIR"
    )
    model_control_mode: str = _setting(
        "none",
        "none: load every model at start; poll: also rescan every repository_poll_s; "
        "explicit: load and unload through the repository API",
        choices=("none", "poll", "explicit"),
    )
    repository_poll_s: float = _setting(15.0, "rescan interval in poll mode", positive=True)
    load_model: tuple[str, ...] = _setting(
        (), "explicit mode: a model to load at start (repeatable; * = all)", metavar="MODEL"
    )
    warm_up: bool = _setting(
        True, "run each model once on zeros when it loads (a model that cannot is served without it)"
    )
    gpu_device_id: int = _setting(0, "CUDA device of KIND_GPU instance groups that name no gpus", minimum=0)
    default_max_batch_size: int = _setting(
        4,
        "max_batch_size given to a model without config whose tensors all have a dynamic first dimension (with "
        "dynamic_batching {} when above 1, as Triton completes it)",
        minimum=0,
    )


@dataclass(frozen=True)
class BatchingSettings:
    """Section ``batching``: how models with dynamic_batching form batches and where they run."""

    batching_policy: str = _setting(
        "triton", "how models with dynamic_batching form batches", choices=("triton", "work_conserving")
    )
    model_batching_policy: tuple[str, ...] = _setting(
        (), "this model's batching policy (repeatable)", metavar="MODEL=POLICY"
    )
    inline_execution_max_us: int = _setting(
        50,
        "run a model version on the event loop when its executions are measured faster than this; 0 = never",
        minimum=0,
    )
    one_core_turn_us: int = _setting(
        500,
        "with one core (this process's share: CPU quota, affinity, workers), executions measured faster than "
        "this run on the event loop between its reads, at most this long of them a loop turn; 0 = on threads",
        minimum=0,
        maximum=1_000_000,
    )


@dataclass(frozen=True)
class AuthSettings:
    """Section ``auth``: who may call what, and the audit trail of admin actions."""

    api_keys_file: str = _setting(
        "",
        "YAML file of API keys (id, sha256 of the token, scopes, models, rate_per_s, burst); "
        "empty = the server runs open (a warning says so at start)",
        metavar="FILE",
    )
    api_keys_poll_s: float = _setting(2.0, "how often api_keys_file is checked for changes (revocation)", positive=True)
    allow_open_admin: bool = _setting(
        False, "without api_keys_file, allow repository load/unload to anyone (Triton-like set-ups)"
    )
    audit_log_file: str = _setting(
        "", "append one JSON line per admin action here (fsynced; never tokens); empty = no audit log", metavar="FILE"
    )
    audit_refused_per_s: float = _setting(
        20.0,
        "records of refused attempts (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) and failed "
        "shared-memory calls a second at most per process, after a burst of 5 seconds of them; the rest are "
        "counted and summed up in one record; 0 = record every one",
        minimum=0,
    )
    health_requires_key: bool = _setting(False, "with api_keys_file, health endpoints need a key too")
    metrics_requires_key: bool = _setting(False, "with api_keys_file, /metrics needs a key with scope 'read'")


@dataclass(frozen=True)
class TlsSettings:
    """Section ``tls``: HTTPS and gRPC over TLS on the same ports; mTLS with a client CA."""

    tls_cert_file: str = _setting("", "PEM certificate chain; with tls_key_file, serve TLS", metavar="FILE")
    tls_key_file: str = _setting("", "PEM private key of tls_cert_file", metavar="FILE")
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)", metavar="FILE"
    )
    tls_poll_s: float = _setting(
        5.0, "how often the certificate files are checked for changes and reloaded", positive=True
    )


@dataclass(frozen=True)
class RoutingSettings:
    """Section ``routing``: where routes come from besides the config file's ``routes`` list,
    where their runtime state is kept, and what shadows may use."""

    routes_file: str = _setting(
        "",
        "YAML file holding a 'routes:' list, re-read when it changes (a mounted ConfigMap); empty = none",
        metavar="FILE",
    )
    routes_poll_s: float = _setting(2.0, "how often routes_file is checked for changes", positive=True)
    state_dir: str = _setting(
        "",
        "directory for runtime route weights and rollout steps, kept across restarts; empty = kept in memory only",
        metavar="DIR",
    )
    shadow_threads: int = _setting(
        1, "threads that run local shadow models (apart from the inference threads)", minimum=1, maximum=64
    )
    shadow_send_threads: int = _setting(
        2,
        "threads that make remote shadows' calls (blocking, at the lowest priority, off the event loop); 0 = "
        "on the event loop, through the remote model's own client",
        minimum=0,
        maximum=64,
    )
    shadow_gather_ms: float = _setting(
        5.0,
        "a shadow's copies wait up to this long to start together (one call or run for several); 0 = at once",
        minimum=0,
        maximum=1000,
    )
    disagreement_log_file: str = _setting(
        "", "JSONL file of sampled shadow disagreements (rotated at its size limit); empty = none", metavar="FILE"
    )
    disagreement_log_max_bytes: int = _setting(
        64 * 1024 * 1024, "disagreement_log_file is rotated (one old file kept) past this size", minimum=4096
    )
    disagreement_log_per_s: float = _setting(
        10.0, "at most this many disagreements a second are written to disagreement_log_file", positive=True
    )


@dataclass(frozen=True)
class DriftSettings:
    """Section ``drift_detector``: the detector process, its queue and its events, for the
    monitors of the top-level ``drift`` list."""

    drift_max_features: int = _setting(
        512, "a drift monitor may watch at most this many features (each is a metric label)", minimum=1
    )
    drift_detector_hang_s: float = _setting(
        60.0,
        "a detector process not heard from for this long (it reports every second, and says it is alive "
        "while it scores a window) is killed and started again; 0 = never, else at least 2",
        minimum=0,
        zero_or_at_least=2,
        why="the detector reports every second: a shorter wait kills a healthy one again and again",
    )
    drift_queue_samples: int = _setting(
        1024, "sampled requests waiting for the detector process; one more is dropped and counted", minimum=1
    )
    drift_profiles_dir: str = _setting(
        "", "directory where rebaselined profiles are kept across restarts; empty = kept in memory only", metavar="DIR"
    )
    drift_dead_letter_file: str = _setting(
        "", "JSONL file of drift events the webhook did not take, retried later; empty = kept in memory", metavar="FILE"
    )
    drift_dead_letter_max_events: int = _setting(
        1000, "events kept in the dead letter; past it, coalesced to the latest per model", minimum=1
    )
    drift_dead_letter_retry_s: float = _setting(30.0, "how often dead-lettered events are retried", positive=True)
    drift_rebaseline_max_rows: int = _setting(
        10_000, "live rows kept per monitor for a rebaseline (the most a rebaseline can use)", minimum=10
    )
    drift_event_source: str = _setting(
        "", "the CloudEvents 'source' of drift events; empty = /batchgate/<host name>", metavar="URI"
    )


@dataclass(frozen=True)
class SharedMemorySettings:
    """Section ``shared_memory``: the system shared-memory extension (tensors in registered regions)."""

    shm_key_prefix: str = _setting(
        "/batchgate_",
        "a region's key (the POSIX shared-memory name a client registers) must start with this, so a client "
        "can map only segments made for the gateway, never another process's; '' turns registration off",
        metavar="PREFIX",
    )
    shm_max_regions: int = _setting(
        64, "registered regions at once; one more is refused (RESOURCE_EXHAUSTED)", minimum=1
    )
    shm_max_bytes: int = _setting(
        1 << 30,
        "bytes of all registered regions together; a registration past it is refused (RESOURCE_EXHAUSTED)",
        minimum=1,
    )
    shm_max_regions_per_key: int = _setting(
        16, "with API keys: regions one key may have registered at once (RESOURCE_EXHAUSTED past it)", minimum=1
    )
    shm_max_bytes_per_key: int = _setting(
        256 << 20, "with API keys: bytes of one key's regions together (RESOURCE_EXHAUSTED past it)", minimum=1
    )


@dataclass(frozen=True)
class ObservabilitySettings:
    """Section ``observability``: request tracing (OpenTelemetry) and the access log."""

    tracing: str = _setting(
        "off",
        "request tracing: off, or otlp (OpenTelemetry spans over OTLP to otlp_endpoint)",
        choices=("off", "otlp"),
    )
    otlp_endpoint: str = _setting(
        "",
        "the OTLP collector spans go to: http://collector:4318 over HTTP (/v1/traces is added), "
        "http://collector:4317 over gRPC; https:// for TLS",
        metavar="URL",
    )
    otlp_protocol: str = _setting(
        "http/protobuf",
        "how spans reach otlp_endpoint: http/protobuf (OTLP/HTTP) or grpc (OTLP/gRPC)",
        choices=("http/protobuf", "grpc"),
    )
    trace_sample_ratio: float = _setting(
        0.001,
        "share of requests without a trace context that are traced (a request with a context follows its sampled "
        "flag); changed at run time by the trace extension's trace_rate",
        minimum=0,
        maximum=1,
        metavar="RATIO",
    )
    service_name: str = _setting("batchgate", "the service.name of the spans", metavar="NAME")
    trace_queue_spans: int = _setting(
        2048, "spans waiting for the exporter at most; past it they are dropped and counted", minimum=1
    )
    trace_max_per_s: int = _setting(
        100,
        "requests traced a second at most, per process, whatever decided it (a caller's sampled traceparent, the "
        "ratio); past it a request is not traced and is counted (outcome throttled)",
        minimum=1,
    )

    access_log: str = _setting(
        "sampled",
        "one JSON line per inference request: off, sampled (every error but overload refusals, every slow "
        "request, a share of the rest chosen on the request id) or all",
        choices=("off", "sampled", "all"),
    )
    access_log_sample_ratio: float = _setting(
        0.01,
        "with access_log sampled: the share of quick, successful requests logged (0 to 1)",
        minimum=0,
        maximum=1,
        metavar="RATIO",
    )
    access_log_slow_ms: float = _setting(
        1000.0, "requests slower than this are always logged (with access_log sampled)", positive=True
    )
    access_log_max_lines_per_s: int = _setting(
        1000, "access log lines a second at most (per process); the rest are dropped and counted", minimum=1
    )
    failure_log_max_lines_per_s: int = _setting(
        100,
        "lines a second at most (per process) of the log's 'request ... failed' lines; the rest are dropped, "
        "counted and summed up in one line a second",
        minimum=1,
    )
    latency_slo_ms: float = _setting(
        0.0,
        "a latency objective's threshold: added to the buckets of batchgate_request_duration_seconds, so the "
        "share of requests under it is exact (the chart's SLO alerts set it); 0 = none",
        minimum=0,
        metavar="MS",
    )
    access_log_file: str = _setting(
        "", "write the access log to this file (appended) instead of stdout", metavar="FILE"
    )


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    repository: RepositorySettings = field(default_factory=RepositorySettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    drift_detector: DriftSettings = field(default_factory=DriftSettings)
    shared_memory: SharedMemorySettings = field(default_factory=SharedMemorySettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    remote_models: tuple[RemoteModel, ...] = ()  # models served by remote V2 servers (see RemoteModel)
    routes: tuple[RouteSpec, ...] = ()  # the config file's routes list (core/routing.py)
    drift: tuple[MonitorSpec, ...] = ()  # the config file's drift list (core/drift_monitors.py)


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "repository": RepositorySettings,
    "limits": LimitSettings,
    "batching": BatchingSettings,
    "auth": AuthSettings,
    "tls": TlsSettings,
    "routing": RoutingSettings,
    "drift_detector": DriftSettings,
    "shared_memory": SharedMemorySettings,
    "observability": ObservabilitySettings,
}
RESERVED_SECTIONS: tuple[str, ...] = ()  # planned sections, refused until they exist
TOP_LEVEL = (*SECTIONS, "remote_models", "routes", "drift")
