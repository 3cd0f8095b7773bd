"""Remote models against an upstream that answers as a test needs (tests/fake_upstream.py): an
UNAVAILABLE it answers itself, parameters it reads, a sequence batcher, a refusal of its own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from batchgate.config import RemoteModel
from batchgate.transport import grpc_codec
from fake_upstream import FakeUpstream

FAST = dict(
    probe_interval_s=0.1,
    eject_s=5.0,
    eject_after_failures=3,
    client=os.environ.get("BATCHGATE_TEST_REMOTE_CLIENT", "h2"),
)


@pytest.fixture
def fake():
    up = FakeUpstream()
    yield up
    up.stop()


def _infer(mod, url, model, value=1.0, params=None, **kw):
    c = mod.InferenceServerClient(url)
    x = mod.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), value, np.float32))
    return c.infer(model, [x], parameters=params, **kw).as_numpy("y")


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_an_unavailable_the_upstream_answers_never_ejects_the_models_only_upstream(fake, serve, mod):
    """Triton answers UNAVAILABLE for a full queue or a request's expired timeout: a moment's
    overload, not an upstream gone. It ejected the only upstream (UNAVAILABLE for everyone)."""
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", retries=0, **FAST),))
    url = running.grpc_url if mod is grpcclient else running.http_url
    for _ in range(5):
        with pytest.raises(InferenceServerException) as e:
            _infer(mod, url, "fk", params={"code": 14})
        assert "UNAVAILABLE" in str(e.value.status()) or e.value.status() == "503"
    np.testing.assert_array_equal(_infer(mod, url, "fk", 3.0), np.full((1, 2), 6.0, np.float32))
    assert mod.InferenceServerClient(url).is_model_ready("fk")
    text = urllib.request.urlopen(running.metrics_url).read().decode()
    assert not [
        x for x in text.splitlines() if x.startswith("batchgate_upstream_ejections_total") and x.endswith(" 1.0")
    ]


def test_an_upstream_version_no_request_could_name_is_not_served_under_it(fake, serve):
    """An upstream that said its version was 19 digits long had the model served as that version,
    past what a request may name (18 digits): gRPC refused the number, HTTP said not ready. Such a
    version is not a number here, as a version directory of that length is not."""
    fake.version = "1" * 19
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),))
    for c in (httpclient.InferenceServerClient(running.http_url), grpcclient.InferenceServerClient(running.grpc_url)):
        meta = c.get_model_metadata("fk")
        versions = meta["versions"] if isinstance(meta, dict) else list(meta.versions)
        assert versions == ["1"], versions
        assert c.is_model_ready("fk", "1")


@pytest.mark.parametrize("path", ["http", "decoded", "gateway"])
def test_parameters_reach_an_upstream_that_declares_a_signature_on_every_path(fake, serve, path):
    """The raw gRPC path sent the caller's parameters; HTTP, forwarding=decoded and gateway
    batching dropped them. Requests whose parameters differ never share a batch."""
    batching, forwarding = (
        ("gateway", "raw") if path == "gateway" else ("passthrough", "raw" if path == "http" else "decoded")
    )
    spec = RemoteModel(
        "fk", (fake.address,), batching=batching, forwarding=forwarding, max_queue_delay_us=20000, **FAST
    )
    running = serve("", remote_models=(spec,))
    mod, url = (httpclient, running.http_url) if path == "http" else (grpcclient, running.grpc_url)

    def call(i):
        return _infer(mod, url, "fk", float(i), params={"tag": f"t{i % 4}", "n": i % 4})

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(call, range(16)))
    for i, y in enumerate(outs):
        np.testing.assert_array_equal(y, np.full((1, 2), 2.0 * i, np.float32))
    assert len(fake.seen) >= 4
    for _, params, _ in fake.seen:
        assert {"tag", "n"} <= set(params), params
        assert params["tag"].string_param == f"t{params['n'].int64_param}"
    # every request went upstream exactly once (batched only with its equals)
    if path == "gateway":
        assert sum(shapes[0][0] for _, _, shapes in fake.seen) == 16


def test_a_sequence_model_upstream_is_sent_each_request_as_it_came(fake, serve):
    """An upstream's sequence batcher needs every step apart, with its sequence parameters: the
    gateway batched the steps of different sequences into one call, without them."""
    running = serve("", remote_models=(RemoteModel("seq", (fake.address,), max_queue_delay_us=20000, **FAST),))
    config = grpcclient.InferenceServerClient(running.grpc_url).get_model_config("seq").config
    assert not config.HasField("dynamic_batching") and not config.HasField("sequence_batching")

    def step(i):
        mod, url = (httpclient, running.http_url) if i % 2 else (grpcclient, running.grpc_url)
        return _infer(mod, url, "seq", float(i), sequence_id=100 + i % 3, sequence_start=i < 3)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(step, range(12)))
    assert len(fake.seen) == 12 and all(shapes == [[1, 2]] for _, _, shapes in fake.seen)
    assert {p["sequence_id"].int64_param for _, p, _ in fake.seen} == {100, 101, 102}


def test_a_shape_tensor_model_upstream_is_sent_each_request_as_it_came(fake, serve):
    """A TensorRT shape tensor holds values about the whole batch, not rows: the gateway merged
    requests to such a model by rows as to any other."""
    running = serve("", remote_models=(RemoteModel("shape", (fake.address,), max_queue_delay_us=20000, **FAST),))
    config = grpcclient.InferenceServerClient(running.grpc_url).get_model_config("shape").config
    assert not config.HasField("dynamic_batching") and config.input[0].is_shape_tensor

    def call(i):
        mod, url = (httpclient, running.http_url) if i % 2 else (grpcclient, running.grpc_url)
        return _infer(mod, url, "shape", float(i))

    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(call, range(12)))
    for i, y in enumerate(outs):
        np.testing.assert_array_equal(y, np.full((1, 2), 2.0 * i, np.float32))
    assert len(fake.seen) == 12 and all(shapes == [[1, 2]] for _, _, shapes in fake.seen)


def test_sequence_parameters_reach_an_upstream_checked_and_as_triton_reads_them(fake, serve):
    """Sequence parameters of a wrong type went to the upstream as given (a sequence_start 'true'
    as text, a float id): refused here, never sent. A uint64 id past int64 went as a string,
    another id to Triton: it is sent as the int64 of the same bits, as Triton takes it, and a
    negative int64 from a gRPC caller is that uint64 too."""
    running = serve("", remote_models=(RemoteModel("seq", (fake.address,), **FAST),))
    top = 2**64 - 1
    assert _infer(httpclient, running.http_url, "seq", sequence_id=top, sequence_start=True) is not None
    assert _infer(grpcclient, running.grpc_url, "seq", sequence_id=-1, sequence_end=True) is not None
    assert _infer(httpclient, running.http_url, "seq", sequence_id="user-7") is not None
    got = [(p["sequence_id"].WhichOneof("parameter_choice"), p["sequence_id"].int64_param) for _, p, _ in fake.seen]
    assert got[:2] == [("int64_param", -1), ("int64_param", -1)]
    assert fake.seen[2][1]["sequence_id"].string_param == "user-7"
    assert fake.seen[0][1]["sequence_start"].bool_param and fake.seen[1][1]["sequence_end"].bool_param
    for mod, url in ((httpclient, running.http_url), (grpcclient, running.grpc_url)):
        for bad, text in (
            ({"sequence_start": "true"}, "parameter 'sequence_start' must be a boolean"),
            ({"sequence_id": 2.5}, "parameter 'sequence_id' must be an unsigned 64-bit integer or a string"),
            # Triton takes it as a bool_param only; forwarded raw it reached the upstream as given
            ({"triton_enable_empty_final_response": "true"}, "'triton_enable_empty_final_response' must be a boolean"),
        ):
            # (tritonclient will not send reserved names as custom parameters: the raw request)
            with pytest.raises(InferenceServerException) as e:
                _raw_infer(mod, url, "seq", bad)
            assert e.value.status() in ("StatusCode.INVALID_ARGUMENT", "400") and text in e.value.message(), bad
    assert len(fake.seen) == 3
    # an id as uint64_param, which Triton refuses over gRPC, is sent on as Triton takes it
    _raw_infer(grpcclient, running.grpc_url, "seq", {}, uint64_id=top)
    assert [p["sequence_id"].WhichOneof("parameter_choice") for _, p, _ in fake.seen[3:]] == ["int64_param"]
    assert fake.seen[3][1]["sequence_id"].int64_param == -1


def _raw_infer(mod, url, model, params, uint64_id=None):
    """One request with reserved parameters, built past tritonclient's check of them."""
    if mod is httpclient:
        inputs = [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]
        body = json.dumps({"inputs": inputs, "parameters": params}).encode()
        try:
            urllib.request.urlopen(f"http://{url}/v2/models/{model}/infer", data=body, timeout=20)
        except urllib.error.HTTPError as err:
            raise InferenceServerException(json.loads(err.read())["error"], str(err.code)) from None
        return
    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
    grpc_codec.set_parameters(req.parameters, params)
    if uint64_id is not None:
        req.parameters["sequence_id"].uint64_param = uint64_id
    with grpc.insecure_channel(url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=20)
        except grpc.RpcError as err:
            raise InferenceServerException(err.details(), str(err.code())) from None


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_an_upstreams_failed_precondition_keeps_its_code(fake, serve, mod):
    """MLServer refuses a request it cannot process with 422 / FAILED_PRECONDITION: the caller's
    to mend, not a server error (it answered INTERNAL / 500)."""
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),))
    url = running.grpc_url if mod is grpcclient else running.http_url
    with pytest.raises(InferenceServerException) as e:
        _infer(mod, url, "fk", params={"code": 9})
    assert e.value.status() in ("StatusCode.FAILED_PRECONDITION", "409"), e.value.status()
    assert "the fake upstream fails with FAILED_PRECONDITION" in e.value.message()


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_an_answer_in_typed_contents_is_served(fake, serve, mod):
    """The V2 protocol lets a server answer in typed contents instead of raw_output_contents: the
    decoded path answered INTERNAL 'without raw output contents' (the raw path passed it on)."""
    spec = RemoteModel("typed", (fake.address,), batching="passthrough", forwarding="decoded", **FAST)
    running = serve("", remote_models=(spec,))
    url = running.grpc_url if mod is grpcclient else running.http_url
    np.testing.assert_array_equal(_infer(mod, url, "typed", 1.5), np.full((1, 2), 3.0, np.float32))


