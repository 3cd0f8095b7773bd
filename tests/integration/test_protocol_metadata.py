"""Health, metadata, config, statistics and repository index through all four tritonclient
flavours, plus the standard gRPC health and reflection services."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from protocol_support import FLAVOURS, QUICK, Client, int_list, raw_http, simple_feeds
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException


@pytest.fixture(params=FLAVOURS)
async def client(request, server):
    c = Client(request.param, server)
    yield c
    await c.close()


async def test_server_live_and_ready(client):
    assert await client.call("is_server_live") is True
    assert await client.call("is_server_ready") is True


@pytest.mark.parametrize(
    "path",
    [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/simple",
        "/v2/models/simple/ready",
        "/v2/models/simple/config",
        "/v2/logging",
        "/v2/trace/setting",
    ],
)
def test_a_trailing_slash_is_the_same_path(server, path):
    # Every V2 path is served with a trailing slash as without one; health's and logging's were
    # not (404), while /v2/, /v2/models/NAME/ and the repository index's were.
    plain = raw_http(server, "GET", path)
    slashed = raw_http(server, "GET", path + "/")
    assert plain[0] == slashed[0] == 200, (plain, slashed)
    assert plain[2] == slashed[2]


async def test_model_ready(client):
    assert await client.call("is_model_ready", "simple") is True
    assert await client.call("is_model_ready", "simple", "1") is True
    assert await client.call("is_model_ready", "classifier") is True
    assert await client.call("is_model_ready", "no_such_model") is False
    assert await client.call("is_model_ready", "simple", "7") is False


async def test_server_metadata(client):
    meta = await client.as_json("get_server_metadata")
    assert meta["name"] == "batchgate"
    assert meta["version"]
    for ext in ("binary_tensor_data", "model_repository", "model_configuration", "statistics", "parameters"):
        assert ext in meta["extensions"], ext
    # Triton lists the extensions a client may feature-detect; the request parameters priority
    # and timeout are served (priority levels, queue policies, deadlines), so schedule_policy is
    # listed as Triton lists it; sequence, classification and cuda_shared_memory are not served.
    assert "schedule_policy" in meta["extensions"]
    assert not {"sequence", "classification", "cuda_shared_memory"} & set(meta["extensions"])


@pytest.mark.parametrize("version", ["", "1"])
async def test_model_metadata(client, version):
    meta = await client.as_json("get_model_metadata", "simple", version)
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    for key, names in (("inputs", ["INPUT0", "INPUT1"]), ("outputs", ["OUTPUT0", "OUTPUT1"])):
        assert [t["name"] for t in meta[key]] == names
        for t in meta[key]:
            assert t["datatype"] == "INT32"
            assert int_list(t["shape"]) == [-1, 16]

    # A model without config.pbtxt: completed from the ONNX signature.
    meta = await client.as_json("get_model_metadata", "classifier", version)
    assert [(t["name"], t["datatype"], int_list(t["shape"])) for t in meta["inputs"]] == [("features", "FP32", [-1, 4])]
    assert [(t["name"], t["datatype"], int_list(t["shape"])) for t in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 3])
    ]

    meta = await client.as_json("get_model_metadata", "identity_bytes", version)
    assert meta["inputs"][0]["datatype"] == "BYTES"


async def test_model_metadata_unknown(client):
    e = await client.error_of("get_model_metadata", "no_such_model")
    assert e.status() == client.status("NOT_FOUND")
    assert "no_such_model" in e.message()
    e = await client.error_of("get_model_metadata", "simple", "7")
    assert e.status() == client.status("NOT_FOUND")
    assert "7" in e.message()


async def test_model_config(client):
    if client.grpc:
        resp = await client.call("get_model_config", "simple")
        assert isinstance(resp, service_pb2.ModelConfigResponse)
        cfg = resp.config
        assert isinstance(cfg, model_config_pb2.ModelConfig)
        assert cfg.name == "simple"
        assert cfg.max_batch_size == 8
        assert [i.name for i in cfg.input] == ["INPUT0", "INPUT1"]
        assert cfg.input[0].data_type == model_config_pb2.TYPE_INT32
        assert list(cfg.input[0].dims) == [16]
        assert [o.name for o in cfg.output] == ["OUTPUT0", "OUTPUT1"]
        assert cfg.instance_group[0].count == 2
        assert cfg.version_policy.latest.num_versions == 1  # Triton's default, written out as Triton does
        # and the JSON form the client derives from it
        as_json = await client.call("get_model_config", "classifier", as_json=True)
        assert as_json["config"]["name"] == "classifier"
        assert as_json["config"]["input"][0]["data_type"] == "TYPE_FP32"
    else:
        cfg = await client.call("get_model_config", "simple")
        assert cfg["name"] == "simple"
        assert cfg["max_batch_size"] == 8
        assert cfg["input"][0]["name"] == "INPUT0"
        assert cfg["input"][0]["data_type"] == "TYPE_INT32"
        assert cfg["input"][0]["dims"] == [16]  # numbers, as Triton writes them, not strings
        assert all(isinstance(d, int) for t in cfg["input"] + cfg["output"] for d in t["dims"])
        assert cfg["instance_group"][0]["count"] == 2
        assert cfg["version_policy"] == {"latest": {"num_versions": 1}}
        cfg = await client.call("get_model_config", "classifier", "1")
        assert cfg["max_batch_size"] > 0
        assert cfg["input"][0]["dims"] == [4]
        assert cfg["output"][0]["dims"] == [3]


async def test_model_config_unknown(client):
    e = await client.error_of("get_model_config", "no_such_model")
    assert e.status() == client.status("NOT_FOUND")


async def test_repository_index(client):
    rows = await client.as_json("get_model_repository_index")
    if client.grpc:
        rows = rows["models"]
    by_name = {r["name"]: r for r in rows}
    assert {"simple", "classifier", "identity_bytes", "mlp"} <= set(by_name)
    for name in ("simple", "classifier", "identity_bytes", "mlp"):
        assert by_name[name]["state"] == "READY"
        assert by_name[name]["version"] == "1"


def _stat(entry: dict, *path) -> int:
    """A counter from a statistics entry; gRPC's JSON leaves zero counters out and writes strings."""
    x = entry
    for p in path:
        x = x.get(p, {}) if isinstance(x, dict) else {}
    return int(x) if x not in ({}, None) else 0


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_statistics_count_exactly_the_requests_sent(serve, demo_repo, flavour):
    running = serve(demo_repo, **QUICK)  # a gateway of its own: nobody else's requests in its counters
    client = Client(flavour, running)
    try:
        stats = await client.as_json("get_inference_statistics", "simple")
        (before,) = stats["model_stats"]
        assert before["name"] == "simple" and before["version"] == "1"
        assert _stat(before, "inference_count") == 0
        assert _stat(before, "execution_count") == 0
        assert _stat(before, "inference_stats", "success", "count") == 0

        sent_rows = 0
        for batch in (1, 3, 2):
            await client.infer("simple", simple_feeds(batch))
            sent_rows += batch
        stats = await client.as_json("get_inference_statistics", "simple", "1")
        (after,) = stats["model_stats"]
        assert _stat(after, "inference_count") == sent_rows
        assert _stat(after, "execution_count") == 3
        assert _stat(after, "inference_stats", "success", "count") == 3
        assert _stat(after, "inference_stats", "success", "ns") > 0
        assert _stat(after, "inference_stats", "fail", "count") == 0
        assert _stat(after, "inference_stats", "compute_infer", "count") == 3
        assert _stat(after, "last_inference") > 0

        # one failure counts as a failure, not a success
        bad = {"INPUT0": np.zeros((1, 15), np.int32), "INPUT1": np.zeros((1, 15), np.int32)}
        with pytest.raises(InferenceServerException):
            await client.infer("simple", bad)
        stats = await client.as_json("get_inference_statistics", "simple")
        (failed,) = stats["model_stats"]
        assert _stat(failed, "inference_stats", "success", "count") == 3
        assert _stat(failed, "inference_stats", "fail", "count") == 1
        assert _stat(failed, "inference_count") == sent_rows

        # all models: every one listed, other models untouched
        stats = await client.as_json("get_inference_statistics")
        by_name = {s["name"]: s for s in stats["model_stats"]}
        assert {"simple", "classifier", "identity_bytes", "mlp"} <= set(by_name)
        assert _stat(by_name["classifier"], "inference_count") == 0
        assert _stat(by_name["simple"], "inference_count") == sent_rows

        e = await client.error_of("get_inference_statistics", "no_such_model")
        assert e.status() == client.status("NOT_FOUND")
    finally:
        await client.close()


async def test_grpc_health_check(server):
    async with grpc.aio.insecure_channel(server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        resp = await stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_reflection_lists_the_inference_service(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert "inference.GRPCInferenceService" in names
    assert "grpc.health.v1.Health" in names


def test_grpc_reflection_describes_model_infer(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        (resp,) = list(stub.ServerReflectionInfo(iter([req])))
    assert resp.WhichOneof("message_response") == "file_descriptor_response"
    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in resp.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service if s.name == "GRPCInferenceService" for m in s.method}
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryIndex"} <= methods
