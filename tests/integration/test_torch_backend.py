"""TorchScript models (platform pytorch_libtorch) served by the real gateway, and the load errors
of platforms batchgate does not serve.

The TorchScript models are made here with torch (traced and scripted) and called with real
tritonclient gRPC and HTTP clients; the answers are checked against the same modules run by
torch directly. The tests that need torch skip where it is not installed; the load-error tests
and the torch-less server (torch blocked from importing) run everywhere.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from batchgate.demo import _save, classifier_model
from gateway_support import start_gateway
from processes import Proc, serve_args

BATCHED = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 200000 }\n"

# Inputs and outputs named <name>__<n>, listed in the config in reverse: they bind by n.
POSITIONAL = (
    'platform: "pytorch_libtorch"\n'
    + BATCHED
    + """input [ { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 3 ] },
          { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 3 ] },
         { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
)
# The same file under names that are neither forward()'s arguments nor indexed: the config order.
CONFIG_ORDER = """backend: "pytorch"
max_batch_size: 8
input [ { name: "first" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "second" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "difference" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "product" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
# forward(mask, count) declared as count, mask: bound by argument name; outputs in config order.
TYPED = """platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "count" data_type: TYPE_INT64 dims: [ 4 ] }, { name: "mask" data_type: TYPE_BOOL dims: [ 4 ] } ]
output [ { name: "signed" data_type: TYPE_INT64 dims: [ 4 ] },
         { name: "flipped" data_type: TYPE_BOOL dims: [ 4 ] },
         { name: "half" data_type: TYPE_FP16 dims: [ 4 ] } ]