def test_a_new_version_or_signature_upstream_is_followed(fake, serve):
    """The upstream's metadata was read once, at load: after its Triton loaded version 2 with a
    wider input, the gateway still said version 1 and checked requests against the old shape."""
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),))
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.get_model_metadata("fk")["versions"] == ["1"]
    fake.version, fake.width = "2", 3
    deadline = time.monotonic() + 10
    while c.get_model_metadata("fk")["versions"] != ["2"]:
        assert time.monotonic() < deadline, c.get_model_metadata("fk")
        time.sleep(0.1)
    assert c.get_model_metadata("fk")["inputs"][0]["shape"] == [-1, 3]
    x = httpclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.ones((1, 3), np.float32))
    result = c.infer("fk", [x])
    assert result.get_response()["model_version"] == "2"
    np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 3), 2.0, np.float32))


def test_a_new_max_batch_size_upstream_is_followed_and_an_unreadable_config_changes_nothing(fake, serve):
    """Each probe read the metadata only, which a new max_batch_size leaves as it was: after its
    Triton reloaded the model with 4, the gateway still made batches of 8, and the upstream
    refused every one of them until a restart. A probe that cannot read the config now keeps
    what it saw (no reload), and a version change is followed after it."""
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), **FAST),))  # (gateway batching)
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.get_model_config("fk")["max_batch_size"] == 8
    fake.max_batch_size = 4
    deadline = time.monotonic() + 10
    while c.get_model_config("fk")["max_batch_size"] != 4:
        assert time.monotonic() < deadline, c.get_model_config("fk")
        time.sleep(0.1)
    fake.config_code = grpc.StatusCode.UNAVAILABLE.value[0]
    time.sleep(0.5)  # (five probe rounds that cannot read it; a reload would fail to load)
    assert c.is_model_ready("fk") and c.get_model_config("fk")["max_batch_size"] == 4
    np.testing.assert_array_equal(_infer(grpcclient, running.grpc_url, "fk", 1.0), np.full((1, 2), 2.0, np.float32))
    fake.config_code, fake.version = 0, "2"
    while c.get_model_metadata("fk")["versions"] != ["2"]:
        assert time.monotonic() < deadline + 10, c.get_model_metadata("fk")
        time.sleep(0.1)
    assert c.get_model_config("fk")["max_batch_size"] == 4


