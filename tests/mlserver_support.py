"""A real MLServer (Seldon's V2 server, from PyPI) for the interoperability tests.

It lives in a virtual environment of its own under ``.cache/`` (its dependencies are not
batchgate's), installed on first use. Where it cannot be installed (no package index), the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from processes import free_port

ROOT = Path(__file__).resolve().parents[1]
SPEC = "mlserver==1.7.1"
VENV = ROOT / ".cache" / "mlserver-venv"
STAMP = VENV / ".installed-mlserver-1.7.1"

# A custom MLServer runtime. Each output doubles the input of the same name's tensor
# (``out_<input>``), and ``rows`` tells each row how many rows the call carried: a caller
# sees more rows than it sent only if the gateway merged its request with others.
RUNTIME = """
import numpy as np
from mlserver import MLModel
import json
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse


class Doubler(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outs = []
        rows = 0
        for inp in payload.inputs:
            if inp.name == "boom":
                raise MLServerError("input 'boom' is refused by this model", status_code=400)
            arr = NumpyCodec.decode_input(inp)
            if arr.dtype.kind == "f" and np.isnan(arr).any():
                raise MLServerError(f"input '{inp.name}' holds NaN", status_code=400)
            rows = max(rows, arr.shape[0] if arr.ndim else 1)
            outs.append(NumpyCodec.encode_output(name="out_" + inp.name, payload=arr * 2))
        outs.append(NumpyCodec.encode_output(name="rows", payload=np.full((rows, 1), rows, np.int64)))
        p = payload.parameters.model_dump(exclude_none=True) if payload.parameters is not None else {}
        if p.get("echo"):  # the parameters it was given, as text: what a gateway passed on
            seen = {"request": {k: v for k, v in p.items() if k != "headers"}}
            for inp in payload.inputs:
                if inp.parameters is not None:
                    seen[inp.name] = inp.parameters.model_dump(exclude_none=True)
            outs.append(StringCodec.encode_output(name="params", payload=[json.dumps(seen, sort_keys=True)]))
        return InferenceResponse(model_name=self.name, outputs=outs)
"""


def install() -> str:
    """The ``mlserver`` command, installing it first when needed; raises RuntimeError when it cannot.
    Test processes running side by side (pytest-xdist) install it once: the first holds a lock."""
    exe = VENV / "bin" / "mlserver"
    if STAMP.exists() and exe.exists():
        return str(exe)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "mlserver-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if STAMP.exists() and exe.exists():
            return str(exe)
        return _install(exe)


def _install(exe: Path) -> str:
    print(f"installing {SPEC} into {VENV} (once; about a minute)", file=sys.stderr, flush=True)
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    done = subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", SPEC],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"pip install {SPEC} failed: {done.stderr[-2000:]}")
    STAMP.touch()
    return str(exe)


class MLServer:
    """``mlserver start`` of a folder of models, on free ports; ``grpc`` and ``http`` are host:port."""

    def __init__(self, root: Path, models: dict[str, dict]):
        """``models``: name -> extra model-settings.json fields (every model runs ``RUNTIME``)."""
        exe = install()
        root.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(3)]
        (root / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": ports[0],
                    "grpc_port": ports[1],
                    "metrics_port": ports[2],
                    "parallel_workers": 0,
                    "load_models_at_startup": True,
                }
            )
        )
        for name, extra in models.items():
            d = root / name
            d.mkdir(exist_ok=True)
            (d / "doubler_runtime.py").write_text(RUNTIME)
            (d / "model-settings.json").write_text(
                json.dumps({"name": name, "implementation": "doubler_runtime.Doubler", **extra})
            )
        self.http = f"127.0.0.1:{ports[0]}"
        self.grpc = f"127.0.0.1:{ports[1]}"
        self.log = root / "mlserver.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        with open(self.log, "w") as out:
            self.p = subprocess.Popen(
                [exe, "start", str(root)], cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self._wait(list(models))

    def _wait(self, models: list[str], timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.p.poll() is not None:
                raise RuntimeError(f"mlserver exited with {self.p.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if all(
                    urllib.request.urlopen(f"http://{self.http}/v2/models/{m}/ready", timeout=1).status == 200
                    for m in models
                ):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlserver did not become ready in {timeout:g} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
