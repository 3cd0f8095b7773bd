"""ModelStats: counts with the meanings of the V2 statistics extension, and the JSON shape."""

import time

from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from batchgate.core.stats import ModelStats


def filled() -> ModelStats:
    s = ModelStats("resnet", "3")
    # one batch of 8 rows made of 3 requests, one batch of 2 rows from 1 request
    s.record_execution(rows=8, requests=3, input_ns=10, infer_ns=100, output_ns=1)
    s.record_execution(rows=2, requests=1, input_ns=20, infer_ns=200, output_ns=2)
    s.record_execution(rows=8, requests=2, input_ns=30, infer_ns=300, output_ns=3)
    s.record_request(True, 1000, queue_ns=5)
    s.record_request(True, 3000, queue_ns=6)
    s.record_request(False, 50, queue_ns=7)
    return s


def test_fresh_stats_are_zero():
    d = ModelStats("m", "1").as_dict()
    assert d["inference_count"] == d["execution_count"] == d["last_inference"] == 0
    for v in d["inference_stats"].values():
        assert v == {"count": 0, "ns": 0}
    assert d["batch_stats"] == []
    assert d["memory_usage"] == []


def test_counts_rows_and_executions():
    d = filled().as_dict()
    assert d["name"] == "resnet" and d["version"] == "3"
    assert d["inference_count"] == 18  # rows, not requests
    assert d["execution_count"] == 3


def test_request_phase_durations_charge_each_request_the_whole_execution():
    st = filled().as_dict()["inference_stats"]
    assert st["success"] == {"count": 2, "ns": 4000}
    assert st["fail"] == {"count": 1, "ns": 50}
    assert st["queue"] == {"count": 2, "ns": 11}  # successes only, as Triton counts them
    assert st["compute_input"] == {"count": 6, "ns": 10 * 3 + 20 * 1 + 30 * 2}
    assert st["compute_infer"] == {"count": 6, "ns": 100 * 3 + 200 + 300 * 2}
    assert st["compute_output"] == {"count": 6, "ns": 1 * 3 + 2 + 3 * 2}
    assert st["cache_hit"] == {"count": 0, "ns": 0}
    assert st["cache_miss"] == {"count": 0, "ns": 0}


def test_batch_stats_one_entry_per_size_sorted_counting_executions():
    bs = filled().as_dict()["batch_stats"]
    assert [b["batch_size"] for b in bs] == [2, 8]
    two, eight = bs
    assert two["compute_input"] == {"count": 1, "ns": 20}
    assert two["compute_infer"] == {"count": 1, "ns": 200}
    assert eight["compute_infer"] == {"count": 2, "ns": 400}
    assert eight["compute_output"] == {"count": 2, "ns": 4}


def test_last_inference_is_wall_clock_milliseconds():
    before = int(time.time() * 1000)
    s = ModelStats("m", "1")
    s.record_execution(1, 1, 0, 0, 0)
    after = int(time.time() * 1000)
    assert before <= s.as_dict()["last_inference"] <= after


def test_as_dict_parses_into_the_grpc_model_statistics_message():
    d = filled().as_dict()
    msg = json_format.ParseDict(d, pb.ModelStatistics())  # unknown or mistyped keys would raise
    assert msg.inference_count == 18
    assert msg.inference_stats.compute_infer.ns == 1100
    assert [b.batch_size for b in msg.batch_stats] == [2, 8]
    # and the statistics response tritonclient parses wraps a list of these
    resp = json_format.ParseDict({"model_stats": [d]}, pb.ModelStatisticsResponse())
    assert resp.model_stats[0].name == "resnet"


def test_inference_stats_has_every_field_of_the_message():
    keys = set(filled().as_dict()["inference_stats"])
    assert keys == {f.name for f in pb.InferStatistics.DESCRIPTOR.fields}


def test_model_stats_has_every_field_of_the_message():
    keys = set(filled().as_dict())
    assert keys == {f.name for f in pb.ModelStatistics.DESCRIPTOR.fields}