"""
# The model returns FP32 where this config says INT32: the load's warm-up run finds it.
WRONG_TYPE = POSITIONAL.replace('name: "OUTPUT__0" data_type: TYPE_FP32', 'name: "OUTPUT__0" data_type: TYPE_INT32')
SUPPORTED = "batchgate serves onnxruntime, onnxruntime_onnx, pytorch, pytorch_libtorch"


def _write(repo: str, name: str, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        path = os.path.join(repo, name, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def _modules(torch):
    """Two small modules: ``pair`` (traced; two inputs, two outputs, neither symmetric in its
    inputs, so a swap shows) and ``typed`` (scripted; BOOL, INT64 in, INT64, BOOL, FP16 out)."""

    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return a - 2 * b, a * b + 1

    class Typed(torch.nn.Module):
        def forward(self, mask, count):
            return torch.where(mask, count, -count), ~mask, count.to(torch.float16) * 0.5

    example = (torch.ones(2, 3), torch.ones(2, 3))
    return torch.jit.trace(Pair().eval(), example), torch.jit.script(Typed().eval())


@pytest.fixture(scope="module")
def torch_served(tmp_path_factory):
    torch = pytest.importorskip("torch")
    repo = str(tmp_path_factory.mktemp("torch_models"))
    pair, typed = _modules(torch)
    for name, module, config in (
        ("pos", pair, POSITIONAL),
        ("ordered", pair, CONFIG_ORDER),
        ("typed", typed, TYPED),
        ("wrong_type", pair, WRONG_TYPE),
        ("on_gpu", pair, POSITIONAL + "instance_group [ { count: 2 kind: KIND_GPU } ]\n"),
    ):
        os.makedirs(os.path.join(repo, name, "1"))
        torch.jit.save(module, os.path.join(repo, name, "1", "model.pt"))
        _write(repo, name, {"config.pbtxt": config})
    running = start_gateway(repo, inline_execution_max_us=0)
    yield torch, pair, typed, running
    running.stop()


def _infer(mod, url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict:
    c = mod.InferenceServerClient(url)
    given = []
    for name, arr in inputs.items():
        i = mod.InferInput(
            name, list(arr.shape), {np.float32: "FP32", np.int64: "INT64", np.bool_: "BOOL"}[arr.dtype.type]
        )
        i.set_data_from_numpy(arr)
        given.append(i)
    wanted = [mod.InferRequestedOutput(n) for n in outputs] if outputs else None
    result = c.infer(model, given, outputs=wanted)
    meta = c.get_model_metadata(model, as_json=True) if mod is grpcclient else c.get_model_metadata(model)
    names = outputs or [o["name"] for o in meta["outputs"]]
    return {n: result.as_numpy(n) for n in names}


def test_a_torchscript_model_answers_over_grpc_and_http_as_torch_does(torch_served):
    torch, pair, typed, running = torch_served
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((2, 3), np.float32), rng.standard_normal((2, 3), np.float32)
    with torch.inference_mode():
        d, p = (t.numpy() for t in pair(torch.from_numpy(x), torch.from_numpy(y)))
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        got = _infer(mod, url, "pos", {"INPUT__1": y, "INPUT__0": x})
        np.testing.assert_allclose(got["OUTPUT__0"], d, rtol=1e-6)
        np.testing.assert_allclose(got["OUTPUT__1"], p, rtol=1e-6)
        only = _infer(mod, url, "pos", {"INPUT__0": x, "INPUT__1": y}, outputs=["OUTPUT__1"])
        np.testing.assert_allclose(only["OUTPUT__1"], p, rtol=1e-6)
        got = _infer(mod, url, "ordered", {"second": y, "first": x})
        np.testing.assert_allclose(got["difference"], d, rtol=1e-6)
        np.testing.assert_allclose(got["product"], p, rtol=1e-6)

    mask = np.array([True, False, True, False])
    count = np.array([1, 2, -3, 4], np.int64)
    with torch.inference_mode():
        want = [t.numpy() for t in typed(torch.from_numpy(mask), torch.from_numpy(count))]
    got = _infer(grpcclient, running.grpc_url, "typed", {"count": count, "mask": mask})
    assert got["signed"].dtype == np.int64 and got["signed"].tolist() == want[0].tolist() == [1, -2, -3, -4]
    assert got["flipped"].dtype == np.bool_ and got["flipped"].tolist() == want[1].tolist()
    assert got["half"].dtype == np.float16 and got["half"].tolist() == want[2].tolist() == [0.5, 1.0, -1.5, 2.0]

    meta = httpclient.InferenceServerClient(running.http_url).get_model_metadata("pos")
    assert meta["platform"] == "pytorch_libtorch"
    config = httpclient.InferenceServerClient(running.http_url).get_model_config("ordered")
    assert config["backend"] == "pytorch" and config["platform"] == "pytorch_libtorch"  # completed as Triton does
    assert config["max_batch_size"] == 8
    served = running.gateway.repository.resolve("pos", "")
    assert type(served.backend).__name__ == "TorchScriptBackend" and served.backend.providers() == ["cpu"]
    # torch's intra-op threads are as many as this process's cores, as ONNX Runtime's sessions'
    # are (the tests set OMP_NUM_THREADS=1, torch's default otherwise). Asked on a new thread:
    # each thread takes torch's process setting when it first runs torch.
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    assert seen == [len(os.sched_getaffinity(0))]


def test_a_config_the_model_does_not_match_fails_its_load_with_the_reason(torch_served):
    _, _, _, running = torch_served
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["wrong_type"]["state"] == "UNAVAILABLE"
    reason = rows["wrong_type"]["reason"]
    assert (
        "output 'OUTPUT__0' comes out as float32 but the config declares TYPE_INT32" in reason and "warm-up" in reason
    )
    assert all(rows[n]["state"] == "READY" for n in ("pos", "ordered", "typed"))


def test_a_gpu_instance_group_runs_on_cuda_or_without_it_on_the_cpu(torch_served):
    """KIND_GPU: CUDA where torch has it; elsewhere the CPU serves (logged), as for ONNX models."""
    torch, pair, _, running = torch_served
    served = running.gateway.repository.resolve("on_gpu", "")
    assert served.backend.providers() == (["cuda:0"] if torch.cuda.is_available() else ["cpu"])
    assert served.instances == 2
    x = np.full((1, 3), 2.0, np.float32)
    got = _infer(httpclient, running.http_url, "on_gpu", {"INPUT__0": x, "INPUT__1": x})
    np.testing.assert_allclose(got["OUTPUT__0"], -x)
    np.testing.assert_allclose(got["OUTPUT__1"], x * x + 1)


def _scrape(url: str, name: str, model: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    m = re.search(rf'^{name}\{{model="{model}",version="1"\}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not exported"
    return float(m.group(1))


def test_concurrent_requests_are_batched_with_statistics_and_metrics(torch_served):
    torch, pair, _, running = torch_served
    http = httpclient.InferenceServerClient(running.http_url)

    def counts():
        s = http.get_inference_statistics("pos")["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    before = counts()
    runs_before = _scrape(running.metrics_url, "batchgate_execution_count_total", "pos")
    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 1, 3)

    def call(i):
        return _infer(grpcclient, running.grpc_url, "pos", {"INPUT__0": rows[i], "INPUT__1": rows[15 - i]})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(16)))
    for i, got in enumerate(answers):  # each caller gets its own rows back
        np.testing.assert_allclose(got["OUTPUT__0"], rows[i] - 2 * rows[15 - i])
        np.testing.assert_allclose(got["OUTPUT__1"], rows[i] * rows[15 - i] + 1)
    inferences, executions = (a - b for a, b in zip(counts(), before))
    assert inferences == 16 and executions < 16
    runs = _scrape(running.metrics_url, "batchgate_execution_count_total", "pos") - runs_before
    assert runs == executions
    assert _scrape(running.metrics_url, "batchgate_model_ready", "pos") == 1
    text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    bigger = re.findall(r'^batchgate_batch_size_bucket\{le="1",model="pos",version="1"\} (\S+)$', text, re.M)
    total = re.findall(r'^batchgate_batch_size_count\{model="pos",version="1"\} (\S+)$', text, re.M)
    assert bigger and total and float(bigger[0]) < float(total[0])  # some executions ran more than one row


def test_unsupported_platforms_fail_to_load_naming_the_platform(tmp_path, serve):
    """Models of platforms batchgate does not serve, with and without a config.pbtxt: each one's
    reason names its platform and the platforms served."""
    repo = str(tmp_path)
    _write(repo, "py_backend", {"config.pbtxt": 'backend: "python"\n', "1/model.py": "class TritonPythonModel: ...\n"})
    _write(repo, "py_file", {"1/model.py": "class TritonPythonModel: ...\n"})
    ensemble = """platform: "ensemble"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
