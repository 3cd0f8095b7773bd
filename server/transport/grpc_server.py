"""The main gRPC listener's server object, on the engine ``server.grpc_engine`` names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..core.errors import GatewayError
from ..security.access import READ, Access
from ..security.tls import ServerTls
from ..settings_sections import LimitSettings, ServerSettings
from . import grpc_codec
from .byte_budget import ByteBudget, UnsentAnswers
from .grpc_h2 import H2GrpcServer
from .grpc_service import GRPC_STATUS, MODEL_INFER, InferenceService, caller_of

log = logging.getLogger("batchgate.grpc")

# Handlers the h2 engine may start in the loop turn that read their request, outside a task
# (none of them needs a current task before its first wait): a refusal, a bad request or a
# probe is then answered without a task at all.
EAGER = frozenset(
    f"/{service}/{method}"
    for service, methods in {
        "inference.GRPCInferenceService": ("ModelInfer", "ModelReady", "ServerLive", "ServerReady"),
        "grpc.health.v1.Health": ("Check",),
    }.items()
    for method in methods
)


def _answer_bytes(answer: pb.ModelInferResponse | bytes) -> bytes:
    """A ModelInfer answer on the wire: a forwarded upstream answer is bytes already."""
    return answer if type(answer) is bytes else answer.SerializeToString()  # type: ignore[union-attr]


def add_to_server(service: InferenceService, server) -> None:
    """Register every RPC of ``inference.GRPCInferenceService``, as the generated
    ``add_GRPCInferenceServiceServicer_to_server`` would, except that ModelInfer and
    ModelStreamInfer receive raw bytes, as every method does on grpc.aio (not the h2 engine,
    which has ``refusers``): unparsable protobuf is INVALID_ARGUMENT by us, not UNKNOWN by grpc."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        impl = getattr(service, method.name, None)
        if impl is None or getattr(type(service), method.name) is getattr(
            pb_grpc.GRPCInferenceServiceServicer, method.name, None
        ):
            continue  # not implemented: grpc answers UNIMPLEMENTED
        req_cls = getattr(pb, method.input_type.name)
        resp_cls = getattr(pb, method.output_type.name)
        raw_in = method.name in ("ModelInfer", "ModelStreamInfer")
        deserializer = None if raw_in else req_cls.FromString
        if not raw_in and not hasattr(server, "refusers"):
            impl, deserializer = grpc_codec.parsed_by_us(impl, req_cls), None
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        serializer = _answer_bytes if method.name == "ModelInfer" else resp_cls.SerializeToString
        handlers[method.name] = make(impl, request_deserializer=deserializer, response_serializer=serializer)
    # Registered methods (grpcio >= 1.62) are matched inside gRPC's core, without a Python
    # lookup per call.
    server.add_registered_method_handlers("inference.GRPCInferenceService", handlers)
    refusers = getattr(server, "refusers", None)  # the h2 engine: ModelInfer refused before parsing
    if refusers is not None:
        refusers["/" + MODEL_INFER] = service.quick_refusal