def test_a_remote_model_named_in_load_model_starts_in_explicit_mode(fake, serve, tmp_path):
    """A remote model loads at start in every mode; named in load_model too (as a user of
    explicit mode names what is to be served), the start failed: "the repository has no
    directory 'fk'"."""
    running = serve(
        str(tmp_path),
        remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),),
        model_control_mode="explicit",
        load_model=("fk",),
    )
    np.testing.assert_array_equal(_infer(grpcclient, running.grpc_url, "fk", 2.0), np.full((1, 2), 4.0, np.float32))


def test_an_upstream_whose_metadata_read_fails_stays_in_the_rotation_while_its_model_is_ready(fake, serve):
    """Each probe reads the metadata after ModelReady, only to follow a change: when that read
    failed (its own 1 s timeout under load, say) the upstream left the rotation, and a model
    with one upstream answered UNAVAILABLE though the upstream said it was ready and served."""
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),))
    url = running.grpc_url
    np.testing.assert_array_equal(_infer(grpcclient, url, "fk", 1.0), np.full((1, 2), 2.0, np.float32))
    fake.metadata_code = grpc.StatusCode.UNAVAILABLE.value[0]
    seen = fake.metadata_calls
    deadline = time.monotonic() + 10
    while fake.metadata_calls < seen + 3:  # two whole probe rounds failed to read it
        assert time.monotonic() < deadline, "the upstream was not probed"
        time.sleep(0.05)
    assert grpcclient.InferenceServerClient(url).is_model_ready("fk")
    np.testing.assert_array_equal(_infer(grpcclient, url, "fk", 3.0), np.full((1, 2), 6.0, np.float32))
    fake.metadata_code, fake.version = 0, "2"  # a change is still followed once the read works again
    c = httpclient.InferenceServerClient(running.http_url)
    deadline = time.monotonic() + 10
    while c.get_model_metadata("fk")["versions"] != ["2"]:
        assert time.monotonic() < deadline, c.get_model_metadata("fk")
        time.sleep(0.1)


