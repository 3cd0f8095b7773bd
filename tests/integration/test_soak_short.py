"""A short run of the soak test (``bench/soak.py``): a real ``batchgate serve`` subprocess, every
kind of good and bad request over HTTP and gRPC, connections cut short.

RSS growth is not judged on a run this short (the allocator has not settled; ``make soak`` runs
10^6 requests for that). What is deterministic is: every answer is one its request kind
expects (no 5xx, no INTERNAL), and once the traffic has stopped and every client connection has
closed, the server's open file descriptors are back to their count after the warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "bench" / "soak.py"

# What the issue asks the soak to send; the script may send more kinds than these.
REQUIRED_KINDS = {
    "http_json_infer",
    "http_binary_infer",
    "http_metadata",
    "http_malformed_json",
    "http_wrong_datatype",
    "http_wrong_shape",
    "http_bytes_claim",
    "http_unknown_model",
    "http_long_id",
    "http_bad_gzip",
    "http_too_many_outputs",
    "http_abort",
    "grpc_infer",
    "grpc_stream_infer",
    "grpc_metadata",
    "grpc_bad_protobuf",
    "grpc_unknown_model",
    "grpc_stream_bad",
    "grpc_cancel",
    "grpc_conn_abort",
}


def test_short_soak_answers_every_kind_as_expected_and_returns_its_fds(tmp_path):
    cmd = [
        sys.executable,
        str(SOAK),
        "--requests",
        "4000",
        "--concurrency",
        "16",
        "--seed",
        "3",
        "--no-pin",
        "--sample-s",
        "0.5",
        "--max-rss-growth-pct",
        "1000",  # not judged on a run this short
        "--output",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    reports = sorted(tmp_path.glob("soak-*.json"))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    assert len(reports) == 1, p.stderr[-2000:]
    doc = json.loads(reports[0].read_text())
    assert reports[0].with_suffix(".png").stat().st_size > 0

    kinds = doc["kinds"]
    assert set(kinds) >= REQUIRED_KINDS
    for name, k in kinds.items():
        assert k["count"] > 0, f"{name} was never sent"
        assert k["server_errors"] == 0, (name, k["outcomes"], k["examples"])
        assert k["unexpected"] == 0, (name, k["outcomes"], k["examples"])
        if not k["good"] and k["transport"] == "http":
            assert all(o.startswith("4") for o in k["outcomes"]), (name, k["outcomes"])
    assert doc["totals"]["requests"] == 4000
    assert doc["totals"]["server_errors"] == 0

    # back to the count after the warm-up once every connection is closed: nothing held on to
    assert doc["fds"]["end"] == doc["fds"]["warm"], doc["fds"]
    assert doc["fds"]["max"] > doc["fds"]["warm"]  # the connections did show while the traffic ran
    assert doc["metrics"]["end"]["unknown_names"] == 0
    assert doc["result"] == "PASS", doc["failures"]
