"""batchgate in front of a real MLServer whose models declare no signature.

MLServer's default ``model-settings.json`` lists no inputs or outputs, so its metadata lists
none. Such a model is served open: requests go to the upstream unchecked (it validates them),
answers come back as it gave them, and the gateway batches only when the remote model's own
settings give ``max_batch_size`` > 0, merging only requests alike in input names, datatypes,
non-batch shapes and requested outputs. The same is checked with a batchgate in the middle:
batchgate serving an open model shows no signature either, like MLServer.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from batchgate.config import RemoteModel
from mlserver_support import MLServer
from processes import Proc, serve_args

# The first test's set-up installs MLServer into its own venv on a fresh clone (about a minute)
# and starts it with two models: on a machine busy with four test processes that passed the
# 120 s a test is given (every test of the module then failed at set-up).
pytestmark = pytest.mark.timeout(360)

# A signature in model-settings.json as MLServer users write one: ``rows`` declared [-1], which
# the model answers [N, 1] (MLServer holds no answer to its declaration).
DECLARED = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [
        {"name": "out_x", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "rows", "datatype": "INT64", "shape": [-1]},
    ],
}


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    try:
        server = MLServer(tmp_path_factory.mktemp("mlserver"), {"doubler": {}, "declared": DECLARED})
    except RuntimeError as e:  # no package index here: the peer cannot be installed
        pytest.skip(f"MLServer is not available: {e}")
    yield server
    server.stop()


def _inputs(mod, arrays: dict[str, np.ndarray]):
    out = []
    for name, a in arrays.items():
        dt = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}[a.dtype.name]
        i = mod.InferInput(name, list(a.shape), dt)
        if mod is httpclient:
            i.set_data_from_numpy(a, binary_data=False)
        else:
            i.set_data_from_numpy(a)
        out.append(i)
    return out


def _call(mod, url, model, arrays, outputs=None):
    c = mod.InferenceServerClient(url)
    req_outputs = [mod.InferRequestedOutput(n) for n in outputs] if outputs else None
    return c.infer(model, _inputs(mod, arrays), outputs=req_outputs)


def _served_names(result, mod) -> set[str]:
    resp = result.get_response()
    return {o.name for o in resp.outputs} if mod is grpcclient else {o["name"] for o in resp["outputs"]}


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_a_model_without_a_signature_is_served_unchecked_and_the_upstream_validates(mlserver, serve, mod):
    running = serve("", remote_models=(RemoteModel("doubler", (mlserver.grpc,), batching="passthrough"),))
    url = running.grpc_url if mod is grpcclient else running.http_url
    c = mod.InferenceServerClient(url)
    assert c.is_model_ready("doubler")
    meta = c.get_model_metadata("doubler")
    inputs = meta.inputs if mod is grpcclient else meta["inputs"]
    outputs = meta.outputs if mod is grpcclient else meta["outputs"]
    assert list(inputs) == [] and list(outputs) == []  # what the upstream shows

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[7], [9]], np.int64)
    r = _call(mod, url, "doubler", {"x": x, "ids": ids})
    assert _served_names(r, mod) == {"out_x", "out_ids", "rows"}  # every output it gave
    np.testing.assert_array_equal(r.as_numpy("out_x"), x * 2)
    np.testing.assert_array_equal(r.as_numpy("out_ids"), ids * 2)
    assert r.as_numpy("out_ids").dtype == np.int64  # datatypes as the upstream answered them

    r = _call(mod, url, "doubler", {"x": x, "ids": ids}, outputs=["out_ids"])
    if mod is httpclient:  # decoded at the gateway: only what was asked for
        assert _served_names(r, mod) == {"out_ids"}
    else:  # forwarded as it came: answered as MLServer answers (it gives every output, asked or not)
        direct = _call(grpcclient, mlserver.grpc, "doubler", {"x": x, "ids": ids}, outputs=["out_ids"])
        assert _served_names(r, mod) == _served_names(direct, mod) and "out_ids" in _served_names(r, mod)

    with pytest.raises(InferenceServerException) as e:  # the upstream's refusal, with its message
        _call(mod, url, "doubler", {"boom": x})
    assert "input 'boom' is refused" in e.value.message()
    if mod is httpclient:  # decoded: an output the upstream does not have is the caller's error
        with pytest.raises(InferenceServerException) as e:
            _call(mod, url, "doubler", {"x": x}, outputs=["out_x", "nope"])
        assert e.value.status() == "400" and "no output 'nope'" in e.value.message(), e.value.message()


def test_gateway_batching_merges_only_alike_requests_when_the_settings_give_a_batch_size(mlserver, serve):
    spec = RemoteModel("doubler", (mlserver.grpc,), batching="gateway", max_batch_size=8, max_queue_delay_us=50_000)
    running = serve("", remote_models=(spec,))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    cfg = c.get_model_config("doubler").config
    assert cfg.max_batch_size == 8 and cfg.dynamic_batching.max_queue_delay_microseconds == 50_000

    def one(i):
        width = 3 if i % 2 else 5  # two groups: [1, 3] and [1, 5] never share a call
        x = np.full((1, width), i, np.float32)
        r = _call(grpcclient, running.grpc_url, "doubler", {"x": x})
        np.testing.assert_array_equal(r.as_numpy("out_x"), x * 2)  # its own row, whoever it shared with
        return width, int(r.as_numpy("rows")[0, 0])

    with ThreadPoolExecutor(16) as pool:
        seen = list(pool.map(one, range(32)))
    assert max(rows for _, rows in seen) > 1  # merged at the gateway
    for width in (3, 5):  # at most the requests of its own group in one call
        assert max(rows for w, rows in seen if w == width) <= min(8, 16)
    stats = c.get_inference_statistics("doubler").model_stats[0]
    assert stats.inference_stats.success.count == 32 and stats.execution_count < 32

    # One caller's bad values (NaN: the upstream refuses them) fail only that caller: a batch the
    # upstream refused goes again one request at a time.
    def maybe_bad(i):
        x = np.full((1, 3), np.nan if i == 5 else i, np.float32)
        try:
            r = _call(grpcclient, running.grpc_url, "doubler", {"x": x})
        except InferenceServerException as e:
            return i, e.message()
        return i, r.as_numpy("out_x")[0, 0]

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(maybe_bad, range(8)))
    assert "holds NaN" in str(got.pop(5))
    assert got == {i: 2.0 * i for i in got}

    # Not batchable: inputs whose first dimensions differ, or more rows than the batch size,
    # go alone and unchecked, as they came; the upstream answers them.
    r = _call(
        grpcclient, running.grpc_url, "doubler", {"x": np.ones((2, 3), np.float32), "y": np.ones((1, 3), np.float32)}
    )
    assert r.as_numpy("out_x").shape == (2, 3) and r.as_numpy("out_y").shape == (1, 3)
    big = np.ones((9, 3), np.float32)
    r = _call(grpcclient, running.grpc_url, "doubler", {"x": big})
    assert r.as_numpy("out_x").shape == (9, 3) and r.as_numpy("rows")[0, 0] == 9


def test_without_a_batch_size_each_request_is_sent_as_it_came(mlserver, serve):
    running = serve("", remote_models=(RemoteModel("doubler", (mlserver.grpc,), batching="gateway"),))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    assert c.get_model_config("doubler").config.max_batch_size == 0  # nothing says it may batch

    def one(i):
        return int(
            _call(grpcclient, running.grpc_url, "doubler", {"x": np.ones((1, 3), np.float32)}).as_numpy("rows")[0, 0]
        )

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(16))) == {1}


def test_an_open_model_behind_another_batchgate_is_open_there_too(mlserver, tmp_path):
    """batchgate -> batchgate -> MLServer: the middle one shows no signature, like MLServer,
    and the front one serves it open as well."""
    middle = Proc(serve_args("", "--remote-model", f"name=doubler upstreams={mlserver.grpc} batching=passthrough"))
    front = None
    try:
        middle.wait_ready()
        front = Proc(
            serve_args(
                "",
                "--remote-model",
                f"name=front upstream_model=doubler upstreams={middle.grpc} batching=gateway max_batch_size=4",
            )
        ).wait_ready()
        meta = httpclient.InferenceServerClient(middle.http).get_model_metadata("doubler")
        assert meta["inputs"] == [] and meta["outputs"] == []
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        for mod, url in ((grpcclient, front.grpc), (httpclient, front.http)):
            r = _call(mod, url, "front", {"x": x})
            np.testing.assert_array_equal(r.as_numpy("out_x"), x * 2)
    finally:
        if front is not None:
            front.kill()
        middle.kill()


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_request_and_input_parameters_reach_the_upstream_on_every_path(mlserver, serve, mod):
    """MLServer reads parameters (content_type, say): forwarded raw or decoded at the gateway (HTTP,
    gateway batching), the request's and each input's own parameters go with the request."""
    spec = RemoteModel("doubler", (mlserver.grpc,), batching="gateway", max_batch_size=8)
    running = serve("", remote_models=(spec,))
    url = running.grpc_url if mod is grpcclient else running.http_url
    c = mod.InferenceServerClient(url)
    x = mod.InferInput("x", [2, 3], "FP32")
    if mod is httpclient:
        x.set_data_from_numpy(np.ones((2, 3), np.float32), binary_data=False)
    else:
        x.set_data_from_numpy(np.ones((2, 3), np.float32))
    # (tritonclient has no call for an input's own parameters: set where each client keeps them)
    if mod is httpclient:
        x._parameters["content_type"] = "np"
    else:
        x._input.parameters["content_type"].string_param = "np"
    r = c.infer("doubler", [x], parameters={"echo": True, "tenant": "t1"})
    seen = json.loads(r.as_numpy("params").reshape(-1)[0])
    assert seen["request"].get("echo") is True and seen["request"].get("tenant") == "t1", seen
    assert seen.get("x", {}).get("content_type") == "np", seen


@pytest.mark.parametrize("batching", ["passthrough", "gateway"])
@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
def test_a_declared_shape_the_model_does_not_keep_is_answered_as_mlserver_answers_it(mlserver, serve, mod, batching):
    """``rows`` is declared [-1] and answered [N, 1]: MLServer's own clients get [N, 1]; through
    batchgate every call failed with INTERNAL ("its signature says [-1]"). A config made from
    metadata alone now serves its answers' shapes as they come, batched or not."""
    spec = RemoteModel("declared", (mlserver.grpc,), batching=batching, max_batch_size=8)
    running = serve("", remote_models=(spec,))
    url = running.grpc_url if mod is grpcclient else running.http_url
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    direct = _call(grpcclient, mlserver.grpc, "declared", {"x": x})
    r = _call(mod, url, "declared", {"x": x})
    assert r.as_numpy("rows").shape == direct.as_numpy("rows").shape == (2, 1)
    np.testing.assert_array_equal(r.as_numpy("out_x"), x * 2)