def new_grpc_server(
    s: ServerSettings,
    lim: LimitSettings,
    max_connections: int,
    reuse_port: bool,
    refused: Callable[[str], None],
    budget: ByteBudget | None = None,
    unsent: UnsentAnswers | None = None,
) -> Any:
    """A grpc.aio server, or batchgate's own HTTP/2 engine; both take the same handlers. ``budget``:
    the process's ``max_buffered_request_bytes``, shared with its HTTP bodies; ``unsent``: its
    ``max_unsent_answer_bytes`` (h2 engine only)."""
    if s.grpc_engine == "h2":
        log.info("gRPC engine: h2 (batchgate's own HTTP/2 engine)")
        return H2GrpcServer(
            max_receive_bytes=lim.max_request_bytes,
            max_connections=max_connections,
            reuse_port=reuse_port,
            refused=refused,
            max_connection_age_s=s.grpc_max_connection_age_s,
            refusals_per_s=lim.grpc_overload_refusals_per_s,
            retries_per_s=lim.overload_retries_per_s,
            max_concurrent_streams=lim.grpc_max_concurrent_streams,
            max_streaming_calls=lim.grpc_max_streaming_calls,
            max_resets_per_s=lim.grpc_max_resets_per_s,
            max_header_bytes=lim.max_header_bytes,
            max_header_fields=lim.max_header_fields,
            eager=EAGER,
            budget=budget or ByteBudget(lim.max_buffered_request_bytes),
            unsent=unsent or UnsentAnswers(lim.max_unsent_answer_bytes),
            handshake_timeout_s=s.http_header_timeout_s,
            body_timeout_s=s.http_body_timeout_s,
            idle_timeout_s=s.grpc_idle_timeout_s,
        )
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", lim.max_request_bytes),
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.so_reuseport", int(reuse_port)),
        # max_connections bounds gRPC connections too; gRPC core refuses the one past it
        # (not counted: core does not tell Python).
        ("grpc.max_allowed_incoming_connections", max_connections),
        # a call's metadata as on the h2 engine (gRPC core's own defaults refused 16 KiB), refused
        # RESOURCE_EXHAUSTED past it: its soft limit refuses at random below its hard one
        ("grpc.max_metadata_size", lim.max_header_bytes),
        ("grpc.absolute_max_metadata_size", lim.max_header_bytes),
        # a connection's handshake (TLS included) within the head timeout, as on the h2 engine
        ("grpc.server_handshake_timeout_ms", max(1, int(s.http_header_timeout_s * 1000))),
    ]
    if s.grpc_max_connection_age_s > 0:
        # HTTP/2 keeps one connection per client for ever, so behind a Kubernetes Service new
        # replicas would get no gRPC traffic: ask clients to reconnect now and then (with a
        # grace period for the calls in flight), which spreads them over the replicas.
        age_ms = int(s.grpc_max_connection_age_s * 1000)
        options += [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", max(age_ms // 10, 5000)),
        ]
    return grpc.aio.server(options=options)


def add_port(server: Any, address: str, tls: ServerTls | None) -> int:
    """Listen on ``address`` with TLS when ``tls`` is given; the port, 0 when it cannot bind."""
    try:
        if tls is None:
            return server.add_insecure_port(address)
        if isinstance(server, H2GrpcServer):
            return server.add_secure_port(address, tls.newest("h2"))
        return server.add_secure_port(address, tls.grpc_credentials())
    except RuntimeError:  # (grpcio raises "Failed to bind to address", with no reason, where it returned 0)
        return 0


def plaintext_health_server(
    servicer: Any, address: str, settings: Any, refused: Callable[[str], None]
) -> tuple[H2GrpcServer, int]:
    """A plaintext gRPC server carrying only grpc.health.v1.Health (``servicer``, the one the
    main port publishes), for kubelet ``grpc:`` probes, which cannot speak TLS. Not started.

    On batchgate's own engine whatever ``server.grpc_engine`` says: gRPC core can bound the
    connections in all but not what one peer holds, and one client holding them all failed
    kubelet's probes (a pod restarted for it). Its refusals count as the main port's with
    ``health_`` for ``grpc_`` (``health_connections``, ``health_peer``...)."""
    max_connections, handshake_timeout_s = settings.limits.ops_max_connections, settings.server.http_header_timeout_s
    server = H2GrpcServer(
        max_receive_bytes=4096,
        max_connections=max_connections,
        max_per_peer=settings.limits.ops_max_connections_per_peer,
        max_concurrent_streams=8,
        max_streaming_calls=max_connections,  # (Watch: a stream a client may keep open)
        refused=lambda reason: refused("health_" + reason.removeprefix("grpc_")),
        max_header_bytes=16 << 10,
        eager=EAGER,
        max_buffered_bytes=max_connections * 8 * 4096,
        handshake_timeout_s=handshake_timeout_s,
        body_timeout_s=handshake_timeout_s,
        refusals_per_s=1000,
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC health (health_port) on {address}")
    return server, port


class _Reflection(reflection.aio.ReflectionServicer):
    """gRPC server reflection; with API keys, for callers with a key of scope ``read``, as every
    call but health's (until 2026-12-06 it answered anyone, and strangers holding its streams
    open took the places of ``grpc_max_streaming_calls`` from callers with a key)."""

    def __init__(self, service_names: tuple[str, ...], access: Access):
        super().__init__(service_names)
        self._access = access

    async def ServerReflectionInfo(self, request_iterator, context):
        try:
            self._access.check_stream(caller_of(context), READ)
        except GatewayError as e:
            await context.abort(GRPC_STATUS[e.code], e.message)
        async for answer in super().ServerReflectionInfo(request_iterator, context):
            yield answer


def add_reflection(server: Any, service_names: tuple[str, ...], access: Access) -> None:
    """gRPC server reflection of ``service_names`` (and its own) on ``server``, either engine."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _Reflection((*service_names, reflection.SERVICE_NAME), access), server
    )
