"""The metrics snapshot seam: one process's figures as plain data, and several processes'
snapshots added up by the rule each family declares."""

from __future__ import annotations

import pickle

from prometheus_client import generate_latest

from batchgate.core.stats import ModelStats
from batchgate.monitoring.metrics import FAMILIES, Metrics, Snapshot, render


def worker(requests: int, depth: int, oldest: float, ready: bool, load_s: float) -> Metrics:
    """The figures one worker process would hold for model m version 1."""
    m = Metrics()
    mm = m.bind("m", "1")
    stats = ModelStats("m", "1", wall_clock=lambda: 1000.0 + requests)
    mm.track(object(), stats, lambda: depth, lambda: depth + 1, lambda: oldest, lambda: ready)
    for _ in range(requests):
        mm.request_done("grpc", "OK", 0.002)
        stats.record_request(True, 2_000_000, 500_000)
    stats.record_execution(requests, requests, 10, 20, 30)
    mm.executions += 1
    mm.inferences += requests
    mm.batch_rows[requests] = mm.batch_rows.get(requests, 0) + 1
    mm.refused("queue_full")
    mm.load_seconds = load_s
    m.load_failed("broken")
    up = m.upstream("r", "10.0.0.1:8001")
    up.requests, up.outstanding, up.healthy = requests, 2, int(ready)
    return m


def test_every_family_declares_how_it_merges():
    for name, fam in FAMILIES.items():
        assert fam.merge in ("sum", "max", "all"), name
        if fam.kind != "gauge":
            assert fam.merge == "sum", f"{name}: counters and histograms add up"


def test_snapshots_of_two_processes_add_up_by_meaning():
    a = worker(requests=3, depth=4, oldest=0.5, ready=True, load_s=1.0).snapshot()
    b = worker(requests=5, depth=6, oldest=0.25, ready=False, load_s=2.0).snapshot()
    both = a.merge(b)
    v = both.values
    mv = ("m", "1")
    assert v["batchgate_requests"][mv + ("grpc", "OK")] == 8
    assert v["batchgate_inference_count"][mv] == 8 and v["batchgate_execution_count"][mv] == 2
    counts, total = v["batchgate_request_duration_seconds"][mv + ("grpc",)]
    assert sum(counts) == 8 and abs(total - 0.016) < 1e-9
    assert v["batchgate_queue_depth"][mv] == 10  # summed
    assert v["batchgate_inflight_requests"][mv] == 12  # summed
    assert v["batchgate_queue_oldest_age_seconds"][mv] == 0.5  # the oldest of all
    assert v["batchgate_model_ready"][mv] == 0  # ready only when every process is
    assert v["batchgate_model_load_duration_seconds"][mv] == 2.0
    assert v["batchgate_refusals"][mv + ("queue_full",)] == 2
    assert v["batchgate_model_load_failures"][("broken",)] == 2
    up = ("r", "10.0.0.1:8001")
    assert v["batchgate_upstream_requests"][up] == 8 and v["batchgate_upstream_outstanding"][up] == 4
    assert v["batchgate_upstream_healthy"][up] == 0
    bcounts, rows = v["batchgate_batch_size"][mv]
    assert sum(bcounts) == 2 and rows == 8
    # V2 statistics merge too
    st = both.stats[mv]
    assert st["inference_count"] == 8 and st["execution_count"] == 2
    assert st["inference_stats"]["success"] == {"count": 8, "ns": 16_000_000}
    assert st["last_inference"] == 1_005_000
    assert {e["batch_size"] for e in st["batch_stats"]} == {3, 5}
    # the inputs are left as they were
    assert a.values["batchgate_requests"][mv + ("grpc", "OK")] == 3


def test_a_gone_process_keeps_its_totals_but_not_its_gauges():
    a = worker(requests=3, depth=4, oldest=0.5, ready=True, load_s=1.0).snapshot()
    live = worker(requests=1, depth=1, oldest=0.1, ready=True, load_s=1.0).snapshot()
    merged = live.merge(a.without_gauges())
    mv = ("m", "1")
    assert merged.values["batchgate_requests"][mv + ("grpc", "OK")] == 4
    assert merged.values["batchgate_queue_depth"][mv] == 1
    assert merged.values["batchgate_model_ready"][mv] == 1


def test_a_snapshot_is_plain_data_and_renders_as_prometheus_text():
    m = worker(requests=2, depth=0, oldest=0.0, ready=True, load_s=0.5)
    snap = pickle.loads(pickle.dumps(m.snapshot()))
    assert isinstance(snap, Snapshot)
    text = generate_latest(m.registry).decode()
    assert 'batchgate_requests_total{model="m",protocol="grpc",status="OK",version="1"} 2.0' in text
    assert 'batchgate_batch_size_bucket{le="2",model="m",version="1"} 1.0' in text
    names = {f.name for f in render(snap)}
    assert "batchgate_queue_depth" in names and "batchgate_upstream_healthy" in names


def test_the_text_written_directly_is_what_prometheus_client_writes_byte_for_byte():
    """``snapshot.text`` writes /metrics without prometheus_client's per-sample objects (about 8 ms
    a scrape for five models, on the event loop's core): it must be generate_latest's text exactly,
    for every family, with label values that need escaping, whole-number and fractional buckets,
    buckets of a family's own (a latency SLO's), counts past a million (written with an exponent)
    and values that are not numbers."""
    import random

    from batchgate.monitoring.snapshot import _Scrape, text

    rng = random.Random(3)
    snap = Snapshot()
    odd = ['m"q', "back\\slash", "new\nline", "plain", "ünï"]
    for name, fam in FAMILIES.items():
        for k in range(3):
            labels = tuple(rng.choice(odd) + str(k) for _ in fam.labels)
            if fam.kind == "histogram":
                buckets = fam.buckets
                if k == 2:
                    buckets = snap.buckets[name] = (0.003, 0.07, 1.5)
                counts = tuple(rng.choice([0, 1, 7, 999_999, 2_500_000]) for _ in range(len(buckets) + 1))
                snap.add(name, labels, (counts, rng.choice([0.0, 1.25, 12345678.5, 1e-7])))
            else:
                snap.add(name, labels, rng.choice([0, 3, 1.5, 7_654_321, float("nan"), float("inf"), -2.0]))
    want = generate_latest(_Scrape(render(snap), ())).decode()
    got = text(snap)
    assert got == want, (
        next((a, b) for a, b in zip(got.splitlines(), want.splitlines(), strict=False) if a != b)
        if got.splitlines() != want.splitlines()
        else "line ends differ"
    )
    assert text(Snapshot()) == generate_latest(_Scrape(render(Snapshot()), ())).decode()  # no series at all
