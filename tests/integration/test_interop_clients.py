"""Requests as other V2 clients write them, sent to batchgate unchanged.

MLServer's request types are pydantic models: a body built with its codecs and sent as
``requests.post(url, json=request.dict())`` writes every unset optional field as ``null``
(``id``, ``outputs``, and ``"headers": null`` inside each ``parameters``). MLServer, and
KServe's Python server, read a null as not given; so does batchgate. Its gRPC client, asked for
raw data (``use_raw=True``), writes an empty ``contents {}`` beside each input's raw bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import grpc
import numpy as np
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchgate.demo import _save, classifier_model
from processes import Proc, serve_args


def _post(server, model: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# What MLServer 1.7.1 writes for NumpyRequestCodec.encode_request(np.float32 [[1, 2, 3, 4]]).dict()
# with an output asked for by name (RequestOutput(name=..., parameters=Parameters())).
MLSERVER_DICT_BODY = {
    "id": None,
    "parameters": {"content_type": "np", "headers": None},
    "inputs": [
        {
            "name": "features",
            "shape": [1, 4],
            "datatype": "FP32",
            "parameters": {"content_type": "np", "headers": None},
            "data": [1.0, 2.0, 3.0, 4.0],
        }
    ],
    "outputs": None,
}


def test_a_body_built_by_mlservers_types_is_served(server):
    status, answer = _post(server, "classifier", MLSERVER_DICT_BODY)
    assert status == 200, answer
    assert "id" not in answer
    [out] = answer["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [1, 3]


def test_null_reads_as_not_given_wherever_a_field_is_optional(server):
    body = json.loads(json.dumps(MLSERVER_DICT_BODY))
    body["id"] = "r-7"
    body["parameters"]["binary_data_output"] = None  # not given: JSON outputs
    body["outputs"] = [
        {"name": "probabilities", "parameters": {"content_type": None, "binary_data": None, "headers": None}}
    ]
    status, answer = _post(server, "classifier", body)
    assert status == 200, answer
    assert answer["id"] == "r-7"
    assert len(answer["outputs"][0]["data"]) == 3  # JSON data: binary_data null is not true


def test_what_is_not_a_scalar_is_still_refused(server):
    for where in ("request", "input"):
        body = json.loads(json.dumps(MLSERVER_DICT_BODY))
        params = body["parameters"] if where == "request" else body["inputs"][0]["parameters"]
        params["headers"] = {"a": "b"}
        status, answer = _post(server, "classifier", body)
        assert status == 400 and "'headers'" in answer["error"], answer
    body = dict(MLSERVER_DICT_BODY, id=5)
    status, answer = _post(server, "classifier", body)
    assert status == 400 and answer["error"] == "request 'id' must be a string"


def _grpc_request(empty_contents: bool) -> service_pb2.ModelInferRequest:
    """What MLServer 1.7.1's ModelInferRequestConverter.from_types(..., use_raw=True) writes."""
    req = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.parameters["content_type"].string_param = "np"
        if empty_contents:
            t.contents.SetInParent()  # present, holding no values
        else:
            t.contents.int_contents.extend(range(16))
        req.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return req


