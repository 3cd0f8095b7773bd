"""Rendering the Helm chart with the real helm binary, and validating what it renders; shared by
the chart's tests (test_helm_chart.py, test_helm_security.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from crd_schemas import CRD_SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "batchgate"
K8S = "1.33.0"
# The APIs the rendering cluster is told it has (Prometheus Operator, KEDA, cert-manager).
API_VERSIONS = ["monitoring.coreos.com/v1", "keda.sh/v1alpha1", "cert-manager.io/v1"]


def helm_binary() -> str:
    path = os.environ.get("HELM") or str(ROOT / ".cache" / "helm" / "helm")
    if not Path(path).exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_helm.py")], check=True, capture_output=True)
    return path


def render(
    helm: str, values: Path, *extra: str, api_versions: list[str] = API_VERSIONS, release: str = "rel"
) -> list[dict]:
    """The manifests `helm template` renders with these values (it must succeed)."""
    out = template(helm, values, *extra, api_versions=api_versions, release=release)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def template(helm: str, values: Path, *extra: str, api_versions: list[str] = API_VERSIONS, release: str = "rel"):
    """`helm template` of the chart as a finished process (stdout, stderr, returncode)."""
    return subprocess.run(
        [
            helm,
            "template",
            release,
            str(CHART),
            "-f",
            str(values),
            "--namespace",
            "serving",
            "--kube-version",
            K8S,
            *[a for v in api_versions for a in ("--api-versions", v)],
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def validate(docs: list[dict]) -> None:
    """Every manifest against Kubernetes' schemas (strict), custom resources against CRD_SCHEMAS."""
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])  # the fields we set, spelled right
        else:
            kubernetes_validate.validate(doc, K8S, strict=True)  # raises on any unknown or wrong field


def exported_series() -> set[str]:
    """The name of every series batchgate's /metrics can carry (counters with _total, histograms
    with _bucket, _sum and _count), from the code's table of metric families."""
    from batchgate.monitoring.metrics import FAMILIES

    out: set[str] = set()
    for name, family in FAMILIES.items():
        if family.kind == "counter":
            out.add(name + "_total")
        elif family.kind == "histogram":
            out |= {name + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(name)
    return out


def lint(helm: str, values: Path) -> None:
    out = subprocess.run([helm, "lint", str(CHART), "--strict", "-f", str(values)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def values_file(tmp_path: Path, given: dict) -> Path:
    """``given`` written as a values file for ``helm -f``."""
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(given))
    return f


def pod_environment(container: dict, image_variant: str = "gpu") -> dict[str, str]:
    """The BATCHGATE_* variables batchgate sees in the pod: the image's ENV (read from the
    Dockerfile, for that variant) with the container's own `env` values over it, as the
    container runtime merges them."""
    from test_dockerfile import env_of, parse, variant

    _, chain, *_ = variant(parse(), image_variant)
    env = {k: v for k, v in env_of(chain, {}).items() if k.startswith("BATCHGATE_")}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env