def test_a_model_pinned_to_an_upstream_version_is_not_loaded_again_when_another_version_appears(fake, serve):
    """Triton's metadata lists every version it has ready, whichever was asked for: a model pinned
    to version 1 saw "version 1 -> 2" when the upstream loaded version 2 beside it, and was loaded
    again (and again when version 2 went) though what it serves had not changed."""
    spec = RemoteModel("fk", (fake.address,), upstream_version="1", batching="passthrough", **FAST)
    running = serve("", remote_models=(spec,))
    served = running.gateway.repository.resolve("fk", "")
    fake.also = ["2"]
    seen = fake.metadata_calls
    deadline = time.monotonic() + 10
    while fake.metadata_calls < seen + 3:  # two whole probe rounds read the new metadata
        assert time.monotonic() < deadline, "the upstream was not probed"
        time.sleep(0.05)
    assert running.gateway.repository.resolve("fk", "") is served
    assert served.backend.on_change is not None  # (set to None when the change is acted on)
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.get_model_metadata("fk")["versions"] == ["1"]
    fake.width = 3  # what version 1 serves does change: that is followed
    deadline = time.monotonic() + 10
    while c.get_model_metadata("fk")["inputs"][0]["shape"] != [-1, 3]:
        assert time.monotonic() < deadline, c.get_model_metadata("fk")
        time.sleep(0.1)
    assert c.get_model_metadata("fk")["versions"] == ["1"]


@pytest.mark.parametrize("path", ["http", "decoded", "gateway"])
def test_the_parameters_of_an_upstreams_answer_reach_the_caller(fake, serve, path):
    """MLServer answers with parameters (an output's content_type, which its codecs read): the
    raw path passed them on, the decoded path dropped them."""
    batching, forwarding = (
        ("gateway", "raw") if path == "gateway" else ("passthrough", "raw" if path == "http" else "decoded")
    )
    spec = RemoteModel("fk", (fake.address,), batching=batching, forwarding=forwarding, **FAST)
    running = serve("", remote_models=(spec,))
    x = np.ones((1, 2), np.float32)
    if path == "http":
        c = httpclient.InferenceServerClient(running.http_url)
        i = httpclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        resp = c.infer("fk", [i], parameters={"tag": "a"}).get_response()
        assert resp["parameters"]["seen"] == "tag"
        assert resp["outputs"][0]["parameters"]["content_type"] == "np"
    else:
        c = grpcclient.InferenceServerClient(running.grpc_url)
        i = grpcclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        resp = c.infer("fk", [i], parameters={"tag": "a"}).get_response()
        assert resp.parameters["seen"].string_param == "tag"
        assert resp.outputs[0].parameters["content_type"].string_param == "np"


@pytest.mark.parametrize("path", ["http", "decoded", "gateway"])
def test_an_upstreams_wire_parameters_of_an_output_are_not_passed_on(fake, serve, path):
    """An output's binary_data_size or shared_memory_region in the upstream's answer says how the
    upstream sent it, not what it is: passed on, an output the gateway answered in JSON carried
    binary_data_size, and tritonclient's HTTP client read it as binary data (AttributeError
    '_output_name_to_buffer_map'; beside binary outputs, it would slice their bytes)."""
    batching = "gateway" if path == "gateway" else "passthrough"
    spec = RemoteModel("fk", (fake.address,), batching=batching, forwarding="decoded", **FAST)
    running = serve("", remote_models=(spec,))
    x = np.ones((1, 2), np.float32)
    want = np.full((1, 2), 2.0, np.float32)
    if path == "http":
        c = httpclient.InferenceServerClient(running.http_url)
        i = httpclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        for binary in (False, True):
            out = httpclient.InferRequestedOutput("y", binary_data=binary)
            got = c.infer("fk", [i], outputs=[out], parameters={"lie": "wire"})
            np.testing.assert_array_equal(got.as_numpy("y"), want)
            params = got.get_response()["outputs"][0]["parameters"]
            assert params == ({"content_type": "np", "binary_data_size": 8} if binary else {"content_type": "np"})
    else:
        c = grpcclient.InferenceServerClient(running.grpc_url)
        i = grpcclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(x)
        got = c.infer("fk", [i], parameters={"lie": "wire"})
        np.testing.assert_array_equal(got.as_numpy("y"), want)
        assert dict(got.get_response().outputs[0].parameters).keys() == {"content_type"}


def test_a_routed_answer_keeps_the_upstreams_parameters_beside_its_variant(fake, serve, tmp_path):
    from gateway_support import start_gateway
    from route_support import write_config

    remote = {"name": "fk", "upstreams": [fake.address], "batching": "passthrough", "probe_interval_s": 0.1}
    route = {"name": "r", "variants": [{"name": "only", "model": "fk", "weight": 100}]}
    running = start_gateway("", config_file=write_config(str(tmp_path / "c.yaml"), [route], remote_models=[remote]))
    try:
        c = httpclient.InferenceServerClient(running.http_url)
        i = httpclient.InferInput("x", [1, 2], "FP32")
        i.set_data_from_numpy(np.ones((1, 2), np.float32))
        params = c.infer("r", [i], parameters={"tag": "a"}).get_response()["parameters"]
        assert params["variant"] == "only" and params["seen"] == "tag"
    finally:
        running.stop()


