"""The model repository extension (index, load, unload) through all four tritonclient flavours,
on a gateway in explicit model control mode over a copy of the demo repository."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from protocol_support import FLAVOURS, QUICK, Client, int_list, model_file, onnx_outputs, simple_feeds
from tritonclient.utils import InferenceServerException


@pytest.fixture
def repo_copy(demo_repo, tmp_path) -> str:
    dst = tmp_path / "models"
    shutil.copytree(demo_repo, dst)
    return str(dst)


@pytest.fixture(params=FLAVOURS)
async def explicit(request, serve, repo_copy):
    """A client of one flavour on an explicit-mode gateway that loaded only 'simple'."""
    running = serve(repo_copy, model_control_mode="explicit", load_model=("simple",), **QUICK)
    c = Client(request.param, running)
    c.repo = repo_copy
    yield c
    await c.close()


async def index_of(client) -> dict:
    rows = await client.as_json("get_model_repository_index")
    if client.grpc:
        rows = rows.get("models", [])
    out: dict = {}
    for r in rows:
        out.setdefault(r["name"], []).append(r)
    return out


def states(rows) -> set:
    return {r.get("state", "") for r in rows}


async def classify(client, batch: int = 2):
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
    result = await client.infer("classifier", {"features": x})
    return x, result.as_numpy("probabilities")


async def test_index_shows_what_is_loaded(explicit):
    idx = await index_of(explicit)
    assert set(idx) >= {"simple", "classifier", "identity_bytes", "mlp"}
    assert states(idx["simple"]) == {"READY"}
    assert [r["version"] for r in idx["simple"]] == ["1"]
    for name in ("classifier", "identity_bytes", "mlp"):  # never loaded: the name alone, as Triton lists it
        assert idx[name] == [{"name": name}], idx[name]
    assert await explicit.call("is_model_ready", "simple")
    assert not await explicit.call("is_model_ready", "classifier")


async def test_index_of_an_unloaded_model_names_its_versions(explicit):
    """Triton keeps the versions a model served after it is unloaded: each is listed UNAVAILABLE,
    'unloaded', under its number (never a version "")."""
    await explicit.call("load_model", "classifier")
    await explicit.call("unload_model", "classifier")
    idx = await index_of(explicit)
    assert idx["classifier"] == [{"name": "classifier", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    if explicit.grpc:  # the protobuf itself, not only its JSON form
        resp = await explicit.call("get_model_repository_index")
        (row,) = [m for m in resp.models if m.name == "classifier"]
        assert (row.version, row.state, row.reason) == ("1", "UNAVAILABLE", "unloaded")
    await explicit.call("load_model", "classifier")  # and back
    assert states((await index_of(explicit))["classifier"]) == {"READY"}


async def test_statistics_of_a_model_that_serves_no_version_say_it_is_not_ready(explicit):
    """Triton refuses the statistics of a model with no ready version ("requested model 'm' is not
    available"), as the metadata and config are refused; they were an empty list, as if it had
    no statistics. Not ready is UNAVAILABLE / 503 here, as its metadata answers."""
    for when in ("never loaded", "unloaded"):
        with pytest.raises(InferenceServerException) as info:
            await explicit.as_json("get_inference_statistics", "classifier")
        assert info.value.status() in ("StatusCode.UNAVAILABLE", "503"), when
        assert "model 'classifier' is not ready" in info.value.message(), when
        await explicit.call("load_model", "classifier")
        stats = await explicit.as_json("get_inference_statistics", "classifier")
        assert [(s["name"], s["version"]) for s in stats["model_stats"]] == [("classifier", "1")]
        await explicit.call("unload_model", "classifier")
    every = await explicit.as_json("get_inference_statistics")  # all models: the ready ones
    assert {s["name"] for s in every["model_stats"]} == {"simple"}


async def test_load_then_infer_then_unload(explicit):
    assert not await explicit.call("is_model_ready", "classifier")
    with pytest.raises(InferenceServerException) as info:
        await classify(explicit)
    assert info.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "503", "404")

    await explicit.call("load_model", "classifier")
    assert await explicit.call("is_model_ready", "classifier")
    assert await explicit.call("is_model_ready", "classifier", "1")
    x, probs = await classify(explicit, batch=3)
    want = onnx_outputs(model_file(explicit.repo, "classifier"), {"features": x})["probabilities"]
    np.testing.assert_allclose(probs, want, rtol=1e-6, atol=1e-7)
    idx = await index_of(explicit)
    assert states(idx["classifier"]) == {"READY"}

    await explicit.call("unload_model", "classifier")
    assert not await explicit.call("is_model_ready", "classifier")
    with pytest.raises(InferenceServerException) as info:
        await classify(explicit)
    assert info.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "503", "404")
    assert "classifier" in info.value.message()
    idx = await index_of(explicit)
    assert states(idx["classifier"]) == {"UNAVAILABLE"}
    # the model that was never touched serves on
    feeds = simple_feeds(1)
    result = await explicit.infer("simple", feeds)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])


async def test_ready_only_index(explicit):
    rows = await explicit.as_json("get_model_repository_index")
    if explicit.grpc:
        rows = rows.get("models", [])
    assert any(r["name"] == "classifier" for r in rows)
    # ready-only listing is a protocol option the clients do not expose: ask directly
    running = explicit.running
    if explicit.grpc:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            resp = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
        names = {m.name for m in resp.models}
        assert all(m.state == "READY" for m in resp.models)
    else:
        import http.client

        conn = http.client.HTTPConnection(running.http_url, timeout=10)
        try:
            conn.request("POST", "/v2/repository/index", body=json.dumps({"ready": True}))
            resp = conn.getresponse()
            assert resp.status == 200
            names = {r["name"] for r in json.loads(resp.read())}
        finally:
            conn.close()
    assert names == {"simple"}


async def test_load_with_config_override(explicit):
    override = json.dumps(
        {
            "max_batch_size": 2,
            "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]}],
        }
    )
    await explicit.call("load_model", "classifier", config=override)
    assert await explicit.call("is_model_ready", "classifier")
    if explicit.grpc:
        cfg = (await explicit.call("get_model_config", "classifier")).config
        assert cfg.max_batch_size == 2
    else:
        cfg = await explicit.call("get_model_config", "classifier")
        assert cfg["max_batch_size"] == 2
    meta = await explicit.as_json("get_model_metadata", "classifier")
    assert int_list(meta["inputs"][0]["shape"]) == [-1, 4]

    await classify(explicit, batch=2)
    with pytest.raises(InferenceServerException) as info:
        await classify(explicit, batch=3)
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "2" in info.value.message()

    # loading again without the override goes back to the repository's own config
    await explicit.call("load_model", "classifier")
    if explicit.grpc:
        assert (await explicit.call("get_model_config", "classifier")).config.max_batch_size != 2
    else:
        assert (await explicit.call("get_model_config", "classifier"))["max_batch_size"] != 2
    await classify(explicit, batch=3)


async def test_bad_config_override_is_refused_and_changes_nothing(explicit):
    with pytest.raises(InferenceServerException) as info:
        await explicit.call("load_model", "simple", config='{"max_batch_size": "many"')
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "simple" in info.value.message()
    feeds = simple_feeds(2)
    result = await explicit.infer("simple", feeds)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"])


@pytest.mark.parametrize("text", ["[]", '""', " [ ] "])
async def test_a_config_that_is_json_but_no_object_is_refused(explicit, text):
    """protobuf's JSON parser reads an empty list or string as an empty message: such a config
    loaded the model as if '{}' had been sent. It is no model config; refused, as Triton does."""
    before = await explicit.as_json("get_model_config", "simple")
    with pytest.raises(InferenceServerException) as info:
        await explicit.call("load_model", "simple", config=text)
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "simple" in info.value.message() and "JSON object" in info.value.message(), info.value.message()
    assert await explicit.as_json("get_model_config", "simple") == before


async def test_a_config_naming_another_model_is_refused(explicit):
    """A load's config whose name is not the model's was served renamed, silently; Triton refuses
    it. The model loaded before serves on, and a config with the model's own name still loads."""
    cfg = {"max_batch_size": 4}
    with pytest.raises(InferenceServerException) as info:
        await explicit.call("load_model", "simple", config=json.dumps({**cfg, "name": "other"}))
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "'other'" in info.value.message() and "simple" in info.value.message(), info.value.message()
    assert "other" not in await index_of(explicit)
    if explicit.grpc:
        assert (await explicit.call("get_model_config", "simple")).config.max_batch_size != 4
    else:
        assert (await explicit.call("get_model_config", "simple"))["max_batch_size"] != 4
    await explicit.call("load_model", "simple", config=json.dumps({**cfg, "name": "simple"}))
    result = await explicit.infer("simple", simple_feeds(2))
    assert result.as_numpy("OUTPUT0") is not None


async def test_a_config_asking_for_too_many_instances_is_refused(explicit):
    cfg = json.dumps({"instance_group": [{"count": 1_000_000_000, "kind": "KIND_CPU"}]})
    with pytest.raises(InferenceServerException) as info:
        await explicit.call("load_model", "simple", config=cfg)
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "1000000000 instances; at most 256" in info.value.message(), info.value.message()
    result = await explicit.infer("simple", simple_feeds(2))  # the loaded version serves on
    assert result.as_numpy("OUTPUT0") is not None


def test_http_load_parameters_must_be_an_object(serve, repo_copy):
    import urllib.error
    import urllib.request

    running = serve(repo_copy, model_control_mode="explicit", **QUICK)
    for body in (b'{"parameters": []}', b'{"parameters": 0}', b'{"parameters": null}'):
        req = urllib.request.Request(f"http://{running.http_url}/v2/repository/models/simple/load", data=body)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and "'parameters' must be an object" in e.value.read().decode()


def test_unload_dependents_must_be_a_boolean(serve, repo_copy):
    """Triton refuses an ``unload_dependents`` that is not a boolean (HTTP: "Unable to parse
    'unload_dependents'", gRPC: "expected bool_param"); it was ignored, whatever it held, and the
    model unloaded. tritonclient always sends a boolean, so raw requests send the others."""
    import urllib.error
    import urllib.request

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    running = serve(repo_copy, model_control_mode="explicit", load_model=("simple",), **QUICK)
    url = f"http://{running.http_url}/v2/repository/models/simple/unload"
    for value in ('"yes"', "1", "null", "[]"):
        body = f'{{"parameters": {{"unload_dependents": {value}}}}}'.encode()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10)
        assert e.value.code == 400 and "'unload_dependents'" in e.value.read().decode(), value
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for param in (
            service_pb2.ModelRepositoryParameter(string_param="true"),
            service_pb2.ModelRepositoryParameter(int64_param=1),
            service_pb2.ModelRepositoryParameter(),
        ):
            req = service_pb2.RepositoryModelUnloadRequest(model_name="simple")
            req.parameters["unload_dependents"].CopyFrom(param)
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelUnload(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, param
            assert "'unload_dependents'" in info.value.details(), info.value.details()
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="simple"), timeout=10).ready
        req = service_pb2.RepositoryModelUnloadRequest(model_name="simple")
        req.parameters["unload_dependents"].bool_param = False  # (as tritonclient sends it)
        stub.RepositoryModelUnload(req, timeout=10)
        assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="simple"), timeout=10).ready


