"""The repository load API cannot reach outside the model repository (issue: safe to expose).

Explicit mode lets a client load models by name, with a config and files of its own. Each of
these was a hole: a name or a file path that walked out of the repository or the staging
directory, a default_model_filename that named any file on the server (and told whether it
existed), staged files left behind, server paths in error messages, and made-up names left in
the index and the metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import urllib.request

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from protocol_support import QUICK
from tritonclient.utils import InferenceServerException

from batchgate.core.types import MODEL_NAME_RULE
from batchgate.demo import _save, classifier_model

CONFIG = json.dumps(
    {
        "max_batch_size": 4,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]}],
    }
)


@pytest.fixture
def staging(tmp_path, monkeypatch) -> str:
    """Where the server stages files given with a load (tempfile's directory, for this test)."""
    d = tmp_path / "staging"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return str(d)


@pytest.fixture
def explicit(tmp_path, serve, staging):
    repo = tmp_path / "models"
    repo.mkdir()
    _save(classifier_model(), str(repo), "clf")
    outside = tmp_path / "outside" / "evil" / "1"
    outside.mkdir(parents=True)
    onnx.save(classifier_model(), str(outside / "model.onnx"))
    running = serve(str(repo), model_control_mode="explicit", load_model=("clf",), metrics_port=0)
    running.repo, running.outside = str(repo), str(tmp_path / "outside")
    return running


def clients(running):
    return [grpcclient.InferenceServerClient(running.grpc_url), httpclient.InferenceServerClient(running.http_url)]


def refused(call, *args, status=("StatusCode.INVALID_ARGUMENT", "400"), **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() in status, (info.value.status(), info.value.message())
    return info.value.message()


def model_bytes() -> bytes:
    return classifier_model().SerializeToString()


def classify(client, name: str) -> np.ndarray:
    mod = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    x = np.ones((1, 4), np.float32)
    i = mod.InferInput("features", [1, 4], "FP32")
    i.set_data_from_numpy(x)
    return client.infer(name, [i]).as_numpy("probabilities")


def test_a_load_with_files_serves_them_and_leaves_nothing_staged(explicit, staging):
    for c in clients(explicit):
        c.load_model("fresh", config=CONFIG, files={"file:1/model.onnx": model_bytes()})
        assert c.is_model_ready("fresh")
        assert classify(c, "fresh").shape == (1, 3)
        assert os.listdir(staging) == [], "the staged files outlived the load"
        c.unload_model("fresh")


BAD_NAMES = ["/tmp/x/evil", "../outside/evil", "a/b", "", ".hidden", "-dash", "x" * 129, "sp ace", "nul\0"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_model_names_outside_the_pattern_are_refused(explicit, name):
    for c in clients(explicit):
        if isinstance(c, httpclient.InferenceServerClient) and ("/" in name or not name or "\0" in name):
            continue  # not a single path segment: the HTTP route itself cannot carry it
        msg = refused(c.load_model, name)
        assert "model names are" in msg and "[A-Za-z0-9_]" in msg, msg
        refused(c.load_model, name, config=CONFIG, files={"file:1/model.onnx": model_bytes()})
        refused(c.unload_model, name)
    idx = {r["name"] for r in clients(explicit)[1].get_model_repository_index()}
    assert idx == {"clf"}


def test_the_traversal_names_of_the_report_load_nothing(explicit):
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    for name in ("/tmp/x/evil", "../outside/evil", os.path.join(explicit.outside, "evil")):
        refused(c.load_model, name)
    assert not c.is_model_ready("evil")


@pytest.mark.parametrize(
    "filename",
    [
        "/etc/hostname",
        "../outside/evil/1/model.onnx",
        "sub/model.onnx",
        "..",
        ".",
        # a name no file system holds, or one that broke the error's line: until 2026-12-06 both
        # were looked for and came back whole in "1/<name> is missing" (a line break, 2,000 characters)
        "model\nERROR forged.onnx",
        "model\u2028x.onnx",
        "m" * 2000,
    ],
)
def test_default_model_filename_is_a_plain_name_and_no_oracle(explicit, filename):
    cfg = json.loads(CONFIG)
    cfg["default_model_filename"] = filename
    for c in clients(explicit):
        msg = refused(c.load_model, "clf", config=json.dumps(cfg))
        assert "default_model_filename" in msg and "plain file name" in msg, msg
        assert "\n" not in msg and "\u2028" not in msg and len(msg) < 400, msg
    assert clients(explicit)[0].is_model_ready("clf")  # the old version still serves


@pytest.mark.parametrize("path", ["../../evil.onnx", "/tmp/evil.onnx", "1/../../evil.onnx", "", "1//"])
def test_file_paths_stay_inside_the_model_directory(explicit, staging, tmp_path, path):
    before = set(os.listdir(tmp_path))
    for c in clients(explicit):
        msg = refused(
            c.load_model, "fresh", config=CONFIG, files={"file:" + path: b"x", "file:1/model.onnx": model_bytes()}
        )
        assert "file" in msg, msg
    assert set(os.listdir(tmp_path)) == before
    assert os.listdir(staging) == []
    assert not os.path.exists("/tmp/evil.onnx")


def test_a_failed_load_leaks_no_path_no_staging_and_no_new_name(explicit, staging):
    for c in clients(explicit):
        msg = refused(
            c.load_model,
            "junk",
            config=CONFIG,
            files={"file:1/model.onnx": b"not a model"},
            status=("StatusCode.INVALID_ARGUMENT", "400", "StatusCode.UNAVAILABLE", "503"),
        )
        assert "junk" in msg
        for secret in (staging, explicit.repo, tempfile.gettempdir(), "/tmp/"):
            assert secret not in msg, msg
        assert os.listdir(staging) == []
    idx = {r["name"] for r in clients(explicit)[1].get_model_repository_index()}
    assert "junk" not in idx
    text = urllib.request.urlopen(explicit.metrics_url, timeout=10).read().decode()
    assert 'model="junk"' not in text


def _external_data_model(location: str) -> bytes:
    """A model whose one initializer lives in an external file at ``location``."""
    t = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[4])
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value="16")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["features", "W"], ["probabilities"])],
        "g",
        [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 4])],
        initializer=[t],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]).SerializeToString()