ensemble_scheduling { step [ { model_name: "clf" model_version: -1
  input_map { key: "features" value: "x" } output_map { key: "probabilities" value: "y" } } ] }
"""
    _write(repo, "ens", {"config.pbtxt": ensemble})
    _write(repo, "trt", {"1/model.plan": b"\x00plan"})
    _write(repo, "tf_saved", {"1/model.savedmodel/saved_model.pb": b"\x00"})
    _write(repo, "tf_graph", {"config.pbtxt": 'platform: "tensorflow_graphdef"\n', "1/model.graphdef": b"\x00"})
    _write(repo, "typo", {"config.pbtxt": 'platform: "onnx"\n', "1/model.onnx": b"\x00"})
    _write(repo, "onnx_but_pt", {"config.pbtxt": 'platform: "onnxruntime_onnx"\n', "1/model.pt": b"\x00"})
    _save(classifier_model(), repo, "clf")
    running = serve(repo)
    c = httpclient.InferenceServerClient(running.http_url)
    rows = {r["name"]: r for r in c.get_model_repository_index()}
    expected = {
        "py_backend": "platform 'python' is not served",
        "py_file": "platform 'python' (recognised by 1/model.py) is not served",
        "ens": "platform 'ensemble' is not served",
        "trt": "platform 'tensorrt_plan' (recognised by 1/model.plan) is not served",
        "tf_saved": "platform 'tensorflow_savedmodel' (recognised by 1/model.savedmodel) is not served",
        "tf_graph": "platform 'tensorflow_graphdef' is not served",
        "typo": "platform 'onnx' is not served",
    }
    for name, text in expected.items():
        assert rows[name]["state"] == "UNAVAILABLE", name
        assert text in rows[name]["reason"] and SUPPORTED in rows[name]["reason"], rows[name]["reason"]
    reason = rows["onnx_but_pt"]["reason"]
    assert "1/model.onnx is missing" in reason and "model.pt, a pytorch_libtorch model" in reason
    assert c.is_model_ready("clf")  # the servable model beside them serves
    assert not any(repo in r["reason"] for r in rows.values())  # no server path in what a client reads


def test_a_torchscript_model_needs_its_config(tmp_path, serve):
    """No config.pbtxt beside 1/model.pt, or one without outputs, or with a type torch has no
    tensor for: each is told before torch is asked to open the file (so torch need not be here)."""
    repo = str(tmp_path)
    _write(repo, "no_config", {"1/model.pt": b"\x00"})
    _write(
        repo,
        "no_outputs",
        {
            "config.pbtxt": 'platform: "pytorch_libtorch"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]\n',
            "1/model.pt": b"\x00",
        },
    )
    strings = POSITIONAL.replace('name: "INPUT__0" data_type: TYPE_FP32', 'name: "INPUT__0" data_type: TYPE_STRING')
    _write(repo, "strings", {"config.pbtxt": strings, "1/model.pt": b"\x00"})
    running = serve(repo)
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert "needs config.pbtxt with its inputs and outputs" in rows["no_config"]["reason"]
    assert "no inputs and outputs" in rows["no_config"]["reason"]
    assert "the config has no outputs" in rows["no_outputs"]["reason"]
    assert "input 'INPUT__0' is TYPE_STRING, which the TorchScript backend cannot serve" in rows["strings"]["reason"]
    assert all(r["state"] == "UNAVAILABLE" for r in rows.values())


def test_without_torch_a_torchscript_model_names_the_extra_and_the_rest_serve(tmp_path):
    """``batchgate serve`` in a process where torch cannot be imported (a sitecustomize blocks it):
    the server starts, the ONNX model serves, the TorchScript model's load error names the extra."""
    repo = str(tmp_path / "models")
    _write(repo, "pt", {"config.pbtxt": POSITIONAL, "1/model.pt": b"\x00not opened without torch"})
    _save(classifier_model(), repo, "clf")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\n\nsys.modules['torch'] = None  # import torch fails\n")
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
    proc = Proc(serve_args(repo), env={"PYTHONPATH": path})
    try:
        proc.wait_ready()
        c = httpclient.InferenceServerClient(proc.http)
        end = time.monotonic() + 30
        while not c.is_model_ready("clf") and time.monotonic() < end:
            time.sleep(0.1)
        assert c.is_model_ready("clf")
        rows = {r["name"]: r for r in c.get_model_repository_index()}
        assert rows["pt"]["state"] == "UNAVAILABLE"
        assert rows["pt"]["reason"] == (
            "model 'pt': platform pytorch_libtorch needs the torch extra: pip install 'batchgate[torch]'"
        )
    finally:
        proc.kill()