def test_http_index_ready_must_be_true_or_false(serve, repo_copy):
    """Triton reads the index request's ``ready`` as a JSON boolean and refuses anything else;
    ``bool()`` of it took ``"false"`` (and ``"no"``, ``1``) for true and answered the ready-only
    listing, the opposite of what was asked."""
    import urllib.error
    import urllib.request

    running = serve(repo_copy, model_control_mode="explicit", load_model=("simple",), **QUICK)
    url = f"http://{running.http_url}/v2/repository/index"
    for body in (b'{"ready": "false"}', b'{"ready": 1}', b'{"ready": null}'):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10)
        assert e.value.code == 400 and "'ready' must be true or false" in e.value.read().decode(), body
    for body, listed in ((b'{"ready": false}', True), (b'{"ready": true}', False), (b"", True)):
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as r:
            assert any(row["name"] == "classifier" for row in json.loads(r.read())) is listed, body


def test_an_unrecognized_load_parameter_is_refused_and_loads_nothing(serve, repo_copy):
    """Triton refuses a load parameter other than 'config' and 'file:...' ("unrecognized load
    parameter"); it was ignored, so a misspelt 'confg' loaded the model from its directory without
    the config it carried. tritonclient sends only the two, so raw requests send the others."""
    import urllib.error
    import urllib.request

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    running = serve(repo_copy, model_control_mode="explicit", load_model=("simple",), **QUICK)
    url = f"http://{running.http_url}/v2/repository/models/classifier/load"
    body = json.dumps({"parameters": {"confg": json.dumps({"max_batch_size": 2})}}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10)
    assert e.value.code == 400 and "unrecognized load parameter 'confg'" in e.value.read().decode()
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.RepositoryModelLoadRequest(model_name="classifier")
        req.parameters["confg"].string_param = json.dumps({"max_batch_size": 2})
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unrecognized load parameter 'confg'" in info.value.details()
        assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="classifier"), timeout=10).ready
        req = service_pb2.RepositoryModelLoadRequest(model_name="classifier")  # the two it takes: loads
        req.parameters["config"].string_param = json.dumps({"max_batch_size": 2})
        stub.RepositoryModelLoad(req, timeout=10)
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="classifier"), timeout=10).ready