@pytest.mark.parametrize("path", ["http", "decoded", "gateway"])
@pytest.mark.parametrize("lie", ["rows", "datatype", "width", "twice", "negative"])
def test_an_answer_that_breaks_the_signature_is_the_upstreams_error(fake, serve, path, lie):
    """An INT32 answer where the signature says FP32 was cast to FP32 and served; one row more
    than a lone request sent was served too (several requests in a batch were refused); an
    output of 3 columns where the signature says 2 was served as it came; an output answered twice
    was served with the second's values; a BYTES output of shape [-1] failed the call with numpy's
    "negative dimensions are not allowed", as the model's own failure, naming no upstream."""
    batching, forwarding = (
        ("gateway", "raw") if path == "gateway" else ("passthrough", "raw" if path == "http" else "decoded")
    )
    spec = RemoteModel("fk", (fake.address,), batching=batching, forwarding=forwarding, retries=0, **FAST)
    running = serve("", remote_models=(spec,))
    mod, url = (httpclient, running.http_url) if path == "http" else (grpcclient, running.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        _infer(mod, url, "fk", 1.0, params={"lie": lie})
    assert e.value.status() in ("StatusCode.INTERNAL", "500"), e.value
    said = {
        "datatype": "answered output 'y' as INT32; its signature says FP32",
        "rows": "has 2 rows, expected 1",
        "width": "answered output 'y' in shape [1, 3]; its signature says [-1, 2]",
        "twice": "output 'y' is answered twice",
        "negative": f"upstream {fake.address} output 'z' has shape [-1]: a dimension below 0",
    }[lie]
    assert said in e.value.message(), e.value.message()
    np.testing.assert_array_equal(_infer(mod, url, "fk", 3.0), np.full((1, 2), 6.0, np.float32))  # serves on


@pytest.mark.parametrize("path", ["http", "decoded", "gateway"])
def test_shapes_declared_by_metadata_alone_do_not_fail_the_answers_they_do_not_match(fake, serve, path):
    """An upstream with no model configs (MLServer) declares shapes in its metadata that it does not
    hold its answers to: an output declared [-1, 2] answered [1, 2, 1] or [1, 3] reached its own
    clients so, and through batchgate failed with INTERNAL ("its signature says"). A config made
    from metadata says so (``remote_config_from``), and its answers are served as they come; a
    batch's answer is still cut by its rows, and a wrong row count or datatype is still refused."""
    fake.config_code = grpc.StatusCode.UNIMPLEMENTED.value[0]
    batching, forwarding = (
        ("gateway", "raw") if path == "gateway" else ("passthrough", "raw" if path == "http" else "decoded")
    )
    spec = RemoteModel(
        "fk", (fake.address,), batching=batching, forwarding=forwarding, retries=0, max_batch_size=8, **FAST
    )
    running = serve("", remote_models=(spec,))
    mod, url = (httpclient, running.http_url) if path == "http" else (grpcclient, running.grpc_url)
    config = mod.InferenceServerClient(url).get_model_config("fk")
    if mod is grpcclient:
        assert config.config.parameters["remote_config_from"].string_value == "metadata"
    else:
        assert config["parameters"]["remote_config_from"]["string_value"] == "metadata"
    got = _infer(mod, url, "fk", 1.0, params={"lie": "rank"})
    np.testing.assert_array_equal(got, np.full((1, 2, 1), 2.0, np.float32))
    np.testing.assert_array_equal(_infer(mod, url, "fk", 1.0, params={"lie": "width"}), np.full((1, 3), 2.0))
    for lie, said in (("rows", "has 2 rows, expected 1"), ("datatype", "as INT32; its signature says FP32")):
        with pytest.raises(InferenceServerException) as e:
            _infer(mod, url, "fk", 1.0, params={"lie": lie})
        assert e.value.status() in ("StatusCode.INTERNAL", "500") and said in e.value.message(), e.value


@pytest.mark.parametrize("client", ["h2", "grpcio"])
@pytest.mark.parametrize("path", ["raw", "decoded", "gateway"])
def test_a_deadline_years_away_is_no_deadline_on_the_upstream_call(fake, serve, client, path):
    """A V2 timeout of 2^63-1 microseconds (a caller's "no limit") or a timeout_s of 1e10 s is a
    deadline centuries away: through grpc.aio it overflowed gRPC's deadline into the past, and
    every call failed at once with DEADLINE_EXCEEDED without reaching the upstream."""
    batching, forwarding = ("gateway", "decoded") if path == "gateway" else ("passthrough", path)
    fast = {**FAST, "client": client}
    spec = RemoteModel("fk", (fake.address,), batching=batching, forwarding=forwarding, timeout_s=1e10, **fast)
    running = serve("", remote_models=(spec,))
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        want = np.full((1, 2), 4.0, np.float32)
        np.testing.assert_array_equal(_infer(mod, url, "fk", 2.0, timeout=2**63 - 1), want)
        np.testing.assert_array_equal(_infer(mod, url, "fk", 2.0), want)  # timeout_s, the remote model's


@pytest.mark.parametrize("client", ["h2", "grpcio"])
@pytest.mark.parametrize("path", ["http", "decoded", "gateway"])
def test_an_answer_that_is_no_message_is_the_upstreams_failure(fake, serve, client, path):
    """An upstream whose answers are bytes that are no ModelInferResponse failed its callers with
    the gateway's own words ("Error parsing message", or grpc.aio's None: "'NoneType' object has
    no attribute 'parameters'"), naming no upstream, and was never ejected: not counted a failure."""
    bad = FakeUpstream()
    bad.lie = "garbage"
    try:
        batching, forwarding = ("gateway", "decoded") if path == "gateway" else ("passthrough", "decoded")
        fast = {**FAST, "client": client, "eject_s": 600.0}
        spec = RemoteModel("fk", (fake.address, bad.address), batching=batching, forwarding=forwarding, **fast)
        running = serve("", remote_models=(spec,))
        mod, url = (httpclient, running.http_url) if path == "http" else (grpcclient, running.grpc_url)
        failed = []
        for i in range(12):
            try:
                np.testing.assert_array_equal(_infer(mod, url, "fk", float(i)), np.full((1, 2), 2.0 * i, np.float32))
            except InferenceServerException as e:
                failed.append(i)
                assert e.status() in ("StatusCode.INTERNAL", "500"), e
                assert f"upstream {bad.address} (INTERNAL): its answer is not a ModelInferResponse" in e.message(), e
        assert 1 <= len(failed) <= 3 and failed[-1] < 8, failed  # three failures eject it
        text = urllib.request.urlopen(running.metrics_url).read().decode()
        ejected = [x for x in text.splitlines() if x.startswith("batchgate_upstream_ejections_total")]
        assert any(bad.address in x and x.endswith(" 1.0") for x in ejected), ejected
    finally:
        bad.stop()


@pytest.mark.parametrize("client", ["h2", "grpcio"])
@pytest.mark.parametrize("path", ["raw", "decoded", "gateway"])
def test_an_upstreams_long_or_multiline_error_message_reaches_the_caller_bounded_on_one_line(
    fake, serve, client, path, caplog
):
    """An upstream's error message went on as it came: one of 20,000 characters (a Python model's
    traceback, say) made the gateway's grpc-message too large for a gRPC client (gRPC core's
    16 KiB hard limit on metadata: it saw RESOURCE_EXHAUSTED "received metadata size exceeds hard
    limit", not the upstream's INVALID_ARGUMENT), and its newlines and escape sequences were
    written into the gateway's log lines as they were."""
    batching, forwarding = ("gateway", "decoded") if path == "gateway" else ("passthrough", path)
    fast = {**FAST, "client": client}
    running = serve(
        "", remote_models=(RemoteModel("fk", (fake.address,), batching=batching, forwarding=forwarding, **fast),)
    )
    say = ": Traceback\nFORGED LOG LINE\x1b[31m " + "z" * 20_000
    for code, want in ((3, ("StatusCode.INVALID_ARGUMENT", "400")), (13, ("StatusCode.INTERNAL", "500"))):
        for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
            with pytest.raises(InferenceServerException) as e:
                _infer(mod, url, "fk", params={"code": code, "say": say})
            message = e.value.message() or ""
            assert e.value.status() in want, (e.value.status(), message[:200])
            assert f"upstream {fake.address} (" in message and "as asked: Traceback\\x0aFORGED LOG LINE\\x1b" in message
            assert "\n" not in message and len(message) < 1000, message[:200]
    assert not [r for r in caplog.records if "\n" in r.getMessage() or "\x1b" in r.getMessage()]


@pytest.mark.parametrize("client", ["h2", "grpcio"])
def test_an_upstream_error_message_over_64_kib_fails_that_call_not_the_connection(fake, serve, client):
    """The h2 client took an answer whose headers passed its 64 KiB limit as an HTTP/2 error: the
    connection was closed and every call on it failed UNAVAILABLE. Now that call alone fails
    RESOURCE_EXHAUSTED (as grpcio's channel fails it), and a call in flight beside it on the same
    connection is answered."""
    running = serve(
        "", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **{**FAST, "client": client}),)
    )
    url = running.grpc_url
    np.testing.assert_array_equal(_infer(grpcclient, url, "fk"), np.full((1, 2), 2.0, np.float32))  # connected

    def big():
        with pytest.raises(InferenceServerException) as e:
            _infer(grpcclient, url, "fk", params={"code": 3, "say": "z" * 70_000})
        return e.value

    with ThreadPoolExecutor(8) as pool:
        fails = [pool.submit(big) for _ in range(4)]
        oks = [pool.submit(_infer, grpcclient, url, "fk", 1.0 + i) for i in range(4)]
        for i, ok in enumerate(oks):
            np.testing.assert_array_equal(ok.result(30), np.full((1, 2), 2.0 * (1.0 + i), np.float32))
        for f in fails:
            error = f.result(30)
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error.message()[:300]
            assert "metadata size exceeds" in (error.message() or ""), error.message()[:300]


