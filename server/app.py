"""Gateway: builds and wires the parts, serves them, drains and stops them.

One asyncio loop hosts the grpc.aio server and the HTTP server; both call the one
:class:`~batchgate.dataplane.DataPlane`, so requests from either protocol share the
same schedulers. Local models run on the inference threads (``threads.py``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tritonclient.grpc import service_pb2 as pb

from . import __version__, cores, logs
from .admin.api import AdminApi
from .admin.grpc_service import MAX_MESSAGE, AdminService
from .admin.v1.admin_pb2_grpc import add_AdminServiceServicer_to_server
from .backends.upstream_tls import check_remote_files
from .config import ConfigError, Settings
from .core.errors import GatewayError
from .core.types import RequestLimits
from .dataplane import DataPlane
from .monitoring.access_log import open_log as open_access_log
from .monitoring.families import latency_buckets
from .monitoring.metrics import Metrics
from .monitoring.runtime import RuntimeStalls
from .monitoring.serve import metrics_limits, serve_metrics
from .monitoring.tracing import open_tracing
from .repository.build import version_builder
from .repository.manager import ModelRepository
from .route_table import SYSTEM, RouteTable
from .routes import file_stamp, read_routes_file
from .security.access import access_from_settings
from .security.limits import Admission
from .security.tls import ServerTls, load_server_tls, ops_grpc_options
from .shadows import DisagreementLog, lowest_priority
from .shm import SharedMemory
from .state import StateDir
from .threads import InferenceThreads
from .transport.byte_budget import ByteBudget, UnsentAnswers
from .transport.cors import cors_policy
from .transport.grpc_server import add_port, add_reflection, new_grpc_server, plaintext_health_server
from .transport.grpc_server import add_to_server as add_inference_service
from .transport.grpc_service import InferenceService
from .transport.http_app import HttpApp
from .transport.http_limits import TOO_MANY_CONNECTIONS, guarded_protocol
from .transport.http_listener import HttpListener, QuietUvicorn
from .transport.sockets import bind_problem, check_bindable, fit_connections_to_fds, tcp_socket
from .transport.sockets import host_port as _join

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .core.signature import ModelSignature
    from .monitoring.drift import DriftService

log = logging.getLogger("batchgate")

GRPC_SERVICE = "inference.GRPCInferenceService"
LIVENESS_SERVICE = "liveness"  # the gRPC health service name that is SERVING while the process runs
READINESS_POLL_S = 0.5  # how often the gRPC health service is brought up to date


@dataclass(frozen=True)
class WorkerRole:
    """How a Gateway that is one of several worker processes differs (``supervisor.py``): it
    shares the ports; ``link`` (``worker.WorkerLink``) feeds the supervisor's drift detector,
    reaches the other workers' route tables, writes the audit and disagreement lines through the
    supervisor; the ``leader`` (worker 0) runs the rollout controller; ``grpc_address``: the
    model-owning process of front mode listens there (a Unix socket) and nowhere else."""

    link: Any
    leader: bool = False
    grpc_address: str = ""


class Gateway:
    """Builds the parts (threads, repository, data plane), starts the listeners, drains
    and stops. Requests never pass through here: the transports call the data plane."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        role: WorkerRole | None = None,
    ):
        self.settings = settings
        self.role = role
        # One of several worker processes: the HTTP and gRPC ports are shared (SO_REUSEPORT)
        # with the others, which the supervisor reserved (supervisor.py).
        self.reuse_port = role is not None
        self.grpc_address = role.grpc_address if role is not None else ""
        self.leader = role is None or role.leader
        self.metrics = metrics or Metrics()
        srv, repo, lim = settings.server, settings.repository, settings.limits
        share = cores.share()  # (reads the cgroup's files: once)
        self.threads = InferenceThreads(
            srv.infer_threads or max(4, share), turn_us=settings.batching.one_core_turn_us if share == 1 else 0
        )
        # Loading, closing and other blocking housekeeping never queue behind executions.
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="batchgate-admin")
        builder = version_builder(settings, self.threads, self.metrics)
        self.repository = ModelRepository(
            repo.model_repository,
            builder,
            self.pool,
            self.metrics,
            control_mode=repo.model_control_mode,
            poll_interval_s=repo.repository_poll_s,
            load_models=repo.load_model,
            retire_grace_s=srv.exit_timeout_s,
            remote_models=settings.remote_models,
            rescans=role is None,  # poll mode with workers: the supervisor rescans
        )
        self.dataplane = DataPlane(
            self.repository,
            RequestLimits(
                max_caller_headers=lim.max_caller_headers,
                max_caller_header_bytes=lim.max_caller_header_bytes,
                max_request_parameters=lim.max_request_parameters,
                max_inputs=lim.max_inputs,
                max_outputs=lim.max_outputs,
                max_tensor_dims=lim.max_tensor_dims,
                max_request_id_bytes=lim.max_request_id_bytes,
                max_bytes_elements=lim.max_bytes_elements,
            ),
            strict_readiness=srv.strict_readiness,
            metrics=self.metrics,
            admission=Admission(
                lim.max_inflight_requests,
                lim.max_queue_wait_ms / 1000,
                lim.queue_target_ms / 1000,
                lim.queue_interval_ms / 1000,
            ),
            access=access_from_settings(settings.auth, role.link.audit_log if role is not None else None),
        )
        shm = settings.shared_memory
        self.dataplane.shm = SharedMemory(
            shm.shm_key_prefix,
            shm.shm_max_regions,
            shm.shm_max_bytes,
            max_tensor_bytes=lim.max_request_bytes,
            max_regions_per_key=shm.shm_max_regions_per_key,
            max_bytes_per_key=shm.shm_max_bytes_per_key,
            key_ids=self._key_ids,
        )
        self.metrics.shm = self.dataplane.shm
        if (keys := self.dataplane.access.keys) is not None:  # a key removed takes its regions with it
            keys.on_removed = self.dataplane.shm.drop_owners
        # the owner of front mode listens only on a Unix socket in the supervisor's private folder
        self.dataplane.weighs_calls = self.grpc_address.startswith("unix:")
        self.metrics.duration_buckets = latency_buckets(settings.observability.latency_slo_ms)
        try:
            # (front mode's model owner: its callers are the pod's workers, which log each client
            # request; its own lines were each request again, from "unix", until 2026-12-06)
            owner = self.dataplane.weighs_calls
            self.access_log = None if owner else open_access_log(settings.observability, logs.worker_name())
            self.tracing = open_tracing(settings.observability, logs.worker_name())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dataplane.access_log = self.metrics.access_log = self.access_log
        failure_lines = settings.observability.failure_log_max_lines_per_s
        self.dataplane.failure_lines.limit = self.metrics.model_failure_lines.limit = failure_lines
        self.metrics.failure_budgets.append(self.dataplane.failure_lines)
        self.metrics.audit_refused = self.dataplane.access.refused
        self.dataplane.tracing = self.metrics.tracing = self.tracing
        self.stalls = self.metrics.stalls = RuntimeStalls()  # the loop's lateness, the collector's pauses
        self._keys_watch: asyncio.Task | None = None
        self._readiness: asyncio.Task | None = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: Any = None  # grpc.aio.Server or H2GrpcServer (server.grpc_engine)
        self._http: HttpListener | None = None
        self._admin: HttpListener | None = None
        self.admin_port: int | None = None  # the admin gRPC listener
        self.admin_http_port: int | None = None
        self._admin_grpc: grpc.aio.Server | None = None
        self._metrics_server: WSGIServer | None = None
        self._health: HealthServicer | None = None
        self.health_port: int | None = None  # the plaintext gRPC health listener (health_port), if on
        self._health_grpc: grpc.aio.Server | None = None
        self._tls: ServerTls | None = None
        self.routes: RouteTable | None = None
        self.drift: DriftService | None = None
        self._route_tasks: list[asyncio.Future] = []
        self._shadow_pool: ThreadPoolExecutor | None = None

    @property
    def ready(self) -> bool:
        return self.dataplane.ready()

    def _key_ids(self) -> tuple[str, ...]:
        return () if (keys := self.dataplane.access.keys) is None else keys.key_ids

    # ------------------------------------------------------------------ lifecycle
    async def start(
        self,
        before_listening: Callable[[], Awaitable[None]] | None = None,
        routes_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Load the models, then listen. ``before_listening`` runs in between, before the routes
        and drift monitors are built, and ``routes_ready`` after (a worker process catches up
        there with what was loaded, registered and changed before it started)."""
        s = self.settings.server
        self._tls = self.metrics.tls = load_server_tls(self.settings.tls)  # bad files: ConfigError, nothing started
        check_remote_files(self.settings.remote_models)  # (their TLS and token files, likewise)
        if self.leader:  # (each worker process reads the same TLS files: one count of their failures)
            keys = self.dataplane.access.keys if self.role is None else None  # (the supervisor reads the pod's)
            watched = (("api_keys", keys), ("tls", self._tls))
            self.metrics.watched_files = [(file, w) for file, w in watched if w is not None]
        if not self.reuse_port:  # (worker processes: the supervisor holds the ports and has bound them)
            await asyncio.to_thread(check_bindable, self._listen_addresses())  # (a name may be looked up)
        await self.repository.start()
        if before_listening is not None:
            await before_listening()
        await self._start_routes()
        self._start_drift()
        if routes_ready is not None:
            await routes_ready()
        lim = self.settings.limits
        limit = lim.max_request_bytes
        self.max_connections = connections = fit_connections_to_fds(lim.max_connections, lim.ops_max_connections)
        budget = ByteBudget(lim.max_buffered_request_bytes)  # HTTP bodies and gRPC messages still arriving
        self.metrics.unsent = self.unsent = UnsentAnswers(lim.max_unsent_answer_bytes)  # answers clients do not take
        refused = self.metrics.connection_refused
        self._grpc = new_grpc_server(s, lim, connections, self.reuse_port, refused, budget, self.unsent)
        add_inference_service(InferenceService(self.dataplane, self.settings.limits.max_stream_inflight), self._grpc)
        self._health = HealthServicer()
        await self._publish_readiness()  # NOT_SERVING until everything listens (the servicer starts SERVING)
        # Liveness apart from readiness: "" follows readiness (strict readiness may keep it false
        # for long), "liveness" says only that the process answers (kubelet gRPC liveness probes).
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if not self.dataplane.access.health_requires_key:  # else: health on health_port only
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        add_reflection(
            self._grpc,
            (
                pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ),
            self.dataplane.access,
        )
        # What start-up allocated lives as long as the process: move it out of the cyclic
        # collector's sight, so full collections under load stay short (bench/batching.py
        # measured 14-18 ms pauses every ~0.7 s without this).
        gc.collect()
        gc.freeze()
        self.stalls.start()
        # Requests are taken from the moment the first port listens: a worker process shares its
        # ports with the others, so the kernel hands it new connections at once; refusing them
        # until the last listener (and the admin ones) were up failed calls of a healthy pod
        # while a worker restarted. Readiness is still said once everything listens.
        self.dataplane.accepting = True
        address = self.grpc_address or _join(s.host, s.grpc_port)
        self.grpc_port = add_port(self._grpc, address, None if self.grpc_address else self._tls)
        if self.grpc_port == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen for gRPC on {address}{bind_problem(address)}")
        await self._grpc.start()
        if s.health_port >= 0:  # kubelet gRPC probes cannot speak TLS: health alone, plaintext
            address = _join(s.host, s.health_port)
            self._health_grpc, self.health_port = plaintext_health_server(self._health, address, self.settings, refused)
            await self._health_grpc.start()

        if s.http_port >= 0:
            self._http = await self._listen_http(
                HttpApp(
                    self.dataplane,
                    limit,
                    budget,
                    lim.max_gzip_members,
                    cors=cors_policy(s),  # (browser apps of other origins: the V2 port only)
                ),
                s.host,
                s.http_port,
                reuse_port=self.reuse_port,
            )
            self.http_port = self._http.port
        admin = AdminApi(self.dataplane)
        if s.admin_http_port >= 0:  # admin API mirror, repository API, health: loopback by default
            admin_app = HttpApp(self.dataplane, limit, budget, lim.max_gzip_members, admin_only=True, admin=admin)
            self._admin = await self._listen_http(
                admin_app, s.admin_host, s.admin_http_port, self.reuse_port, lim.ops_max_connections
            )
            self.admin_http_port = self._admin.port
        if s.admin_port >= 0:  # the admin API over gRPC
            self._admin_grpc = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", int(self.reuse_port)),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    *ops_grpc_options(lim.ops_max_connections, s.http_header_timeout_s),
                ]
            )
            add_AdminServiceServicer_to_server(AdminService(admin), self._admin_grpc)
            address = _join(s.admin_host, s.admin_port)
            if self._tls is not None:
                self.admin_port = self._admin_grpc.add_secure_port(address, self._tls.grpc_credentials())
            else:
                self.admin_port = self._admin_grpc.add_insecure_port(address)
            if self.admin_port == 0:
                raise OSError(f"cannot listen for the admin API on {address}")
            await self._admin_grpc.start()

        self.metrics.triton = s.triton_metrics  # Triton's nv_inference_* families beside batchgate's
        # (also without a metrics port of its own: a worker's snapshots carry its routes' statistics)
        self.metrics.route_stats = lambda: [r.stats for r in self.routes.routes.values()] if self.routes else []
        if s.metrics_port >= 0:
            access = self.dataplane.access
            server = serve_metrics(
                self.metrics.exposition,
                s.host,
                s.metrics_port,
                access.keys if access.metrics_requires_key else None,
                **metrics_limits(self.settings, self.metrics.connection_refused),
            )
            self._metrics_server = server
            self.metrics_port = server.server_port
        await self._publish_readiness()
        self._readiness = asyncio.ensure_future(self._watch_readiness())
        if self._tls is not None:
            self._tls.start()  # reload the certificate files when they change
        if self.dataplane.access.keys is not None and self.role is None:  # (workers: the supervisor watches)
            # revocation: the keys file is re-read when it changes
            self._keys_watch = asyncio.ensure_future(self.dataplane.access.watch(self.settings.auth.api_keys_poll_s))

        def on(host: str, port: int | None) -> str:
            return "off" if port is None else "on " + _join(host, port)

        log.info(
            "batchgate %s serving %s: HTTP %s, gRPC on %s, metrics %s; admin gRPC %s, admin HTTP %s%s",
            __version__,
            self.settings.repository.model_repository or "remote models",
            on(s.host, self.http_port),
            self.grpc_address or _join(s.host, self.grpc_port),
            on(s.host, self.metrics_port),
            on(s.admin_host, self.admin_port),
            on(s.admin_host, self.admin_http_port),
            "" if self.health_port is None else "; plaintext gRPC health " + on(s.host, self.health_port),
        )

    async def _start_routes(self) -> None:
        """Routes from the config file and routes_file, checked against the loaded models (a
        ConfigError stops the start); then the routes file's watcher and the rollout controller."""
        rs = self.settings.routing
        if not self.settings.routes and not rs.routes_file:
            return
        specs = list(self.settings.routes)
        stamp = None
        if rs.routes_file:
            stamp = file_stamp(rs.routes_file)  # (before the read: an edit from here on is the watcher's)
            specs += await asyncio.to_thread(read_routes_file, rs.routes_file)
        self._shadow_pool = ThreadPoolExecutor(
            rs.shadow_threads, thread_name_prefix="batchgate-shadow", initializer=lowest_priority
        )
        try:
            state = StateDir(rs.state_dir) if rs.state_dir else None
            disagreements = (
                DisagreementLog(
                    rs.disagreement_log_file,
                    rs.disagreement_log_max_bytes,
                    rs.disagreement_log_per_s,
                    send=self.role.link.disagreement if self.role is not None else None,
                )
                if rs.disagreement_log_file
                else None
            )
        except OSError as e:
            raise ConfigError(f"routing: cannot use {e.filename}: {e.strerror}") from None
        access, threads = self.dataplane.access, self.threads
        table = RouteTable(
            self.repository,
            self.dataplane.admission,
            self.metrics,
            self._shadow_pool,
            state,
            disagreements,
            lambda action, target, outcome, detail: access.audited(SYSTEM, None, action, target, outcome, detail),
            away=lambda: threads.away,
            routing=rs,
        )
        table.peer, table.leader = (self.role.link if self.role is not None else None), self.leader
        if self.role is None:  # (with worker processes the supervisor writes state_dir, and counts)
            self.metrics.state_dir = state
        await table.install(specs, "the configuration" + (f" and {rs.routes_file}" if rs.routes_file else ""))
        self.dataplane.routes = self.routes = table
        self._route_tasks = [asyncio.ensure_future(table.control())] if self.leader else []
        if rs.routes_file:
            self._route_tasks.append(
                asyncio.ensure_future(table.watch(self.settings.routes, rs.routes_file, rs.routes_poll_s, stamp))
            )

    def _start_drift(self) -> None:
        """Drift monitors of the config file's ``drift`` list, checked against the served models
        and routes (a ConfigError stops the start); then the detector process."""
        if not self.settings.drift:
            return
        from .monitoring.drift import DriftService  # (servers without drift monitors never load it)

        access = self.dataplane.access
        service = DriftService(
            self.settings.drift,
            self.settings.drift_detector,
            self.metrics,
            lambda action, target, outcome, detail: access.audited(SYSTEM, None, action, target, outcome, detail),
            link=self.role.link if self.role is not None else None,
        )
        service.prepare(self.drift_signatures())
        service.start(asyncio.get_running_loop())
        self.dataplane.drift = self.drift = service

    def drift_signatures(self) -> dict[str, ModelSignature | None]:
        """The signature of each drift monitor's model or route (a route's: its primary's);
        None for a remote model, or a route, that is configured but not loaded yet (its
        upstream down at start: the gateway retries it, and the monitor must not stop the start)."""
        signatures: dict[str, ModelSignature | None] = {}
        remote = {r.name for r in self.settings.remote_models}
        for spec in self.settings.drift:
            route = self.routes.routes.get(spec.model) if self.routes is not None else None
            try:
                served = route.primary() if route is not None else self.repository.resolve(spec.model, "")
            except GatewayError:
                served = None
            if served is not None:
                signatures[spec.model] = served.signature
            elif route is not None or spec.model in remote:
                signatures[spec.model] = None
        return signatures

    async def _listen_http(
        self, app: HttpApp, host: str, port: int, reuse_port: bool = False, max_connections: int = 0
    ) -> HttpListener:
        s, lim = self.settings.server, self.settings.limits
        max_connections = max_connections or self.max_connections
        turns = self.threads.turns
        sock = tcp_socket(host, port, reuse_port)
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(
            app,
            http=guarded_protocol(
                max_header_bytes=lim.max_header_bytes,
                max_header_fields=lim.max_header_fields,
                max_body_bytes=lim.max_request_bytes,  # a refused request's larger body closes its connection
                header_timeout_s=s.http_header_timeout_s,
                body_timeout_s=s.http_body_timeout_s,
                max_connections=max_connections,
                refused=self.metrics.connection_refused,
                gate=app.admit_early,
                quick=app.quick_refusal if turns is None else partial(app.quick_refusal, admit=True),
                shedding=app.shedding,
                later=None if turns is None else turns.later,  # (one core: http_defer.py)
                release=app.dp.release,
                max_pipelined=lim.max_pipelined_requests,
                cors=app.cors is not None,
                unsent=self.unsent,
                refusals_per_s=lim.overload_refusals_per_s,
                retries_per_s=lim.overload_retries_per_s,
            ),
            ws="none",  # no WebSocket upgrades: every request is plain HTTP
            # the peer is the socket's: X-Forwarded-For would let any client write another address
            # into the audit and access logs (uvicorn trusts it from 127.0.0.1, or anyone with
            # FORWARDED_ALLOW_IPS=*)
            proxy_headers=False,
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,
            timeout_keep_alive=max(1, math.ceil(s.http_idle_timeout_s)),  # uvicorn counts whole seconds
            backlog=2048,
        )
        newest = None
        if self._tls is not None:  # HTTPS: each handshake on the newest context (reloads)
            config.load()  # what serve() would do first; it keeps config.ssl
            config.ssl, newest = self._tls.http_context, self._tls.newest("http/1.1")
        refused = lambda: self.metrics.connection_refused(TOO_MANY_CONNECTIONS)  # noqa: E731
        server = QuietUvicorn(config, s.http_header_timeout_s, max_connections, refused, newest)
        listener = HttpListener(app, server, sock.getsockname()[1])
        await listener.start(sock)
        return listener

    async def _publish_readiness(self) -> bool:
        """The gRPC health service says what the data plane's readiness says (Kubernetes'
        gRPC readiness probe reads it)."""
        ready = self.dataplane.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if self._health is not None:
            await self._health.set("", status)
            await self._health.set(GRPC_SERVICE, status)
        return ready

    async def _watch_readiness(self) -> None:
        """Readiness changes with the models (strict readiness): keep the health service current."""
        last = None
        while self.dataplane.accepting:
            ready = self.dataplane.ready()
            if ready != last:
                last = await self._publish_readiness()
                log.info("readiness: %s", "ready" if last else "not ready (a model that should be loaded is not)")
            await asyncio.sleep(READINESS_POLL_S)

    def _listen_addresses(self) -> list[tuple[str, int]]:
        s = self.settings.server
        on_host = [s.http_port, s.grpc_port, s.metrics_port, s.health_port]
        return [(s.host, p) for p in on_host if p >= 0] + [
            (s.admin_host, p) for p in (s.admin_port, s.admin_http_port) if p >= 0
        ]

    async def drain(self, grace_s: float | None = None) -> bool:
        """Readiness false, refuse new work, let accepted work finish; True if it all did."""
        grace = self.settings.server.exit_timeout_s if grace_s is None else grace_s
        self.dataplane.accepting = False
        if self.routes is not None:  # pending shadow copies go first: nobody waits for them
            self.routes.close()
        for t in self._route_tasks:
            t.cancel()
        if self._readiness is not None:
            self._readiness.cancel()
        if self._keys_watch is not None:
            self._keys_watch.cancel()
        if self._health is not None:  # not ready from now on; "liveness" stays SERVING while the process runs
            await self._publish_readiness()
        log.info("draining: %d requests in flight, grace period %.1f s", self.dataplane.in_flight, grace)
        try:
            # Requests hold on to the version they resolved, so waiting for every served
            # version to be idle waits for every accepted request.
            async with asyncio.timeout(grace):
                while self.dataplane.in_flight:
                    await asyncio.sleep(0.01)
            return True
        except TimeoutError:
            log.warning("grace period over with %d requests still in flight", self.dataplane.in_flight)
            return False

    async def stop(self, grace_s: float | None = None) -> bool:
        clean = await self.drain(grace_s)
        # Until here every new call was answered UNAVAILABLE / 503 (with Connection: close).
        # Closing the listeners races with calls on the wire: gRPC core cancels a call it has
        # read but not yet handed to us, and a connection still in the kernel's accept queue
        # is reset. The log line marks the moment (tests/e2e/test_sigterm.py).
        log.info("closing the listeners")
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        if self._health_grpc is not None:
            await self._health_grpc.stop(1.0)
        if self._admin_grpc is not None:
            await self._admin_grpc.stop(1.0)
        if self._tls is not None:
            self._tls.close()
        for listener in (self._http, self._admin):
            if listener is not None:
                await listener.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.stalls.stop()
        await self.repository.stop()
        self.dataplane.shm.close()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)
        if self.tracing is not None:  # what is queued goes out (the exporter's timeout bounds it)
            await asyncio.to_thread(self.tracing.close)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._shadow_pool is not None:
            self._shadow_pool.shutdown(wait=False, cancel_futures=True)
        if self.routes is not None and self.routes.disagreements is not None:
            self.routes.disagreements.close()
        self.threads.shutdown()
        if self.drift is not None:
            await asyncio.to_thread(self.drift.stop)
        log.info("stopped")
        return clean