def test_a_repository_name_is_refused_and_acts_on_nothing(serve, repo_copy):
    """Triton answers a call naming a repository (HTTP ``/v2/repository/<name>/models/m/unload``,
    gRPC ``repository_name``) UNSUPPORTED: "'repository_name' specification is not supported".
    The name was ignored, so an unload meant for another repository unloaded this one's model.
    tritonclient never names one, so raw requests do."""
    import urllib.error
    import urllib.request

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    running = serve(repo_copy, model_control_mode="explicit", load_model=("simple",), **QUICK)
    base = f"http://{running.http_url}/v2/repository/other"
    for path in ("/models/simple/unload", "/models/classifier/load", "/index"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(base + path, data=b"{}"), timeout=10)
        assert e.value.code == 501 and "naming a repository ('other')" in e.value.read().decode(), path
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = (
            (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name="simple")),
            (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="classifier")),
            (stub.RepositoryIndex, service_pb2.RepositoryIndexRequest()),
        )
        for call, req in calls:
            req.repository_name = "other"
            with pytest.raises(grpc.RpcError) as info:
                call(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, req
            assert "naming a repository ('other')" in info.value.details()
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="simple"), timeout=10).ready
        assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="classifier"), timeout=10).ready
        assert len(stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10).models) > 1


async def test_load_unknown_model(explicit):
    with pytest.raises(InferenceServerException) as info:
        await explicit.call("load_model", "no_such_model")
    assert info.value.status() in ("StatusCode.NOT_FOUND", "404")
    assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        await explicit.call("unload_model", "no_such_model")
    assert info.value.status() in ("StatusCode.NOT_FOUND", "404")


async def test_reload_keeps_serving(explicit):
    feeds = simple_feeds(3, seed=4)
    await explicit.call("load_model", "simple")
    result = await explicit.infer("simple", feeds)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
    idx = await index_of(explicit)
    assert states(idx["simple"]) == {"READY"}


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_load_refused_in_mode_none(serve, demo_repo, flavour):
    running = serve(demo_repo, model_control_mode="none", **QUICK)
    c = Client(flavour, running)
    try:
        for method in ("load_model", "unload_model"):
            with pytest.raises(InferenceServerException) as info:
                await c.call(method, "simple")
            assert info.value.status() in ("StatusCode.UNAVAILABLE", "503"), info.value
            assert "explicit" in info.value.message()
        assert await c.call("is_model_ready", "simple")  # nothing was unloaded
    finally:
        await c.close()