@pytest.mark.parametrize("location", ["../../x.bin", "../../../../../x.bin", "/etc/hostname", "missing.bin"])
def test_an_external_data_path_in_a_load_error_names_no_server_path(explicit, staging, location):
    """ONNX Runtime names the path an external-data location resolves to ("../../x.bin" lands
    outside the model directory, where hide_paths's directories did not reach): how deep the
    staging or repository folder lies is not the caller's to learn."""
    config = json.dumps({"max_batch_size": 0, "platform": "onnxruntime_onnx"})
    for c in clients(explicit):
        msg = refused(
            c.load_model,
            "ext",
            config=config,
            files={"file:1/model.onnx": _external_data_model(location)},
            status=("StatusCode.INVALID_ARGUMENT", "400", "StatusCode.UNAVAILABLE", "503"),
        )
        assert "ext" in msg
        for secret in (staging, explicit.repo, tempfile.gettempdir(), "/tmp", "/etc"):
            assert secret not in msg, msg


def test_staged_files_do_not_outlive_the_server(tmp_path, serve, staging):
    repo = tmp_path / "models"
    repo.mkdir()
    running = serve(str(repo), model_control_mode="explicit", **QUICK)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    c.load_model("fresh", config=CONFIG, files={"file:1/model.onnx": model_bytes()})
    assert c.is_model_ready("fresh")
    running.stop()
    assert os.listdir(staging) == []


def test_grpc_names_with_control_characters_are_refused_not_logged_raw(explicit):
    channel = grpc.insecure_channel(explicit.grpc_url)
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            service_pb2.RepositoryModelLoadRequest(model_name="evil\nname"), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in info.value.details()


def test_an_unknown_model_s_name_comes_back_escaped(explicit):
    """NUL and a right-to-left override came back raw in the NOT_FOUND message of an infer."""
    for c in clients(explicit):
        msg = refused(
            classify,
            c,
            "no\x00such\u202emodel",
            status=("StatusCode.NOT_FOUND", "404", "StatusCode.INVALID_ARGUMENT", "400"),
        )
        assert "\x00" not in msg and "\u202e" not in msg and "no" in msg, repr(msg)


# ------------------------------------------------------------------ races and cancellation (review findings)
def test_a_failed_load_of_a_new_name_does_not_drop_a_concurrent_good_one(explicit):
    import asyncio

    dp = explicit.gateway.dataplane
    bad = {"config": CONFIG, "file:1/model.onnx": b"not a model"}
    good = {"config": CONFIG, "file:1/model.onnx": model_bytes()}

    async def both():
        return await asyncio.gather(dp.load_model("m", bad), dp.load_model("m", good), return_exceptions=True)

    results = explicit.call(both())
    assert results[0] is not None and results[1] is None, results
    assert dp.model_ready("m")
    assert classify(clients(explicit)[0], "m").shape == (1, 3)


def test_an_unload_racing_a_load_leaves_the_server_ready(explicit):
    import asyncio

    dp = explicit.gateway.dataplane

    async def race():
        load = asyncio.ensure_future(dp.load_model("clf", {}))
        await asyncio.sleep(0)
        await dp.unload_model("clf")
        await load

    explicit.call(race())
    assert not dp.model_ready("clf")
    assert dp.ready(), "an unloaded model is still expected: the replica would never be ready again"


