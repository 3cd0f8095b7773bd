"""Pieces of the remote backend that stand alone: a config from V2 metadata, and telling a
request that never reached its upstream from one that did (over real gRPC sockets)."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from batchgate.backends.remote import config_from_metadata, not_delivered
from batchgate.core.errors import ErrorCode
from processes import free_port


def _metadata(shape_in, shape_out, dtype="FP32"):
    return pb.ModelMetadataResponse(
        name="m",
        platform="pytorch_libtorch",
        versions=["1"],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name="x", datatype=dtype, shape=shape_in)],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name="y", datatype="INT64", shape=shape_out)],
    )


def test_config_from_metadata_with_a_batch_dimension():
    cfg = config_from_metadata(_metadata([-1, 3, 224], [-1, 10]), max_batch_size=32)
    assert cfg.max_batch_size == 32
    assert list(cfg.input[0].dims) == [3, 224] and cfg.input[0].data_type == mc.TYPE_FP32
    assert list(cfg.output[0].dims) == [10] and cfg.output[0].data_type == mc.TYPE_INT64


def test_config_from_metadata_without_batching():
    cfg = config_from_metadata(_metadata([-1, 3], [-1]), max_batch_size=0)
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [-1, 3]
    fixed = config_from_metadata(_metadata([2, 3], [2]), max_batch_size=8)  # no -1 first: not batchable
    assert fixed.max_batch_size == 0 and list(fixed.input[0].dims) == [2, 3]


def test_gateway_batching_queues_by_the_upstreams_priority_levels_when_they_are_valid_here():
    """The gateway's queue before the upstream's takes the upstream's priority levels (a request's
    priority travels with it); levels this gateway would refuse are left out, never failing the load."""
    from batchgate.backends.v2_messages import served_config
    from batchgate.remote_models import RemoteModel
    from batchgate.repository.config import schedule_of

    upstream = config_from_metadata(_metadata([-1, 3], [-1]), max_batch_size=8)
    spec = RemoteModel(name="m", upstreams=("127.0.0.1:1",))
    for levels, default, kept in ((3, 2, (3, 2)), (0, 0, (0, 0)), (5000, 1, (0, 0)), (2, 0, (0, 0))):
        upstream.dynamic_batching.priority_levels, upstream.dynamic_batching.default_priority_level = levels, default
        schedule = schedule_of(served_config(spec, upstream).config, 16, "triton")
        assert schedule is not None and (schedule.priority_levels, schedule.default_priority_level) == kept
    passthrough = RemoteModel(name="m", upstreams=("127.0.0.1:1",), batching="passthrough")
    upstream.dynamic_batching.priority_levels, upstream.dynamic_batching.default_priority_level = 3, 2
    assert schedule_of(served_config(passthrough, upstream).config, 16, "triton") is None


def test_config_from_metadata_refuses_an_unknown_datatype():
    from batchgate.core.errors import GatewayError

    with pytest.raises(GatewayError, match="datatype COMPLEX64"):
        config_from_metadata(_metadata([-1], [-1], dtype="COMPLEX64"), 0)


async def test_a_refused_connection_is_not_delivered_and_a_server_answer_is():
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and not_delivered(e.value)

    # a real server that answers UNAVAILABLE itself: the call was delivered
    class Refusing(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):  # its own words may look like a transport's
            await context.abort(grpc.StatusCode.UNAVAILABLE, "feature store: connection refused")

    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and not not_delivered(e.value)
    finally:
        await server.stop(None)


async def test_an_unresolvable_upstream_is_not_delivered():
    async with grpc.aio.insecure_channel("no-such-host.invalid:8001") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and not_delivered(e.value), e.value.details()


async def test_an_upstream_tensor_of_a_type_batchgate_cannot_serve_is_a_clear_load_error():
    from batchgate.backends.remote import RemoteV2Backend
    from batchgate.config import RemoteModel
    from batchgate.core.errors import GatewayError
    from batchgate.monitoring.metrics import Metrics

    cfg = mc.ModelConfig(name="m", max_batch_size=8)
    cfg.input.add(name="x", data_type=mc.TYPE_BF16, dims=[4])
    cfg.output.add(name="y", data_type=mc.TYPE_FP32, dims=[4])
    backend = RemoteV2Backend(RemoteModel("m", ("127.0.0.1:1",)), Metrics())
    try:
        with pytest.raises(GatewayError, match="TYPE_BF16, which batchgate cannot serve"):
            backend._our_config(cfg)
    finally:
        await backend.close()


async def test_a_failed_probe_never_shortens_an_ejection_set_longer_than_60_s():
    """Each failed probe doubles an ejection up to 60 s: with eject_s 300 the first failed probe
    cut it to 60 s, so a longer eject_s held only until then."""
    from batchgate.backends.remote import RemoteV2Backend
    from batchgate.config import RemoteModel
    from batchgate.monitoring.metrics import Metrics

    now = [1000.0]
    for eject_s, then in ((300.0, 300.0), (5.0, 10.0), (40.0, 60.0)):
        spec = RemoteModel("m", (f"127.0.0.1:{free_port()}",), eject_s=eject_s)  # (nothing listens)
        backend = RemoteV2Backend(spec, Metrics(), clock=lambda: now[0])
        up = backend.upstreams[0]
        try:
            up.ejected, up.ejected_until = True, now[0]  # (as _failed leaves it, its time now up)
            await backend._probe(up)
            assert up.ejected and up.eject_s == then and up.ejected_until == now[0] + then, (eject_s, up.why)
            assert f"next probe in {then:g} s" in up.why
        finally:
            await backend.close()


async def test_a_probe_under_way_when_a_call_ejects_the_upstream_does_not_let_it_back_in():
    """A probe that began before calls ejected the upstream, and answered after, let it back in at
    once (its ModelReady still answers when inference hangs): the ejection lasted a moment, not
    eject_s, and a fresh-clone CI run counted two ejections where the test expected one."""
    import asyncio

    from batchgate.backends.remote import RemoteV2Backend
    from batchgate.config import RemoteModel
    from batchgate.monitoring.metrics import Metrics
    from fake_upstream import FakeUpstream

    fake, other = FakeUpstream(), FakeUpstream()
    spec = RemoteModel("fk", (fake.address, other.address), eject_s=300.0, eject_after_failures=3)
    backend = RemoteV2Backend(spec, Metrics())
    try:
        await backend.probe_all()
        up = backend.upstreams[0]
        assert up.in_rotation and backend.upstreams[1].in_rotation, up.why
        fake.ready_delay_s = 0.5
        probe = asyncio.ensure_future(backend._probe(up))
        await asyncio.sleep(0.2)  # (the probe waits for its answer)
        timeout = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        for _ in range(3):
            backend._failed(up, timeout)
        assert up.ejected
        await probe
        assert up.ejected and not up.in_rotation, up.why
        assert "ejected after 3 consecutive failures" in up.why
    finally:
        await backend.close()
        fake.stop()
        other.stop()


def test_forwarding_is_raw_or_decoded():
    from batchgate.core.errors import ConfigError
    from batchgate.remote_models import parse_remote_model

    assert parse_remote_model("name=m upstreams=h:1", "flag").forwarding == "raw"
    assert parse_remote_model("name=m upstreams=h:1 forwarding=decoded", "flag").forwarding == "decoded"
    with pytest.raises(ConfigError) as e:
        parse_remote_model("name=m upstreams=h:1 forwarding=bytes", "flag")
    assert "forwarding must be one of raw, decoded" in str(e.value)


@pytest.mark.parametrize(
    "entry",
    [
        "name=m upstreams=h:1 upstream_model=a upstream_model=b",
        "name=m upstreams=h:1 upstream-model=a upstream_model=b",
        {"name": "m", "upstreams": ["h:1"], "upstream_model": "a", "upstream-model": "b"},
    ],
)
def test_a_key_given_twice_in_a_remote_model_is_refused(entry):
    """The YAML file refuses a key given twice; a flag or environment line took the last one
    silently (as did a mapping giving a key with '_' and with '-'): a typo's value was dropped."""
    from batchgate.core.errors import ConfigError
    from batchgate.remote_models import parse_remote_model

    with pytest.raises(ConfigError) as e:
        parse_remote_model(entry, "flag")
    assert "'upstream_model' is given twice" in str(e.value), e.value