def test_a_forward_taking_one_dict_of_inputs_fails_its_load_naming_the_argument(tmp_path):
    torch = pytest.importorskip("torch")

    class Keyed(torch.nn.Module):
        def forward(self, d: dict[str, torch.Tensor]):
            return d["x"] * 2

    os.makedirs(tmp_path / "keyed" / "1")
    torch.jit.save(torch.jit.script(Keyed()), str(tmp_path / "keyed" / "1" / "model.pt"))
    config = 'platform: "pytorch_libtorch"\nmax_batch_size: 4\n'
    config += 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
    config += 'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
    _write(str(tmp_path), "keyed", {"config.pbtxt": config})
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 4\n")
    running = start_gateway(str(tmp_path))
    try:
        rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
        assert rows["keyed"]["state"] == "UNAVAILABLE" and "Dict[str, Tensor]" in rows["keyed"]["reason"]
        assert rows["clf"]["state"] == "READY"
    finally:
        running.stop()


def _reshape_modules(torch):
    """Modules that check the rank they are given, so a reshape left out shows."""

    class RowSum(torch.nn.Module):  # [batch, 3] -> [batch]
        def forward(self, x):
            return x.sum(-1)

    class Double(torch.nn.Module):  # [batch] -> [batch]
        def forward(self, x):
            torch._assert(x.dim() == 1, "Double takes one value a row")
            return x * 2

    class Flat(torch.nn.Module):  # [6] -> [6], unbatched
        def forward(self, x):
            torch._assert(x.dim() == 1, "Flat takes a flat tensor")
            return x + 1

    return torch.jit.script(RowSum()), torch.jit.script(Double()), torch.jit.script(Flat())


