"""Drift monitoring with worker processes: every worker samples, one detector (the supervisor's)
scores the pod's traffic; its figures are on the supervisor's /metrics once, its events reach the
receiver once, and the admin API of worker 0 reads its status and sends it commands."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import tritonclient.http as httpclient
import yaml

from drift_support import Receiver, batchgate, build, traffic, wait_until
from processes import Proc, free_port, serve_args
from route_support import metric

pytestmark = pytest.mark.timeout(240)
ROWS, WINDOW = 20, 200


def test_two_workers_feed_one_detector(tmp_path):
    built = build(str(tmp_path))
    receiver = Receiver()
    cfg = tmp_path / "config.yaml"
    monitor = {
        "model": "fraud",
        "inputs": ["features"],
        "reference": built["profile"],
        "sample_rate": 1.0,
        "window": {"samples": WINDOW, "max_s": 60},
        "debounce_windows": 2,
        "webhook": {"url": receiver.url, "format": "cloudevents", "timeout_s": 2, "retries": 1},
    }
    cfg.write_text(yaml.safe_dump({"drift": [monitor]}))
    admin_grpc = free_port()  # (each worker would pick a port of its own for 0)
    p = Proc(
        serve_args(built["repo"], "--workers", "2", "--config", str(cfg), "--admin-http-port", "0")
        + ["--admin-port", str(admin_grpc)]
        + ["--audit-log-file", str(tmp_path / "audit.jsonl"), "--allow-open-admin", "true"]
    )
    try:
        p.wait_ready()
        admin = int(re.search(r"admin HTTP on 127\.0\.0\.1:(\d+)", p.output()).group(1))

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{p.ports[2]}/metrics", timeout=20).read().decode()

        def send(x) -> None:  # a new connection each time: both workers sample
            c = httpclient.InferenceServerClient(p.http)
            i = httpclient.InferInput("features", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=True)
            c.infer("fraud", [i])
            c.close()

        requests = 3 * WINDOW // ROWS
        for k in range(requests):
            send(traffic(ROWS, 2000 + k, shift=1.0))
        assert wait_until(lambda: metric(scrape(), "batchgate_drift_windows_total", model="fraud") >= 3, timeout=60)
        used = 'batchgate_drift_samples_total{model="fraud",outcome="used"}'
        assert wait_until(lambda: f"{used} {float(requests)}" in scrape(), timeout=30)  # the detector's counts lag
        text = scrape()
        assert metric(text, "batchgate_drift_detector_up") == 1
        assert metric(text, "batchgate_drift_active", model="fraud") == 1
        assert metric(text, "batchgate_drift_detections_total", model="fraud") == 1
        per_worker = [metric(text, "batchgate_worker_requests_total", worker=w) for w in "01"]
        assert all(n > 0 for n in per_worker), per_worker  # both workers sampled for the one detector
        detected = receiver.wait_for(lambda e: e["type"] == "io.batchgate.drift.detected")
        assert len(detected) == 1

        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/v1/drift/fraud", timeout=20).read())
        assert int(status["windows"]) >= 3 and status["detector_up"] is True and status["active"] is True
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/v1/drift/fraud/reset", data=b"{}", method="POST")
        after = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert after["active"] is False
        # over gRPC (the CLI): the call's deadline goes with the command to the supervisor's detector
        done = batchgate("drift", "reset", "fraud", "--admin", f"127.0.0.1:{admin_grpc}", "--timeout-s", "20")
        assert done.returncode == 0 and '"fraud"' in done.stdout, done.stderr
        assert "drift.detected" in (tmp_path / "audit.jsonl").read_text()
    finally:
        p.kill()
        receiver.close()
