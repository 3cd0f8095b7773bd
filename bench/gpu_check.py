"""GPU check (only on a machine with an NVIDIA GPU; never in tests or CI).

Run it in a venv with ``onnxruntime-gpu`` instead of ``onnxruntime``:

    pip install -e . && pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu>=1.20,<2'
    python bench/gpu_check.py

It builds the MLP model (256 -> 1024 -> 1024 -> 16) with ``instance_group { kind: KIND_GPU }``,
serves it with ``batchgate serve``, and checks that:
1. ONNX Runtime offers the CUDA provider and batchgate chose it for the model (start-up log);
2. outputs over gRPC equal ONNX Runtime on the CPU (rtol 1e-3: GPU kernels round differently);
then reports rows/s for batch-1 requests against batch-64 requests (8 concurrent gRPC clients each),
as a ratio measured in the same run. Prints one JSON object at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from batchgate.demo import _save, mlp_model

CONFIG = """max_batch_size: 64
instance_group [ { count: 2 kind: KIND_GPU } ]
"""


def rows_per_second(url: str, batch: int, clients: int = 8, seconds: float = 10.0) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 256)).astype(np.float32)
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(i):
        c = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("input", [batch, 256], "FP32")
        inp.set_data_from_numpy(x)
        while time.monotonic() < stop:
            c.infer("mlp", [inp])
            done[i] += batch

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0)


def main() -> int:
    report: dict = {"available_providers": ort.get_available_providers()}
    print("providers available:", report["available_providers"], flush=True)
    repo = tempfile.mkdtemp(prefix="bg-gpu-")
    path = _save(mlp_model(), repo, "mlp", config=CONFIG)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchgate.cli",
            "serve",
            "--model-repository",
            repo,
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--admin-port",
            "-1",
            "--admin-http-port",
            "-1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    log_lines = []
    grpc_port = None
    deadline = time.monotonic() + 120
    while grpc_port is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log_lines.append(line)
        print("  server:", line.rstrip(), flush=True)
        m = re.search(r"gRPC on [^ ]+:(\d+)", line)
        if m:
            grpc_port = int(m.group(1))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        if grpc_port is None:
            raise SystemExit("server did not start:\n" + "".join(log_lines))
        url = f"127.0.0.1:{grpc_port}"
        loaded = next((line for line in log_lines if "model 'mlp' ready" in line), "")
        report["cuda_chosen"] = "on CUDAExecutionProvider" in loaded
        x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
        c = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("input", [16, 256], "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer("mlp", [inp]).as_numpy("output")
        want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        report["max_abs_diff_vs_cpu"] = float(np.max(np.abs(got - want)))
        report["outputs_match"] = bool(np.allclose(got, want, rtol=1e-3, atol=1e-3))
        print("measuring batch-1 ...", flush=True)
        b1 = rows_per_second(url, 1)
        print("measuring batch-64 ...", flush=True)
        b64 = rows_per_second(url, 64)
        report.update(
            batch1_rows_per_s=round(b1), batch64_rows_per_s=round(b64), batched_over_batch1=round(b64 / b1, 2)
        )
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(report, indent=2))
    return 0 if report.get("cuda_chosen") and report.get("outputs_match") else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