class _Answer:
    """What a failed gRPC call says (the model owner's answer as a front worker reads it)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code", list(ErrorCode))
def test_the_owner_leaves_uncounted_exactly_the_calls_a_front_worker_sends_again(code):
    """The model owner does not count a merged call that failed when the front worker sends its
    requests again one by one (GatewayError.resent_alone): it must judge the worker's way, from
    the code the worker reads over gRPC, else a failure counts twice or not at all."""
    from batchgate.backends.remote import RemoteV2Backend
    from batchgate.core.errors import GatewayError, TooLarge, batch_may_go_alone
    from batchgate.transport.grpc_service import GRPC_STATUS

    class Up:
        address = "unix:/owner.sock"

    for owner_error in (GatewayError(code, "failed"), TooLarge("message larger than max (9 vs. 4)")):
        if owner_error.code is not code:
            continue
        read = RemoteV2Backend._translate(None, Up(), _Answer(GRPC_STATUS[code], owner_error.message))  # type: ignore[arg-type]
        assert owner_error.resent_alone() == batch_may_go_alone(read), (code, read)


def test_the_tls_keys_are_checked_together():
    from batchgate.core.errors import ConfigError
    from batchgate.remote_models import parse_remote_model

    line = parse_remote_model("name=m upstreams=h:1 tls=true tls_ca_file=/ca tls_server_name=up.internal", "flag")
    assert line.tls is True and line.tls_ca_file == "/ca" and line.tls_server_name == "up.internal"
    assert parse_remote_model({"name": "m", "upstreams": ["h:1"], "tls": False}, "file").tls is False
    assert parse_remote_model("name=m upstreams=h:1 token_file=/t", "flag").token_file == "/t"  # (plaintext too)
    for entry, words in [
        ("tls=yes", "'tls' must be true or false"),
        ("tls=true tls_cert_file=/c", "tls_cert_file and tls_key_file go together"),
        ("tls_ca_file=/ca", "tls_ca_file need(s) tls: true"),
        ("tls=true tls_server_name=a/b", "tls_server_name must be a host name"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_remote_model(f"name=m upstreams=h:1 {entry}", "flag")
        assert words in str(e.value), e.value
    with pytest.raises(ConfigError, match="'tls' must be true or false"):
        parse_remote_model({"name": "m", "upstreams": ["h:1"], "tls": 1}, "file")