def test_an_upstream_whose_inference_hangs_is_ejected_while_another_serves(fake, serve):
    """A wedged upstream (ModelReady answers, inference never does): every call sent to it ran out
    of time, no timeout counted towards ejecting it, and it kept its share of the calls for good.
    A timeout while the upstream answered nothing else, with time to spare over its usual, now
    counts; the calls then go to the other one. A caller's own short deadline against a slow
    upstream that answers is no such sign (the test's warm-up shows its usual time).

    Two more holes, from a fresh-clone CI run: a probe under way when the calls ejected it let it
    back in at once (two ejections counted), and a caller's cancel a few ms before its deadline as
    batchgate reckons it (the caller's clock started earlier) was no timeout: with a 1 s deadline
    none counted."""
    other = FakeUpstream()
    try:
        # (ejected for longer than the test: its probe, which still answers, would let it back in)
        spec = RemoteModel("fk", (fake.address, other.address), batching="passthrough", **{**FAST, "eject_s": 300.0})
        running = serve("", remote_models=(spec,))
        url = running.grpc_url
        for _ in range(12):  # both answer: each has a usual time
            _infer(grpcclient, url, "fk", 1.0)
        fake.hang = True
        outcomes = []
        for _ in range(12):
            try:
                _infer(grpcclient, url, "fk", 1.0, client_timeout=1.0)
                outcomes.append("OK")
            except InferenceServerException as e:
                outcomes.append(str(e.status()))
        metrics = urllib.request.urlopen(running.metrics_url).read().decode()
        ejected = f'batchgate_upstream_ejections_total{{model="fk",upstream="{fake.address}"}} 1.0'
        assert ejected in metrics, (outcomes, [ln for ln in metrics.splitlines() if "ejections" in ln])
        assert outcomes[-4:] == ["OK"] * 4, outcomes  # (the rest went to the other one)
        assert outcomes.count("StatusCode.DEADLINE_EXCEEDED") <= 3, outcomes
    finally:
        other.stop()