def test_a_load_whose_caller_gives_up_still_finishes_cleanly(explicit, staging):
    import asyncio

    dp = explicit.gateway.dataplane

    async def give_up():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dp.load_model("late", {"config": CONFIG, "file:1/model.onnx": model_bytes()}), 0.001)
        for _ in range(200):
            if dp.model_ready("late"):
                return True
            await asyncio.sleep(0.05)
        return False

    assert explicit.call(give_up())
    rows = {r["name"]: r for r in clients(explicit)[1].get_model_repository_index()}
    assert rows["late"]["state"] == "READY"
    assert os.listdir(staging) == []


def test_clashing_or_overlong_file_paths_are_400_not_500(explicit, staging):
    for c in clients(explicit):
        files = {"file:1": b"x", "file:1/model.onnx": model_bytes()}
        assert "needs a directory where another file is given" in refused(
            c.load_model, "fresh", config=CONFIG, files=files
        )
        files = {"file:1/" + "n" * 300: b"x", "file:1/model.onnx": model_bytes()}
        assert "over 255 bytes" in refused(c.load_model, "fresh", config=CONFIG, files=files)
    assert os.listdir(staging) == []


def test_a_torchscript_model_cannot_be_uploaded_with_a_load(explicit, staging):
    """A TorchScript file is a program (torch.from_file reads any file the server can): one
    uploaded through the repository API would run with the server's rights. Refused, whether the
    config names the platform or only the file name says it."""
    torch_cfg = json.dumps(
        {
            "name": "ts",
            "platform": "pytorch_libtorch",
            "max_batch_size": 8,
            "input": [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": [4]}],
        }
    )
    for c in clients(explicit):
        for cfg, files in (
            (torch_cfg, {"file:1/model.pt": b"PK\x03\x04 not really torchscript"}),
            (CONFIG, {"file:1/model.pt": b"x", "file:1/model.onnx": model_bytes()}),
        ):
            msg = refused(c.load_model, "ts", config=cfg, files=files)
            assert "TorchScript models cannot be uploaded" in msg, msg
        assert os.listdir(staging) == []


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v2%2Frepository/models/clf/unload"),  # past a proxy rule on /v2/repository
        ("POST", "/v2%2frepository%2findex"),
        ("POST", "/v2/models/clf%2Finfer"),  # past the early admission of infer paths as well
        ("POST", "/v2/models/clf%5Cinfer"),
        ("GET", "/v2%2Fhealth%2Fready"),
        # a name or route character percent-encoded: decoded, /v2/%72epository/... passed a
        # proxy rule on the raw /v2/repository just the same (until 2026-12-06)
        ("POST", "/v2/%72epository/models/clf/unload"),
        ("POST", "/v2/repository/models/c%6Cf/unload"),
        ("POST", "/v2/models/c%6cf/infer"),  # the early admission too
        ("POST", "/v2/repository/models/%2E%2E/load"),
        ("GET", "/v2/health/re%61dy"),
    ],
)
def test_an_encoded_separator_in_the_path_is_refused_not_routed(explicit, method, path):
    """A %2F was decoded before routing: /v2%2Frepository/... reached the repository API
    though a proxy in front matched /v2/repository on the raw path and kept it out. So did
    any name character written as %XX; Triton matches the raw path, and no client needs to
    encode one."""
    import http.client

    host, port = explicit.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    conn.request(method, path, body=body.encode() if method == "POST" else None)
    answer = conn.getresponse()
    assert answer.status == 400, (answer.status, answer.read())
    assert "percent-encoded '/'" in json.loads(answer.read())["error"]
    conn.close()
    assert grpcclient.InferenceServerClient(explicit.grpc_url).is_model_ready("clf")  # not unloaded
    # a percent-encoded character no name or route holds (a region name's space) is decoded as before
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v2/systemsharedmemory/region/a%20b%7E/status")
    answer = conn.getresponse()
    assert answer.status == 404 and "'a b~' is not registered" in json.loads(answer.read())["error"]
    conn.close()


def test_a_config_field_name_is_echoed_cut_and_on_one_line(explicit):
    """The protobuf parser quotes an unknown field's name: 1,000 characters and a line break
    came back whole."""
    field = "Q" * 1000 + "\nFORGED line"
    for c in clients(explicit):
        msg = refused(c.load_model, "clf", config=json.dumps({field: 1}))
        assert "not valid" in msg and "QQQ" in msg
        assert msg.count("Q") < 300 and "\n" not in msg, msg


def test_a_skipped_directory_is_told_the_name_rule(tmp_path, serve, caplog):
    """A directory whose name no model may have was skipped "not a valid model name", which left
    the user to guess what a valid one is (a space? a leading '-'? a letter outside ASCII?)."""
    caplog.set_level(logging.WARNING, logger="batchgate.repository")
    _save(classifier_model(), str(tmp_path), "fraud model v2")
    os.makedirs(tmp_path / ".git")
    serve(str(tmp_path))
    assert (
        "skipping directory 'fraud model v2' of the model repository: not a valid model name "
        f"({MODEL_NAME_RULE})" in caplog.messages
    )
