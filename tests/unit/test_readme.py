"""README.md: no link leaves the repository, every link inside it resolves, and the command it gives
for rendering the chart's KEDA variant renders a ScaledObject with the real helm binary."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# A URL: its scheme, then the host (up to a port, path, closing bracket, quote or space).
URL = re.compile(r"(?i)\b(https?|ftp)://([^\s/:)\]>`'\",]*)")
BARE_WWW = re.compile(r"(?i)(?<![\w./])www\.[a-z0-9-]+\.[a-z]{2,}")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# Hosts that name no site outside: this machine, a placeholder (HOST, <pod>), a Service of the same
# namespace (one label: triton), or names reserved for examples and for cluster or local networks.
LOOPBACK = {"localhost", "127.0.0.1", "0.0.0.0", "[::1]"}
RESERVED_SUFFIXES = (
    ".example",
    ".test",
    ".invalid",
    ".localhost",
    ".local",
    ".internal",
    ".svc",
    ".cluster.local",
    "example.com",
    "example.org",
    "example.net",
)


def _inside(host: str) -> bool:
    if host in LOOPBACK or host.startswith("<") or host.isupper():
        return True
    return "." not in host or host.lower().endswith(RESERVED_SUFFIXES)


def external_links(text: str) -> list[str]:
    """Every link in Markdown ``text`` that points outside the repository: URLs to a public host
    (in a Markdown link or bare, code included), bare www. names, and link targets with any other
    scheme (mailto:)."""
    found = [m.group(0) for m in URL.finditer(text) if m.group(2) and not _inside(m.group(2))]
    found += BARE_WWW.findall(text)
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"(?i)[a-z][a-z0-9+.-]*:", target) and not URL.match(target):
            found.append(target)
    return found


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(text: str, root: Path) -> list[str]:
    """Link targets in ``text`` that do not resolve: a file that is not in the repository, or an
    anchor no heading has."""
    prose = FENCE.sub("", text)
    anchors = {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose, re.M)}
    broken = []
    for target in LINK.findall(prose):
        if URL.match(target) or re.match(r"(?i)[a-z][a-z0-9+.-]*:", target):
            continue  # external_links' business
        path, _, anchor = target.partition("#")
        if (root / path).exists() if path else anchor in anchors:
            continue
        broken.append(target)
    return broken


def test_the_checks_find_what_they_look_for():
    text = (
        "See [the docs](https://github.com/owner/repo/blob/main/x.md), https://pypi.org/project/shtab/ "
        "and <http://docs.python.org>; www.kernel.org; [mail](mailto:someone@host.org).\n"
        "```\ncurl http://localhost:8000/v2 http://127.0.0.1:8002/metrics --url http://triton:8000\n"
        "address: http://prometheus-operated.monitoring.svc:9090 http://HOST:8002 http://<pod>:8005\n"
        "webhook: {url: http://retrain.example/trigger}\n```\n"
        "webhook URLs `http://` or `https://` only; [auth](docs/auth.md), [up](#quick-start)\n"
    )
    assert external_links(text) == [
        "https://github.com",
        "https://pypi.org",
        "http://docs.python.org",
        "www.kernel.org",
        "mailto:someone@host.org",
    ]
    prose = "# Quick start\n## Remote models: Triton and `V2` servers\n"
    links = "[a](README.md) [b](nowhere.md) [c](#quick-start) [d](#remote-models-triton-and-v2-servers) [e](#gone)"
    assert broken_links(prose + links, ROOT) == ["nowhere.md", "#gone"]


def test_readme_links_stay_inside_the_repository_and_resolve():
    text = README.read_text()
    assert external_links(text) == []
    assert broken_links(text, ROOT) == []


def _helm() -> str:
    path = os.environ.get("HELM") or str(ROOT / ".cache" / "helm" / "helm")
    if not Path(path).exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_helm.py")], check=True, capture_output=True)
    return path


def test_the_documented_keda_command_renders_a_scaled_object():
    (line,) = [
        line.strip() for line in README.read_text().splitlines() if line.startswith("helm template") and "keda" in line
    ]
    argv = shlex.split(line)
    assert "--api-versions" in argv and "keda.sh/v1alpha1" in argv
    r = subprocess.run([_helm(), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert kinds.count("ScaledObject") == 1 and "HorizontalPodAutoscaler" not in kinds, kinds
    # without the API the chart refuses the variant, in the words the README quotes
    without = [a for a in argv[1:] if a not in ("--api-versions", "keda.sh/v1alpha1")]
    r = subprocess.run([_helm(), *without], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "autoscaling.mode is keda, but this cluster has no keda.sh/v1alpha1 API" in r.stderr
    assert "autoscaling.mode is keda, but this cluster has no keda.sh/v1alpha1 API" in README.read_text()
