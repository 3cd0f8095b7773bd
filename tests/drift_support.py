"""What the drift tests share: a scikit-learn model converted by ``batchgate convert sklearn``, its
training data, a profile made by ``batchgate drift profile``, and a real HTTP receiver for
CloudEvents that can be taken down and brought back."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

FEATURES = 8
NAMES = [f"f{i}" for i in range(FEATURES)]


def batchgate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchgate.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def training_data(rows: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    x[:, 3] = rng.lognormal(0.0, 0.5, rows)  # a skewed one
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] > 0).astype(np.int64)
    return x, y


def traffic(rows: int, seed: int, shift: float = 0.0, feature: int = 2) -> np.ndarray:
    x, _ = training_data(rows, seed)
    x[:, feature] += shift
    return x


def build(root: str) -> dict[str, str]:
    """A repository with model 'fraud' (logistic regression), train.csv and profile.json."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    x, y = training_data()
    model = LogisticRegression(max_iter=200).fit(x, y)
    pkl = os.path.join(root, "fraud.joblib")
    joblib.dump(model, pkl)
    repo = os.path.join(root, "repo")
    done = batchgate(
        "convert", "sklearn", "--model", pkl, "--input", f"features:FP32:-1,{FEATURES}", "--repository", repo,
        "--name", "fraud",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    csv = os.path.join(root, "train.csv")
    with open(csv, "w") as f:
        f.write(",".join(NAMES) + "\n")
        for row in x[:5000]:
            f.write(",".join(f"{v:.6g}" for v in row) + "\n")
    profile = os.path.join(root, "profile.json")
    done = batchgate(
        "drift", "profile", "--model", "fraud", "--input", "features", "--data", csv, "--model-repository", repo,
        "--out", profile,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {"repo": repo, "csv": csv, "profile": profile}


class Receiver:
    """A real HTTP server that keeps the CloudEvents POSTed to it; ``up = False`` answers 503."""

    def __init__(self):
        self.events: list[dict] = []
        self.headers: list[dict] = []
        self.up = True
        self.attempts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.attempts += 1
                if not outer.up:
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                outer.events.append(json.loads(body))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/drift"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [e for e in list(self.events) if predicate(e)]
            if found:
                return found
            time.sleep(0.05)
        return []


def wait_until(check, timeout: float = 30.0, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return check()
