"""Gateway: builds and wires the parts, serves them, drains and stops them.

One asyncio loop hosts the grpc.aio server and the HTTP server; both call
:meth:`Gateway.infer`, so requests from either protocol share the same
schedulers. Models run in a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from tritonclient.grpc import service_pb2 as pb

from . import __version__
from .config import Settings, batching_policies
from .core.errors import ErrorCode, GatewayError
from .core.types import InferRequest, InferResponse
from .model import ServedModel
from .monitoring.metrics import Metrics
from .repository.config import config_to_json
from .repository.manager import ModelRepository
from .transport.grpc_service import InferenceService
from .transport.grpc_service import add_to_server as add_inference_service
from .transport.http_app import HttpApp
from .workers import WorkerPool

log = logging.getLogger("batchgate")

EXTENSIONS = [
    "binary_tensor_data", "model_repository", "model_repository(unload_dependents)",
    "model_configuration", "statistics", "parameters",
]
GRPC_SERVICE = "inference.GRPCInferenceService"


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class Gateway:
    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        threads = settings.infer_threads or max(4, os.cpu_count() or 1)
        self.workers = WorkerPool(threads, "batchgate-infer")
        # Loading, closing and other blocking housekeeping never queue behind executions.
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="batchgate-admin")
        self.repository = ModelRepository(
            settings.model_repository, self.pool, self.workers, self.metrics,
            control_mode=settings.model_control_mode,
            poll_interval_s=settings.repository_poll_secs,
            load_models=settings.load_model,
            default_max_batch_size=settings.default_max_batch_size,
            max_queue_size=settings.max_queue_size,
            retire_grace_s=settings.exit_timeout_secs,
            warm_up=settings.warm_up,
            gpu_device_id=settings.gpu_device_id,
            inline_max_us=settings.inline_execution_max_us,
            batching_policy=settings.batching_policy,
            model_batching_policy=batching_policies(settings),
            remote_models=settings.remote_models,
            max_message_bytes=settings.max_request_bytes,
        )
        self.accepting = False
        self.http_port = self.grpc_port = self.metrics_port = None
        self._grpc: grpc.aio.Server | None = None
        self._http: QuietUvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._metrics_server = None
        self._health: HealthServicer | None = None
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------------ data plane
    @property
    def ready(self) -> bool:
        return self.accepting

    def infer(self, request: InferRequest) -> Awaitable[InferResponse]:
        """Validate ``request`` and hand it to its model version; await the result.

        Not a coroutine itself (one frame less per request): errors found here raise at
        once, before anything is queued."""
        if not self.accepting:
            raise GatewayError(ErrorCode.UNAVAILABLE, "batchgate is shutting down; send the request to another replica")
        served = self.repository.resolve(request.model_name, request.model_version)
        try:
            request.checked = served.signature.check(request)
        except GatewayError as e:
            served.reject(request, e)
            raise
        return served.infer(request)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.repository.served())

    def log_failure(self, protocol: str, model: str, request_id: str, e: GatewayError) -> None:
        log.info("%s request to model '%s' failed: %s %s", protocol, model, e.code.value, e.message,
                 extra={"request_id": request_id or "-"})

    # ------------------------------------------------------------------ metadata
    def server_metadata(self) -> dict:
        return {"name": "batchgate", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str) -> dict:
        served = self.repository.resolve(name, version)
        sig = served.signature
        entry = self.repository.models[name]

        def tensors(specs):
            return [{"name": t.name, "datatype": t.dtype.v2, "shape": t.full_shape(sig.max_batch_size)}
                    for t in specs]

        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": sig.platform,
            "inputs": tensors(sig.inputs),
            "outputs": tensors(sig.outputs),
        }

    def config_json(self, served: ServedModel) -> dict:
        return config_to_json(served.config)

    def statistics(self, name: str, version: str) -> list[dict]:
        if name:
            entry = self.repository.models.get(name)
            if entry is None:
                raise GatewayError(ErrorCode.NOT_FOUND, f"unknown model '{name}'")
            if version:
                return [self.repository.resolve(name, version).stats.as_dict()]
            return [s.stats.as_dict() for _, s in sorted(entry.versions.items())]
        if version:
            raise GatewayError(ErrorCode.INVALID_ARGUMENT, "a version needs a model name")
        return [s.stats.as_dict() for s in self.repository.served()]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        await self.repository.start()
        limit = s.max_request_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0),
        ]
        if s.grpc_max_connection_age_secs > 0:
            # HTTP/2 keeps one connection per client for ever, so behind a Kubernetes Service new
            # replicas would get no gRPC traffic: ask clients to reconnect now and then (with a
            # grace period for the calls in flight), which spreads them over the replicas.
            age_ms = int(s.grpc_max_connection_age_secs * 1000)
            options += [("grpc.max_connection_age_ms", age_ms),
                        ("grpc.max_connection_age_grace_ms", max(age_ms // 10, 5000))]
        self._grpc = grpc.aio.server(options=options)
        add_inference_service(InferenceService(self), self._grpc)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(_join(s.host, s.grpc_port))
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {_join(s.host, s.grpc_port)}")
        await self._grpc.start()

        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
        # listener says it is TCP; without it keep-alive answers wait ~40 ms on delayed ACKs.
        sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((s.host, s.http_port))
        sock.listen(2048)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(HttpApp(self, limit), http="httptools", loop="none", lifespan="off",
                                access_log=False, log_level="warning", log_config=None,
                                timeout_keep_alive=75, backlog=2048)
        self._http_app = config.app
        self._http = QuietUvicorn(config)
        self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)

        if s.metrics_port >= 0:
            server, _thread = start_http_server(s.metrics_port, s.host, registry=self.metrics.registry)
            self._metrics_server = server
            self.metrics_port = server.server_port
        # What start-up allocated lives as long as the process: move it out of the cyclic
        # collector's sight, so full collections under load stay short (bench/batching.py
        # measured 14-18 ms pauses every ~0.7 s without this).
        gc.collect()
        gc.freeze()
        self.accepting = True
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(GRPC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("batchgate %s serving %s: HTTP on %s, gRPC on %s, metrics on %s", __version__,
                 s.model_repository, _join(s.host, self.http_port), _join(s.host, self.grpc_port),
                 _join(s.host, self.metrics_port) if self.metrics_port is not None else "off")

    async def drain(self, grace_s: float | None = None) -> bool:
        """Readiness false, refuse new work, let accepted work finish; True if it all did."""
        grace = self.settings.exit_timeout_secs if grace_s is None else grace_s
        self.accepting = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        log.info("draining: %d requests in flight, grace period %.1f s", self.in_flight, grace)
        try:
            # Requests hold on to the version they resolved, so waiting for every served
            # version to be idle waits for every accepted request.
            async with asyncio.timeout(grace):
                while self.in_flight:
                    await asyncio.gather(*(s.idle() for s in self.repository.served()))
            return True
        except TimeoutError:
            log.warning("grace period over with %d requests still in flight", self.in_flight)
            return False

    async def stop(self, grace_s: float | None = None) -> bool:
        clean = await self.drain(grace_s)
        if self._grpc is not None:
            await self._grpc.stop(1.0)
        if self._http is not None:
            self._http_app.close()
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.repository.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.workers.shutdown()
        self._stopped.set()
        log.info("stopped")
        return clean


def _join(host: str, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