def test_an_upstream_version_that_is_no_ascii_number_is_left_aside(fake, serve):
    """A version the upstream lists as "²" (a digit to str.isdigit(), not to int()) failed the
    model's load, and each probe, with ValueError; it is not a version batchgate can serve, and
    is left aside: the model loads, and a later change is still followed."""
    fake.also = ["\u00b2"]
    running = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),))
    assert grpcclient.InferenceServerClient(running.grpc_url).is_model_ready("fk")
    np.testing.assert_array_equal(_infer(grpcclient, running.grpc_url, "fk", 2.0), np.full((1, 2), 4.0, np.float32))
    fake.version = "2"
    c = httpclient.InferenceServerClient(running.http_url)
    deadline = time.monotonic() + 10
    while c.get_model_metadata("fk")["versions"] != ["2"]:
        assert time.monotonic() < deadline, c.get_model_metadata("fk")
        time.sleep(0.1)


@pytest.mark.parametrize("batching", ["gateway", "passthrough"])
def test_a_decoupled_upstream_model_is_not_served_and_says_why(fake, serve, batching):
    """Triton serves a decoupled model (vLLM's, TensorRT-LLM's) on streams only: its ModelInfer
    answers UNIMPLEMENTED, the only call a remote model makes. Such a model loaded READY, its
    config saying decoupled, and failed every request; it is UNAVAILABLE with the reason."""
    slow = {**FAST, "probe_interval_s": 2.0}  # (load retried seldom: a retry timing out says another reason)
    remote = tuple(RemoteModel(m, (fake.address,), batching=batching, **slow) for m in ("dec", "fk"))
    running = serve("", remote_models=remote)
    index = httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
    entry = next(m for m in index if m["name"] == "dec")
    assert entry["state"] == "UNAVAILABLE" and "decoupled" in entry["reason"], entry
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        with pytest.raises(InferenceServerException) as e:
            _infer(mod, url, "dec")
        assert "decoupled" in str(e.value) and "ModelInfer RPC" not in str(e.value), e.value
    # the upstream's other models are served as ever
    np.testing.assert_array_equal(_infer(grpcclient, running.grpc_url, "fk", 2.0), np.full((1, 2), 4.0, np.float32))