def test_raw_data_beside_an_empty_contents_is_served_over_grpc(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(_grpc_request(empty_contents=True), timeout=30)
        assert [o.name for o in answer.outputs] == ["OUTPUT0", "OUTPUT1"]
        got = np.frombuffer(answer.raw_output_contents[0], np.int32)
        assert got.tolist() == [2 * i for i in range(16)]
        try:  # values in both places: which one is meant cannot be told
            stub.ModelInfer(_grpc_request(empty_contents=False), timeout=30)
            raise AssertionError("raw data beside contents holding values was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "in raw_input_contents or in contents, not both" in e.details()


def test_a_model_directory_without_versions_says_what_it_holds_instead(tmp_path, serve):
    """An MLServer model directory (model-settings.json beside the model file) or version
    directories that are not numbers (v1, 01) were told only "has no version directory"."""
    (tmp_path / "iris").mkdir()
    (tmp_path / "iris" / "model-settings.json").write_text('{"name": "iris", "implementation": "x.Y"}')
    (tmp_path / "iris" / "model.joblib").write_bytes(b"\0")
    _save(classifier_model(), str(tmp_path), "named")
    os.rename(tmp_path / "named" / "1", tmp_path / "named" / "v1")
    os.makedirs(tmp_path / "named" / "01")
    os.makedirs(tmp_path / "named" / "\u00b2")  # (a digit to str.isdigit(), not to int(): the scan failed)
    # 19 digits, past what a request may name (and near int64's end): it was served, as a version
    # that no client could ask for by number
    os.makedirs(tmp_path / "named" / "1234567890123456789")
    shutil.copy(tmp_path / "named" / "v1" / "model.onnx", tmp_path / "named" / "1234567890123456789")
    _save(classifier_model(), str(tmp_path), "flat")  # as a user pointing at a model's own directory sees it
    os.rename(tmp_path / "flat" / "1" / "model.onnx", tmp_path / "flat" / "model.onnx")
    os.rmdir(tmp_path / "flat" / "1")
    running = serve(str(tmp_path))
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["iris"]["reason"] == (
        "model 'iris' has no version directory (e.g. iris/1/model.onnx); it holds model-settings.json, an "
        "MLServer model: batchgate serves Triton's layout of ONNX and TorchScript models (convert the model "
        "with batchgate convert, or serve it from MLServer as a remote model)"
    )
    assert rows["flat"]["reason"] == (
        "model 'flat' has no version directory (e.g. flat/1/model.onnx); model.onnx lies in the model directory "
        "itself: move it into a version directory (flat/1/model.onnx), or, if this is one model's directory, "
        "give --model-repository the folder that holds the model directories"
    )
    assert rows["named"]["reason"] == (
        "model 'named' has no version directory (e.g. named/1/model.onnx); not versions (a version directory is "
        "a number of at most 18 digits without a leading 0): 01, 1234567890123456789, v1, \u00b2"
    )


def test_a_repository_that_is_one_models_own_directory_is_told_so(tmp_path, serve):
    """`--model-repository models/clf` (the model's directory, not the folder of models) served its
    version directory as a model '1', told to move its file "into a version directory
    (1/1/model.onnx)": advice that makes things worse."""
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 4\n")
    shutil.copytree(tmp_path / "clf" / "1", tmp_path / "clf" / "2")
    running = serve(str(tmp_path / "clf"))
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert set(rows) == {"1", "2"}
    assert rows["1"]["reason"] == (
        "model '1' has no version directory (e.g. 1/1/model.onnx); '1' is a version directory holding "
        "model.onnx: --model-repository names one model's own directory; give it the folder that holds "
        "the model directories (the parent of this one)"
    )
    # a folder of models where a model named 7 has its file out of place: told to move it, as before
    os.rename(tmp_path / "clf" / "2", tmp_path / "7")
    running = serve(str(tmp_path))
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["7"]["reason"].endswith(
        "model.onnx lies in the model directory itself: move it into a version "
        "directory (7/1/model.onnx), or, if this is one model's directory, give --model-repository the folder "
        "that holds the model directories"
    )


def test_a_model_to_load_that_the_repository_lacks_is_told_so(tmp_path):
    """`--load-model nosuch` was told "has no version directory (e.g. nosuch/1/model.onnx)", as if
    the directory were there."""
    p = Proc(serve_args(str(tmp_path), "--model-control-mode", "explicit", "--load-model", "nosuch"))
    try:
        p.p.wait(60)
    finally:
        p.kill()
    assert p.p.returncode != 0
    assert "failed to load model 'nosuch': model 'nosuch': the repository has no directory 'nosuch'" in p.output()


def test_mlservers_base64_codec_on_a_local_model_is_refused_not_ignored(server):
    """MLServer's Base64Codec sends bytes as base64 text with content_type "base64", and its
    runtimes decode them; a model served here was given the base64 text itself (b"AP8=" for
    b"\\x00\\xff") and answered on it. Other content types (np, str, pd) carry the data as it is."""
    body = {
        "inputs": [
            {
                "name": "INPUT",
                "shape": [1, 1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": ["AP8="],
            }
        ]
    }
    status, answer = _post(server, "identity_bytes", body)
    assert status == 400
    assert answer["error"].startswith(
        "input 'INPUT': parameters.content_type 'base64' is MLServer's base64 codec, which a model served here "
        "does not apply"
    ), answer
    body["inputs"][0]["parameters"]["content_type"] = "str"
    status, answer = _post(server, "identity_bytes", body)
    assert status == 200 and answer["outputs"][0]["data"] == ["AP8="]
    # gRPC, as MLServer's gRPC client writes the parameter
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    t = request.inputs.add(name="INPUT", datatype="BYTES", shape=[1, 1])
    t.parameters["content_type"].string_param = "base64"
    t.contents.bytes_contents.append(b"AP8=")
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=30)
            raise AssertionError("served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "MLServer's base64 codec" in e.details()
