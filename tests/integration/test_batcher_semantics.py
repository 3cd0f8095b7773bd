"""The batcher's config and its answers checked against Triton's rules, on a model of several
inputs of different datatypes whose outputs say which rows they came from and which batch
they ran in: a config Triton refuses fails its load here too, with the reason, and every
answer row belongs to its own request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from batchgate.demo import _save


def tagged_model():
    """A: FP32 [N, L] (L variable), B: INT32 [N, 2], ID: INT64 [N, 1]. SUM: FP32 [N, 1] (each
    row of A summed), BID: INT64 [N, 3] (ID, then B), POS: INT64 [N, 1] (the row's place in the
    batch it ran in), POSITIVE: BOOL [N, 1] (SUM > 0)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("A", f, ["N", "L"]),
        helper.make_tensor_value_info("B", TensorProto.INT32, ["N", 2]),
        helper.make_tensor_value_info("ID", i64, ["N", 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("SUM", f, ["N", 1]),
        helper.make_tensor_value_info("BID", i64, ["N", 3]),
        helper.make_tensor_value_info("POS", i64, ["N", 1]),
        helper.make_tensor_value_info("POSITIVE", TensorProto.BOOL, ["N", 1]),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["A", "axis1"], ["SUM"], keepdims=1),
        helper.make_node("Cast", ["B"], ["B64"], to=i64),
        helper.make_node("Concat", ["ID", "B64"], ["BID"], axis=1),
        helper.make_node("Cast", ["ID"], ["IDf"], to=f),
        helper.make_node("Mul", ["IDf", "zero"], ["Z"]),
        helper.make_node("Add", ["Z", "one"], ["ONES"]),
        helper.make_node("CumSum", ["ONES", "axis0"], ["C"]),
        helper.make_node("Sub", ["C", "one"], ["Cm"]),
        helper.make_node("Cast", ["Cm"], ["POS"], to=i64),
        helper.make_node("Greater", ["SUM", "zero"], ["POSITIVE"]),
    ]
    consts = [
        helper.make_tensor("axis1", i64, [1], [1]),
        helper.make_tensor("axis0", i64, [], [0]),
        helper.make_tensor("zero", f, [], [0.0]),
        helper.make_tensor("one", f, [], [1.0]),
    ]
    graph = helper.make_graph(nodes, "tagged", inputs, outputs, initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def call(mod, url: str, model: str, ids: list[int], width: int, **kw) -> dict[str, np.ndarray]:
    """One request whose rows carry ``ids``; checks that every answer row is its own."""
    n = len(ids)
    a = np.tile(np.array(ids, np.float32).reshape(n, 1), (1, width))
    b = np.stack([np.array(ids, np.int32), -np.array(ids, np.int32)], 1)
    tensors = []
    for name, arr, dt in (("A", a, "FP32"), ("B", b, "INT32"), ("ID", np.array(ids, np.int64).reshape(n, 1), "INT64")):
        t = mod.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    res = mod.InferenceServerClient(url).infer(model, tensors, **kw)
    out = {k: res.as_numpy(k) for k in ("SUM", "BID", "POS", "POSITIVE")}
    assert out["BID"].tolist() == [[i, i, -i] for i in ids]
    assert out["SUM"].ravel().tolist() == [float(i * width) for i in ids]
    assert out["POSITIVE"].ravel().tolist() == [i * width > 0 for i in ids]
    pos = out["POS"].ravel()
    assert pos.tolist() == list(range(pos[0], pos[0] + n))  # a request's rows run together, in order
    return out


def _index(url: str) -> dict[str, dict]:
    return {m["name"]: m for m in httpclient.InferenceServerClient(url).get_model_repository_index()}


BATCHING = "max_batch_size: 8\ndynamic_batching { }\n"


@pytest.mark.parametrize("kind", ["KIND_CPU", "KIND_MODEL"])
def test_gpus_on_a_group_that_does_not_run_on_gpus_fail_the_load_as_on_triton(tmp_path, serve, kind):
    """Triton refuses a KIND_CPU or KIND_MODEL instance group that lists GPUs; it loaded here,
    and its gpus were even taken for a KIND_GPU group beside it."""
    for name, group in (
        ("cpu_gpus", f"kind: {kind} gpus: [0]"),
        ("bad_id", "kind: KIND_GPU gpus: [-1]"),
        ("fine", f"kind: {kind} count: 2"),
        ("profile", f"kind: {kind} profile: ['0']"),
    ):
        _save(tagged_model(), str(tmp_path), name, config=f"{BATCHING}instance_group [{{ {group} }}]\n")
    running = serve(str(tmp_path))
    index = _index(running.http_url)
    assert index["cpu_gpus"]["state"] == "UNAVAILABLE"
    assert f"has kind {kind} but lists gpus [0]" in index["cpu_gpus"]["reason"]
    assert index["bad_id"]["state"] == "UNAVAILABLE"
    assert "gpus [-1]" in index["bad_id"]["reason"] and "0 or more" in index["bad_id"]["reason"]
    assert index["profile"]["state"] == "UNAVAILABLE"
    assert "sets profile, which only TensorRT models have" in index["profile"]["reason"]
    assert index["fine"]["state"] == "READY"
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        call(mod, url, "fine", [3, 4], 2)


def test_a_queue_delay_past_an_hour_fails_the_load_and_an_hour_serves(tmp_path, serve):
    """max_queue_delay_microseconds is a uint64: 2^64 - 1 loaded and held a lone request for
    good. Past an hour the load fails naming the setting and the bound."""
    for name, delay in (("forever", 2**64 - 1), ("past", 3_600_000_001), ("hour", 3_600_000_000)):
        config = f"max_batch_size: 8\ndynamic_batching {{ max_queue_delay_microseconds: {delay} }}\n"
        _save(tagged_model(), str(tmp_path), name, config=config)
    running = serve(str(tmp_path))
    index = _index(running.http_url)
    for name, delay in (("forever", 2**64 - 1), ("past", 3_600_000_001)):
        assert index[name]["state"] == "UNAVAILABLE"
        assert f"max_queue_delay_microseconds is {delay}; at most 3600000000" in index[name]["reason"]
    assert index["hour"]["state"] == "READY"
    # a full batch does not wait out the delay
    call(grpcclient, running.grpc_url, "hour", list(range(1, 9)), 3)


def test_preserve_ordering_with_priority_levels_or_a_delay_policy_fails_the_load_as_on_triton(tmp_path, serve):
    """Answers released in arrival order would make a level-1 answer wait for an earlier level-2
    one, and a request DELAYed by its queue policy hold back every answer after it: Triton
    refuses both pairings; they loaded here."""
    ordered = "max_batch_size: 8\ndynamic_batching {{ preserve_ordering: true {} }}\n"
    delay = "timeout_action: DELAY default_timeout_microseconds: 1000"
    configs = {
        "levels": "priority_levels: 2 default_priority_level: 1",
        "delay": f"default_queue_policy {{ {delay} }}",
        "level_delay": "priority_levels: 1 default_priority_level: 1 "
        f"priority_queue_policy {{ key: 1 value {{ {delay} }} }}",
        # allowed: one level, a DELAY action with no timeout (nothing is ever delayed), REJECT
        "fine": "priority_levels: 1 default_priority_level: 1 default_queue_policy { timeout_action: DELAY } "
        "priority_queue_policy { key: 1 value { default_timeout_microseconds: 1000000 } }",
    }
    for name, extra in configs.items():
        _save(tagged_model(), str(tmp_path), name, config=ordered.format(extra))
    running = serve(str(tmp_path))
    index = _index(running.http_url)
    assert index["levels"]["state"] == "UNAVAILABLE"
    assert "preserve_ordering allows one priority level, not 2" in index["levels"]["reason"]
    for name in ("delay", "level_delay"):
        assert index[name]["state"] == "UNAVAILABLE"
        assert "timeout_action is DELAY cannot go with preserve_ordering" in index[name]["reason"]
    assert index["fine"]["state"] == "READY"
    for mod, url in ((grpcclient, running.grpc_url), (httpclient, running.http_url)):
        call(mod, url, "fine", [5, 6, 7], 1)


def test_a_passive_instance_group_loads_with_a_warning_that_it_serves(tmp_path, serve, caplog):
    """Triton loads a passive group's instances but sends them no requests; here they serve
    like the others, and the load says so rather than nothing."""
    import logging

    caplog.set_level(logging.WARNING, logger="batchgate.repository")
    _save(tagged_model(), str(tmp_path), "passive", config=f"{BATCHING}instance_group [{{ count: 2 passive: true }}]\n")
    running = serve(str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "not acted on" in r.getMessage()]
    assert warned == [
        "model 'passive': not acted on (see README, Not supported): instance_group passive (its instances take "
        "requests like the others)"
    ]
    call(grpcclient, running.grpc_url, "passive", [1], 1)


def test_a_group_of_no_kind_runs_as_triton_settles_it_and_its_config_says_which(tmp_path, serve, caplog):
    """Triton gives a KIND_AUTO group listing gpus KIND_GPU; here it ran on the CPU with its gpus
    ignored, and the config said KIND_AUTO. Now it asks for the GPU (this machine has none: the
    warning, and the CPU serves), and a group listing none says KIND_CPU, as it runs."""
    import logging

    caplog.set_level(logging.WARNING)
    _save(tagged_model(), str(tmp_path), "auto_gpu", config=f"{BATCHING}instance_group [{{ count: 2 gpus: [0] }}]\n")
    _save(tagged_model(), str(tmp_path), "auto", config=f"{BATCHING}instance_group [{{ count: 2 }}]\n")
    running = serve(str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "CUDA" in r.getMessage()]
    assert any("auto_gpu" in w for w in warned) and not any("'auto'" in w for w in warned), warned
    for name, kind in (("auto_gpu", "KIND_GPU"), ("auto", "KIND_CPU")):
        http_cfg = httpclient.InferenceServerClient(running.http_url).get_model_config(name)
        grpc_cfg = grpcclient.InferenceServerClient(running.grpc_url).get_model_config(name, as_json=True)["config"]
        for cfg in (http_cfg, grpc_cfg):
            assert [(g["kind"], int(g["count"])) for g in cfg["instance_group"]] == [(kind, 2)]
        call(grpcclient, running.grpc_url, name, [2], 2)


def test_every_row_comes_back_to_its_own_request_and_the_statistics_count_what_was_sent(tmp_path, serve):
    """Callers over gRPC and HTTP send 1 to 5 rows of A of width 1, 2 or 3 (widths never share a
    batch) to a model with preferred sizes and a delay: each gets its own rows, in order, run
    together, and the statistics add up to what was sent."""
    config = (
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4, 6 ] max_queue_delay_microseconds: 20000 }\n"
    )
    _save(tagged_model(), str(tmp_path), "m", config=config)
    # (no overload shedding: the clients share this machine's cores with the server)
    running = serve(str(tmp_path), queue_target_ms=0)
    jobs, first = [], 1
    for i in range(96):
        rows = (1, 2, 1, 3, 5, 1)[i % 6]
        jobs.append((i, list(range(first, first + rows)), 1 + i % 3))
        first += rows

    def run(job):
        i, ids, width = job
        mod, url = (grpcclient, running.grpc_url) if i % 2 else (httpclient, running.http_url)
        return call(mod, url, "m", ids, width)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, jobs))
    stats = httpclient.InferenceServerClient(running.http_url).get_inference_statistics("m")["model_stats"][0]
    sent = sum(len(ids) for _, ids, _ in jobs)
    assert stats["inference_count"] == sent
    assert stats["inference_stats"]["success"]["count"] == stats["inference_stats"]["queue"]["count"] == len(jobs)
    assert stats["inference_stats"]["fail"]["count"] == 0
    by_size = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sum(size * n for size, n in by_size.items()) == sent
    assert sum(by_size.values()) == stats["execution_count"] < len(jobs)
    assert max(by_size) <= 8