def _negation(repo, name: str) -> None:
    """A local model of fk's signature (x FP32 [-1, 2] -> y) that answers -x, not 2x."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "neg", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    os.makedirs(repo / name / "1")
    onnx.save(model, str(repo / name / "1" / "model.onnx"))


def test_a_folder_named_as_a_remote_model_appearing_in_poll_mode_leaves_the_remote_model_serving(fake, serve, tmp_path):
    """At start a folder and a remote model of one name are refused together; a folder that
    appeared later was loaded by the next poll in the remote model's place (its upstreams dropped,
    the folder's model answering under its name), and stayed loaded once the folder was gone."""
    repo = tmp_path / "models"
    repo.mkdir()
    running = serve(
        str(repo),
        remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),),
        model_control_mode="poll",
        repository_poll_s=0.1,
    )
    c = httpclient.InferenceServerClient(running.http_url)

    def polled(name: str, present: bool) -> None:  # a model of the same poll as the folder fk
        deadline = time.monotonic() + 30
        while any(m["name"] == name and m.get("state") == "READY" for m in c.get_model_repository_index()) != present:
            assert time.monotonic() < deadline, c.get_model_repository_index()
            time.sleep(0.1)

    _negation(repo, "fk")
    _negation(repo, "marker")
    polled("marker", True)
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        np.testing.assert_array_equal(_infer(mod, url, "fk", 3.0), np.full((1, 2), 6.0, np.float32))
    assert c.get_model_metadata("fk")["platform"] == "fake"
    np.testing.assert_array_equal(_infer(grpcclient, running.grpc_url, "marker", 3.0), np.full((1, 2), -3.0))
    for name in ("fk", "marker"):
        shutil.rmtree(repo / name)
    polled("marker", False)
    np.testing.assert_array_equal(_infer(grpcclient, running.grpc_url, "fk", 3.0), np.full((1, 2), 6.0, np.float32))


def test_probes_without_an_answer_leave_a_serving_upstream_in_the_rotation(fake, serve, caplog):
    """A single-threaded server (MLServer without parallel workers) whose loop its inference holds
    up answers probes late, or after their timeout: one such probe took the model's only upstream
    out of the rotation, every request UNAVAILABLE until a probe got through, though every call
    succeeded (a real MLServer with a 1.5 s predict: 10 answers, 4,543 UNAVAILABLE in 15 s). Now
    three probes in a row without an answer, while no call got one either, take it out."""
    import logging

    caplog.set_level(logging.INFO, logger="batchgate.remote")
    spec = RemoteModel("fk", (fake.address,), batching="passthrough", **{**FAST, "probe_interval_s": 0.5})
    url = serve("", remote_models=(spec,)).grpc_url
    np.testing.assert_array_equal(_infer(grpcclient, url, "fk", 1.0), np.full((1, 2), 2.0, np.float32))

    def left() -> list[str]:
        return [r.getMessage() for r in caplog.records if "left the rotation" in r.getMessage()]

    def until(done, what: str, call: bool = False) -> None:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, what
            if call:  # (each call answered: the upstream serves)
                np.testing.assert_array_equal(_infer(grpcclient, url, "fk", 3.0), np.full((1, 2), 6.0, np.float32))
            time.sleep(0.02)

    answers = fake.ready_answers
    fake.silent_readies = 2  # a moment's delay: two probes unanswered, the next one answered
    until(lambda: fake.ready_answers > answers, "a probe answered")
    fake.silent_readies = 5  # busy: five probes in a row unanswered, its calls answered meanwhile
    until(lambda: fake.silent_readies == 0, "the probes left unanswered", call=True)
    assert not left(), left()
    assert grpcclient.InferenceServerClient(url).is_model_ready("fk")
    # answering nothing at all: out (6: the first may still find a call answered since the last probe)
    fake.silent_readies = 6
    until(left, "the upstream out of the rotation")
    assert "DEADLINE_EXCEEDED" in left()[0], left()


def test_a_probe_the_upstream_answers_with_an_error_takes_it_out_at_once(fake, serve, caplog):
    """MLServer answers ModelReady for a model it unloaded with UNKNOWN (ModelNotFound): an answer,
    not a probe gone unanswered, so the upstream leaves the rotation at once, its calls answered
    or not (they are: NOT_FOUND), and callers are told UNAVAILABLE with its words."""
    import logging

    caplog.set_level(logging.INFO, logger="batchgate.remote")
    url = serve("", remote_models=(RemoteModel("fk", (fake.address,), batching="passthrough", **FAST),)).grpc_url
    np.testing.assert_array_equal(_infer(grpcclient, url, "fk", 1.0), np.full((1, 2), 2.0, np.float32))
    fake.ready_code = grpc.StatusCode.UNKNOWN.value[0]
    deadline = time.monotonic() + 30
    while not any("left the rotation: UNKNOWN" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the upstream stayed in the rotation"
        with contextlib.suppress(InferenceServerException):  # (out of the rotation since the log was read)
            _infer(grpcclient, url, "fk", 3.0)  # (answered meanwhile)
    with pytest.raises(InferenceServerException) as e:
        _infer(grpcclient, url, "fk", 3.0)
    assert e.value.status() == "StatusCode.UNAVAILABLE" and "ModelReady fails with UNKNOWN" in str(e.value), e.value
