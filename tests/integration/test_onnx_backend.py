"""ONNX Runtime settings from the model config: instance count, thread pools, providers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from batchgate.demo import _save, classifier_model

CONFIG = """instance_group [ { count: 3 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value { string_value: "2" } }
parameters { key: "inter_op_thread_count" value { string_value: "1" } }
"""


def test_instances_and_thread_pools_come_from_the_config(tmp_path, serve):
    _save(classifier_model(), str(tmp_path), "clf", config=CONFIG)
    running = serve(str(tmp_path))
    served = running.gateway.repository.resolve("clf", "")
    assert served.instances == 3
    opts = served.backend.session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert served.backend.providers() == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_gpu_instance_group_without_a_gpu_serves_on_the_cpu(tmp_path, serve, caplog):
    """No GPU here: KIND_GPU asks for CUDA, which this machine lacks, so the CPU serves, and the
    warning names the model (it named none: which of a repository's models was it?)."""
    caplog.set_level("WARNING", logger="batchgate.onnx")
    _save(classifier_model(), str(tmp_path), "clf", config="instance_group [ { count: 1 kind: KIND_GPU } ]\n")
    running = serve(str(tmp_path))
    assert "model 'clf': CUDA execution provider requested but not available; serving on CPU" in caplog.messages
    served = running.gateway.repository.resolve("clf", "")
    assert served.backend.providers() == ["CPUExecutionProvider"]
    c = httpclient.InferenceServerClient(running.http_url)
    inp = httpclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert c.infer("clf", [inp]).as_numpy("probabilities").shape == (1, 3)


def test_a_bad_thread_count_fails_the_load_with_its_reason(tmp_path, serve):
    _save(
        classifier_model(),
        str(tmp_path),
        "clf",
        config='parameters { key: "intra_op_thread_count" value { string_value: "many" } }\n',
    )
    running = serve(str(tmp_path))
    rows = httpclient.InferenceServerClient(running.http_url).get_model_repository_index()
    assert rows[0]["state"] == "UNAVAILABLE" and "intra_op_thread_count" in rows[0]["reason"]


def test_by_default_threads_fit_the_process_cores_and_do_not_spin(tmp_path, serve):
    """Without thread settings, ONNX Runtime gets one thread per core this process may run on
    (not per core of the machine) and its threads do not spin between runs, so they leave the
    event loop its core; a model may ask for spinning."""
    import os

    _save(classifier_model(), str(tmp_path), "plain")
    _save(
        classifier_model(),
        str(tmp_path),
        "spins",
        config='parameters { key: "allow_spinning" value { string_value: "true" } }\n',
    )
    _save(
        classifier_model(),
        str(tmp_path),
        "bad",
        config='parameters { key: "allow_spinning" value { string_value: "sometimes" } }\n',
    )
    running = serve(str(tmp_path))
    plain = running.gateway.repository.resolve("plain", "").backend.session.get_session_options()
    assert plain.intra_op_num_threads == len(os.sched_getaffinity(0))
    assert plain.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spins = running.gateway.repository.resolve("spins", "").backend.session.get_session_options()
    with pytest.raises(Exception, match="allow_spinning"):  # not set: ONNX Runtime's default (spinning)
        spins.get_session_config_entry("session.intra_op.allow_spinning")
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["bad"]["state"] == "UNAVAILABLE" and "allow_spinning" in rows["bad"]["reason"]


def test_a_model_that_cannot_run_on_the_warm_up_zeros_still_loads_and_serves(tmp_path, serve):
    """A convolution over images of any size cannot run on the 1x1 image the warm-up makes of its
    dynamic dimensions: the warm-up is skipped with a warning, and neither that model nor the
    others are kept from serving (it once stopped the whole server at start)."""
    from onnx import TensorProto, helper, numpy_helper

    from batchgate.demo import _model

    w = np.ones((2, 3, 3, 3), np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["feat"])],
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["b", 2, "oh", "ow"])],
        [numpy_helper.from_array(w, "w")],
    )
    _save(_model(g), str(tmp_path), "cnn", config="max_batch_size: 4\n")
    _save(classifier_model(), str(tmp_path), "clf", config="max_batch_size: 4\n")
    running = serve(str(tmp_path))
    c = httpclient.InferenceServerClient(running.http_url)
    assert c.is_model_ready("cnn") and c.is_model_ready("clf")
    image = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    inp = httpclient.InferInput("image", [1, 3, 8, 8], "FP32")
    inp.set_data_from_numpy(image)
    got = c.infer("cnn", [inp]).as_numpy("feat")
    want = ort.InferenceSession(str(tmp_path / "cnn" / "1" / "model.onnx")).run(None, {"image": image})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_config_reshape_serves_callers_the_config_dims(tmp_path, serve):
    """Triton's reshape: the model takes and gives one value a row ([batch]); callers send and get
    [batch, 1], the config's dims (once ignored: every request failed with ONNX Runtime's rank error)."""
    from onnx import TensorProto, helper

    from batchgate.demo import _model

    g = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b"])],
    )
    config = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""
    _save(_model(g), str(tmp_path), "double", config=config)
    running = serve(str(tmp_path))
    import tritonclient.grpc as grpcclient

    for mod, url in ((httpclient, running.http_url), (grpcclient, running.grpc_url)):
        c = mod.InferenceServerClient(url)
        x = np.array([[1.5], [2.0], [-3.0]], np.float32)
        inp = mod.InferInput("x", [3, 1], "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer("double", [inp]).as_numpy("y")
        assert got.shape == (3, 1)
        np.testing.assert_allclose(got, 2 * x)


def _topk_model():
    """Top k of four values, k given by the caller: a k past 4 fails inside ONNX Runtime."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Reshape", ["K", "one"], ["k"]),
        helper.make_node("TopK", ["X", "k"], ["V", "I"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "topk",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("K", TensorProto.INT64, ["b", 1]),
        ],
        [helper.make_tensor_value_info("V", TensorProto.FLOAT, ["b", None])],
        initializer=[helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _topk_served(tmp_path, serve, lines_per_s: int, k_value: int):
    """The TopK model served with ``failure_log_max_lines_per_s``, an HTTP client and its two
    inputs (X = [0, 1, 2, 3]; K = ``k_value``: past 4 the model fails)."""
    _save(_topk_model(), str(tmp_path), "topk")
    running = serve(str(tmp_path), failure_log_max_lines_per_s=lines_per_s)
    c = httpclient.InferenceServerClient(running.http_url)
    x = httpclient.InferInput("X", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    k = httpclient.InferInput("K", [1, 1], "INT64")
    k.set_data_from_numpy(np.array([[k_value]], dtype=np.int64))
    return running, c, x, k


def test_failures_a_caller_can_cause_are_logged_within_the_bound_and_not_by_onnx_runtime(
    tmp_path, serve, caplog, capfd
):
    """A caller whose values make the model fail (TopK's k past its axis) gets the engine's
    message, but cannot write a log line per request: our 'failed to execute' lines keep to
    failure_log_max_lines_per_s, and ONNX Runtime's own error line (stderr, outside the log's
    format) is not written at all."""
    import time

    from tritonclient.utils import InferenceServerException

    caplog.set_level("INFO", logger="batchgate")
    running, c, x, k = _topk_served(tmp_path, serve, 3, 2)
    assert c.infer("topk", [x, k]).as_numpy("V").tolist() == [[3.0, 2.0]]
    k.set_data_from_numpy(np.array([[9]], dtype=np.int64))
    start, sent = time.monotonic(), 0
    while sent < 30:
        with pytest.raises(InferenceServerException, match="k argument") as err:
            c.infer("topk", [x, k])
        assert err.value.status() == "500"
        sent += 1
    seconds = int(time.monotonic() - start) + 1
    lines = [r.getMessage() for r in caplog.records if "failed to execute" in r.getMessage()]
    assert 1 <= len(lines) <= 3 * seconds < sent, lines
    assert "onnxruntime" not in capfd.readouterr().err


def test_model_failure_lines_left_out_are_counted(tmp_path, serve, caplog):
    """The model's 'failed to execute' lines past failure_log_max_lines_per_s are counted in
    batchgate_failure_log_dropped_total, as the requests' own failure lines are (here those are
    INFO, below the log's level: only the model's count). The budget is its gateway's: another
    gateway in the same process, with its own limit, neither changes it nor counts its drops."""
    import time
    import urllib.request

    from tritonclient.utils import InferenceServerException

    def dropped(running) -> list[str]:
        text = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
        return [ln for ln in text.splitlines() if ln.startswith("batchgate_failure_log_dropped_total ")]

    caplog.set_level("WARNING", logger="batchgate")
    running, c, x, k = _topk_served(tmp_path / "a", serve, 2, 9)
    other = _topk_served(tmp_path / "b", serve, 1000, 9)[0]
    start = time.monotonic()
    for _ in range(20):
        with pytest.raises(InferenceServerException, match="k argument"):
            c.infer("topk", [x, k])
    seconds = int(time.monotonic() - start) + 1
    counted = dropped(running)
    assert counted and float(counted[0].split()[1]) >= 20 - 2 * seconds, counted
    assert dropped(other) == []


def test_triton_settings_not_acted_on_load_and_are_named_in_a_warning(tmp_path, serve, caplog):
    """A Triton config brought as it is loads, and what batchgate reads without acting on is named
    once a load: sequence_batching apart (the config still tells clients, perf_analyzer among
    them, that this is a sequence model), the rest in one warning (they loaded without a word: a
    decoupled model's client would wait for responses that never come). A plain config says nothing."""
    import logging

    caplog.set_level(logging.WARNING, logger="batchgate.repository")
    config = """max_batch_size: 4
input [ { name: "features" data_type: TYPE_FP32 dims: [ 4 ] allow_ragged_batch: true } ]
instance_group [ { count: 1 kind: KIND_CPU rate_limiter { resources [ { name: "r" count: 1 } ] } } ]
model_transaction_policy { decoupled: true }
response_cache { enable: true }
sequence_batching { }
model_warmup [ { name: "w" batch_size: 1
  inputs { key: "features" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
"""
    _save(classifier_model(), str(tmp_path), "seq", config=config)
    _save(classifier_model(), str(tmp_path), "plain", config="max_batch_size: 4\n")
    running = serve(str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "not acted on" in r.getMessage()]
    assert warned == [
        "model 'seq': sequence_batching is not acted on: served without a sequence scheduler (no correlation "
        "IDs, control inputs or state); sequence_id, sequence_start and sequence_end are ignored",
        "model 'seq': not acted on (see README, Not supported): model_transaction_policy.decoupled (every "
        "request gets exactly one response); response_cache (nothing is cached); instance_group rate_limiter; "
        "allow_ragged_batch; model_warmup (every model is warmed up with zeros)",
    ]
    c = httpclient.InferenceServerClient(running.http_url)
    inp = httpclient.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    got = c.infer("seq", [inp], sequence_id=7, sequence_start=True).as_numpy("probabilities")
    assert got.shape == (1, 3)


def test_more_triton_settings_not_acted_on_are_named_and_a_repository_agent_is_refused(tmp_path, serve, caplog):
    """Metric tags (Triton adds them as labels), custom op libraries, per-GPU file names,
    execution accelerators other than TensorRT and output label files (Triton reads them for its
    classification extension, and fails the load when one is missing) loaded without a word; a
    repository agent (Triton's checksum agent refuses a model whose files changed) was skipped, so
    the model loaded whatever its files held: it fails the load, as on a Triton without that agent.
    A dynamic_batching with max_batch_size 0 batched nothing, silently."""
    import logging

    caplog.set_level(logging.WARNING, logger="batchgate.repository")
    config = """max_batch_size: 4
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
metric_tags { key: "team" value: "fraud" }
model_operations { op_library_filename: "libcustom_ops.so" }
cc_model_filenames { key: "8.0" value: "model_a100.onnx" }
optimization { execution_accelerators {
  cpu_execution_accelerator [ { name: "openvino" } ]
  gpu_execution_accelerator [ { name: "tensorrt" }, { name: "migraphx" } ] } }
"""
    _save(classifier_model(), str(tmp_path), "tagged", config=config)
    _save(
        classifier_model(),
        str(tmp_path),
        "checked",
        config='model_repository_agents { agents [ { name: "checksum" parameters { key: "MD5:1/model.onnx" '
        'value: "0" } } ] }\n',
    )
    _save(
        classifier_model(),
        str(tmp_path),
        "unbatched",
        config="""max_batch_size: 0
input [ { name: "features" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 5000 }
""",
    )
    running = serve(str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "not acted on" in r.getMessage()]
    assert warned == [
        "model 'tagged': not acted on (see README, Not supported): metric_tags (not added to the metrics' "
        "labels); model_operations (no op library is loaded); cc_model_filenames (the version's model file is "
        "default_model_filename on every device); execution accelerators openvino, migraphx; label_filename "
        "(no classification: class_count is refused, and the file is not read)",
        "model 'unbatched': not acted on (see README, Not supported): dynamic_batching (max_batch_size is 0, "
        "so each request runs alone: set max_batch_size and give dims without the batch dimension to batch)",
    ]
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["tagged"]["state"] == "READY"
    assert rows["checked"]["state"] == "UNAVAILABLE"
    assert rows["checked"]["reason"] == (
        "model 'checked': model_repository_agents (checksum) are not supported: batchgate runs no repository "
        "agent, so what they check or change would not be done; remove them to serve the model"
    )


def test_a_platform_and_a_backend_that_disagree_fail_the_load_naming_both(tmp_path, serve):
    """Triton refuses such a pair ("unexpected 'platform' and 'backend' pair"); the model was
    served by the platform's backend, and its config told clients the other."""
    _save(classifier_model(), str(tmp_path), "mixed", config='platform: "onnxruntime_onnx"\nbackend: "pytorch"\n')
    _save(classifier_model(), str(tmp_path), "other", config='platform: "onnxruntime_onnx"\nbackend: "python"\n')
    _save(classifier_model(), str(tmp_path), "pair", config='platform: "onnxruntime_onnx"\nbackend: "onnxruntime"\n')
    running = serve(str(tmp_path))
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    assert rows["pair"]["state"] == "READY"
    for name, backend in (("mixed", "pytorch"), ("other", "python")):
        assert rows[name]["state"] == "UNAVAILABLE"
        assert rows[name]["reason"] == (
            f"model '{name}': platform 'onnxruntime_onnx' and backend '{backend}' do not name the same backend; "
            "give one of them, or a pair that agrees (onnxruntime_onnx with onnxruntime, pytorch_libtorch with "
            "pytorch)"
        )


@pytest.mark.parametrize("count", ["100000", "-5"])
def test_a_thread_count_out_of_range_fails_the_load_naming_the_bound(tmp_path, serve, count):
    """A count past the bound would have ONNX Runtime start that many threads while the load
    holds the server's start (100000 never finished); a negative one was passed on as it was."""
    _save(
        classifier_model(),
        str(tmp_path),
        "clf",
        config=f'parameters {{ key: "intra_op_thread_count" value {{ string_value: "{count}" }} }}\n',
    )
    _save(
        classifier_model(),
        str(tmp_path),
        "inter",
        config=f'parameters {{ key: "inter_op_thread_count" value {{ string_value: "{count}" }} }}\n',
    )
    running = serve(str(tmp_path))
    rows = {r["name"]: r for r in httpclient.InferenceServerClient(running.http_url).get_model_repository_index()}
    for name, key in (("clf", "intra_op_thread_count"), ("inter", "inter_op_thread_count")):
        assert rows[name]["state"] == "UNAVAILABLE", rows[name]
        assert f"{key} must be a whole number from 0 to 256" in rows[name]["reason"]
        assert count in rows[name]["reason"]


def test_a_config_listing_several_gpus_says_that_one_is_used(tmp_path, serve, caplog):
    """Triton makes a KIND_GPU group's count instances on each GPU it lists ({count: 2, gpus: [0, 1]}:
    four). batchgate opens one session, on the first GPU listed, and runs the groups' count of
    executions there: a config written for several GPUs loaded without a word of it."""
    import logging

    caplog.set_level(logging.WARNING, logger="batchgate.repository")
    config = "max_batch_size: 4\ninstance_group [ { count: 2 kind: KIND_GPU gpus: [ 1, 0 ] } ]\n"
    _save(classifier_model(), str(tmp_path), "two", config=config)
    _save(
        classifier_model(),
        str(tmp_path),
        "one",
        config="max_batch_size: 4\ninstance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]\n",
    )
    running = serve(str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "not acted on" in r.getMessage()]
    assert warned == [
        "model 'two': not acted on (see README, Not supported): instance_group gpus past the first (the model "
        "runs on GPU 1 alone; a group's count is its executions at once there, not per GPU listed)"
    ]
    assert running.gateway.repository.resolve("two", "").instances == 2


def test_an_engine_failure_answers_without_the_engines_source_locations(tmp_path, serve, caplog):
    """ONNX Runtime's message names its own source files and C++ functions
    ("/onnxruntime_src/.../reshape_helper.h:NN onnxruntime::ReshapeHelper::ReshapeHelper(...)"):
    answered, they told a caller the engine's build and nothing it could act on. The answer keeps
    the engine's words without them, on both protocols; the log keeps the whole message."""
    import tritonclient.grpc as grpcclient
    from onnx import TensorProto, helper
    from tritonclient.utils import InferenceServerException

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "to"], ["Y"])],
        "reshape",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
        initializer=[helper.make_tensor("to", TensorProto.INT64, [1], [3])],  # (4 values never make 3)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    _save(model, str(tmp_path), "reshape", config="max_batch_size: 0\n")
    caplog.set_level("INFO", logger="batchgate")
    running = serve(str(tmp_path))
    said = []
    for client in (httpclient, grpcclient):
        c = client.InferenceServerClient(running.http_url if client is httpclient else running.grpc_url)
        x = client.InferInput("X", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(InferenceServerException) as err:
            c.infer("reshape", [x])
        said.append(err.value.message())
    for text in said:
        assert "cannot be reshaped" in text and "model 'reshape' version 1 failed" in text, text
        assert "onnxruntime_src" not in text and ".h:" not in text and "onnxruntime::" not in text, text
    logged = [r.getMessage() for r in caplog.records if "failed to execute" in r.getMessage()]
    assert logged and "reshape_helper.h:" in logged[0], logged  # (the operator's log keeps where it failed)


def _cnn(paired: bool):
    """A convolution exported with free height and width (5 x 5 kernel: 1 x 1 and 3 x 3 images fail it),
    pooled to [N, 4]; ``paired``: its output reshaped to [-1, 2] (two rows a row), so only a run
    on zeros tells that its first dimension is not the batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from batchgate.demo import _model

    w = numpy_helper.from_array(np.arange(300, dtype=np.float32).reshape(4, 3, 5, 5) / 100, "W")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f" if paired else "y"]),
    ]
    inits = [w]
    if paired:
        nodes.append(helper.make_node("Reshape", ["f", "pair"], ["y"]))
        inits.append(numpy_helper.from_array(np.array([-1, 2], np.int64), "pair"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2] if paired else ["N", 4])
    model: onnx.ModelProto = _model(helper.make_graph(nodes, "cnn", [x], [y], inits))
    return model


CNN_CONFIG = 'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] }]\n'


def test_runs_on_zeros_at_load_take_the_sizes_the_config_fixes(tmp_path, serve, caplog):
    """The warm-up of a model whose file leaves dimensions free runs at the sizes its config
    serves: on 1 x 1 images a convolution failed it at every load (its first caller paid, with a
    warning), and the check that outputs follow the batch went with it, so a config that batched
    a model whose output is not the batch was served, its callers given each other's rows."""
    caplog.set_level("WARNING", logger="batchgate")
    path = _save(_cnn(False), str(tmp_path), "cnn", config=CNN_CONFIG)
    _save(_cnn(True), str(tmp_path), "cnn_t", config=CNN_CONFIG)
    running = serve(str(tmp_path))
    assert not [m for m in caplog.messages if "warm-up on zeros failed" in m], caplog.messages
    c = httpclient.InferenceServerClient(running.http_url)
    rows = {r["name"]: r for r in c.get_model_repository_index()}
    assert rows["cnn"]["state"] == "READY"
    assert rows["cnn_t"]["state"] == "UNAVAILABLE"
    assert "output 'y' has shape [4, 2] for a batch of 2 rows" in rows["cnn_t"]["reason"]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    inp = httpclient.InferInput("x", [2, 3, 8, 8], "FP32")
    inp.set_data_from_numpy(x)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(c.infer("cnn", [inp]).as_numpy("y"), want, rtol=1e-6)