def test_a_config_reshape_serves_callers_the_config_dims(tmp_path):
    """Triton's reshape on TorchScript models (once every such model failed to load): callers send
    and get the config's dims, the model takes and gives reshape.shape; batched and unbatched."""
    torch = pytest.importorskip("torch")
    one_a_row = "dims: [ 1 ] reshape { shape: [ ] }"
    head = 'platform: "pytorch_libtorch"\nmax_batch_size: 4\n'
    configs = {
        "rowsum": head + 'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
        f'output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 {one_a_row} }} ]\n',
        "double": head + f'input [ {{ name: "INPUT__0" data_type: TYPE_FP32 {one_a_row} }} ]\n'
        f'output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 {one_a_row} }} ]\n',
        "flat": 'platform: "pytorch_libtorch"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 6 ] } } ]\n'
        'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 6 ] } } ]\n',
    }
    for (name, config), module in zip(configs.items(), _reshape_modules(torch)):
        os.makedirs(tmp_path / name / "1")
        torch.jit.save(module, str(tmp_path / name / "1" / "model.pt"))
        _write(str(tmp_path), name, {"config.pbtxt": config})
    running = start_gateway(str(tmp_path))
    try:
        rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
        assert all(r["state"] == "READY" for r in rows.values()), rows
        x3 = np.arange(9, dtype=np.float32).reshape(3, 3)
        x1 = np.array([[1.5], [-2.0]], np.float32)
        x23 = np.arange(6, dtype=np.float32).reshape(2, 3)
        for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
            got = _infer(mod, url, "rowsum", {"INPUT__0": x3})["OUTPUT__0"]
            assert got.shape == (3, 1) and got.ravel().tolist() == [3.0, 12.0, 21.0]
            got = _infer(mod, url, "double", {"INPUT__0": x1})["OUTPUT__0"]
            assert got.shape == (2, 1) and got.ravel().tolist() == [3.0, -4.0]
            got = _infer(mod, url, "flat", {"INPUT__0": x23})["OUTPUT__0"]
            assert got.shape == (2, 3)
            np.testing.assert_array_equal(got, x23 + 1)
            meta = mod.InferenceServerClient(url).get_model_metadata(
                "double", **({"as_json": True} if mod is grpcclient else {})
            )
            assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 1]
    finally:
        running.stop()


def test_forward_returning_a_dict_or_taking_one_fails_its_load_saying_so(tmp_path):
    torch = pytest.importorskip("torch")

    class DictOut(torch.nn.Module):
        def forward(self, x) -> dict[str, torch.Tensor]:
            return {"y": x + 1, "z": x - 1}

    class DictIn(torch.nn.Module):
        def forward(self, inputs: dict[str, torch.Tensor]):
            return inputs["a"] + inputs["b"]

    head = 'platform: "pytorch_libtorch"\nmax_batch_size: 4\n'
    configs = {
        "dict_out": head + 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "z" data_type: TYPE_FP32 dims: [ 2 ] } ]\n',
        "dict_in": head + 'input [ { name: "a" data_type: TYPE_FP32 dims: [ 2 ] }, '
        '{ name: "b" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n',
    }
    for (name, config), module in zip(configs.items(), (DictOut(), DictIn())):
        os.makedirs(tmp_path / name / "1")
        torch.jit.save(torch.jit.script(module), str(tmp_path / name / "1" / "model.pt"))
        _write(str(tmp_path), name, {"config.pbtxt": config})
    running = start_gateway(str(tmp_path))
    try:
        rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
        assert rows["dict_out"]["state"] == "UNAVAILABLE"
        assert "forward() returned a dict, which the TorchScript backend does not support" in rows["dict_out"]["reason"]
        assert "must return a tensor or a tuple/list of tensors" in rows["dict_out"]["reason"]
        assert rows["dict_in"]["state"] == "UNAVAILABLE"
        assert "forward() argument 'inputs' is Dict[str, Tensor]" in rows["dict_in"]["reason"]
    finally:
        running.stop()
