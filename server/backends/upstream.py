"""One upstream of a remote model: its grpc.aio channel (probes, and infer calls with
``client=grpcio``), its HTTP/2 client (infer calls with ``client=h2``), a blocking channel made
on first use (calls from other threads), and its place in the rotation (``remote.py`` moves it)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..config import RemoteModel
from ..monitoring.metrics import UpstreamMetrics
from .h2_client import H2Channel, H2RpcError
from .upstream_tls import TokenInterceptor, UpstreamSecurity

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
NOT_AN_ANSWER = "its answer is not a ModelInferResponse"
HUNG_MIN_S, HUNG_FACTOR, HUNG_GOOD_ANSWERS = 0.05, 10.0, 5  # see Upstream.hangs


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        # What is sent is bounded already: a request within max_request_bytes, or a gateway batch
        # of such requests (one that gRPC refused for its size failed callers each of which fit).
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", max_message_bytes),
        # An upstream's error message (a Python model's traceback) may pass gRPC's 8 KiB soft and
        # 16 KiB hard limits on metadata: the call would fail RESOURCE_EXHAUSTED, its code and words
        # lost. Taken up to 64 KiB, as the h2 client takes a header block, then cut short where
        # the gateway quotes it (remote.said).
        ("grpc.max_metadata_size", 64 << 10),
        ("grpc.absolute_max_metadata_size", 64 << 10),
        # A restarted upstream is found within a second, not after gRPC's default 2-minute backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


class Upstream:
    """One upstream address: its channel, its place in the rotation, its figures."""

    def __init__(
        self,
        address: str,
        spec: RemoteModel,
        metrics: UpstreamMetrics,
        max_message_bytes: int,
        security: UpstreamSecurity | None = None,
    ):
        self.address = address
        self._max_message_bytes = max_message_bytes
        self.security = security
        self._blocking: grpc.Channel | None = None  # a synchronous channel, made on first use
        self._blocking_infer: Callable[..., pb.ModelInferResponse] | None = None
        self._open_channel()
        self.h2: H2Channel | None = None
        if spec.client == "h2":  # infer calls over batchgate's own HTTP/2 client; probes stay on grpc.aio
            self.h2 = H2Channel(address, max_message_bytes, security)
            self.raw_infer = raw = self.h2.unary(INFER_METHOD)

            async def model_infer(msg, timeout=None, metadata=None):
                answer = await raw(msg.SerializeToString(), timeout, metadata)
                try:
                    return pb.ModelInferResponse.FromString(answer)
                except DecodeError as e:
                    raise H2RpcError(grpc.StatusCode.INTERNAL, f"{NOT_AN_ANSWER} ({e})") from None

            self.model_infer = model_infer
        self.metrics = metrics
        metrics.owner = self  # a reload's new Upstream takes the gauges over
        self.ready = False  # the last probe or call says the model is ready there
        self.failures = 0  # consecutive failed calls
        self.ejected_until = 0.0  # monotonic clock; in rotation again only after a good probe
        self.ejected = False
        self.probed = False  # a first probe's failure is logged as "down at start"
        self.probes_failed = 0  # probes in a row that got no answer, nor did calls (remote.PROBE_FAILURES)
        self.probe_seen = 0  # ``answered`` as the last probe began
        self.eject_s = spec.eject_s
        self.why = "not probed yet"  # why it is out of rotation, for error messages
        self.serves: tuple | None = None  # what its last probe saw served: see _served
        self.outstanding = 0
        # Answers it gave (any status it sent), and how long a good one takes (a moving mean): a
        # call that ran out of time while it answered nothing else, with time to spare over its
        # usual, says it hangs (remote.py counts that towards ejecting it).
        self.answered = 0
        self.good = 0
        self.typical_s = 0.0

    def _open_channel(self) -> None:
        """The grpc.aio channel (plaintext, or TLS with the model's current files; the token
        added to each call) and its callables."""
        sec, options = self.security, _channel_options(self._max_message_bytes)
        interceptors = [TokenInterceptor(sec)] if sec is not None and sec.spec.token_file else None
        if sec is not None and sec.spec.tls:
            self.channel = grpc.aio.secure_channel(
                self.address,
                sec.grpc_credentials(),
                options=options + sec.grpc_options(self.address),
                interceptors=interceptors,
            )
        else:
            self.channel = grpc.aio.insecure_channel(self.address, options=options, interceptors=interceptors)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        # ModelInfer with bytes in and out: a caller's request forwarded as it came (no serializers).
        self.raw_infer = self.channel.unary_unary(INFER_METHOD, _registered_method=True)
        self.model_infer = self.stub.ModelInfer

    def renew(self) -> grpc.aio.Channel:
        """New TLS files: new connections use them (grpc.aio's channel is made again, the h2
        client's connection retired); the old channel is returned, for closing once its calls end."""
        old, h2_calls = self.channel, (self.raw_infer, self.model_infer)
        self._open_channel()
        if self.h2 is not None:
            self.raw_infer, self.model_infer = h2_calls
            self.h2.renew()
        # (the synchronous channel is dropped, not closed: a shadow's call may be on it; it closes when collected)
        self._blocking = self._blocking_infer = None
        return old

    def answered_well(self, seconds: float) -> None:
        """A good answer: the failures in a row end, and its time goes into the usual one."""
        self.failures = 0
        self.answered += 1
        self.good += 1
        self.typical_s = seconds if self.typical_s == 0.0 else 0.9 * self.typical_s + 0.1 * seconds

    def hangs(self, seen: int, budget_s: float) -> bool:
        """Whether a call that ran out of time says it hangs: it answered nothing since the call
        began (``seen``: its answers then), it has given HUNG_GOOD_ANSWERS good answers (its usual
        time is known: a first slow call is no sign), and the call had HUNG_FACTOR times that
        usual time, and at least HUNG_MIN_S."""
        usual = self.good >= HUNG_GOOD_ANSWERS
        return usual and self.answered == seen and budget_s >= max(HUNG_MIN_S, HUNG_FACTOR * self.typical_s)

    @property
    def in_rotation(self) -> bool:
        return self.ready and not self.ejected

    def blocking_infer(self) -> Callable[..., pb.ModelInferResponse]:
        """ModelInfer over a synchronous channel of this upstream's (made here, on the event
        loop's thread), for calls made on other threads."""
        if self._blocking_infer is None:
            sec, options = self.security, _channel_options(self._max_message_bytes)
            if sec is not None and sec.spec.tls:
                self._blocking = grpc.secure_channel(
                    self.address, sec.grpc_credentials(), options + sec.grpc_options(self.address)
                )
            else:
                self._blocking = grpc.insecure_channel(self.address, options=options)
            infer = pb_grpc.GRPCInferenceServiceStub(self._blocking).ModelInfer
            if sec is not None and sec.spec.token_file:
                # (the token as it is at each call: a rotation needs no new channel)
                def infer_with_token(msg, timeout=None, _infer=infer, _sec=sec):
                    return _infer(msg, timeout=timeout, metadata=_sec.metadata)

                self._blocking_infer = infer_with_token
            else:
                self._blocking_infer = infer
        return self._blocking_infer

    def close_blocking(self) -> None:
        if self._blocking is not None:
            self._blocking.close()
            self._blocking = self._blocking_infer = None

    def update_gauge(self) -> None:
        self.metrics.healthy = int(self.in_rotation)
