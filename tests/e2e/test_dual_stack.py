"""``--host ::`` means every address of both families, whatever the host's
``net.ipv6.bindv6only`` says: with it at 1 (some hosts and container runtimes set it), the HTTP,
metrics, health and admin HTTP listeners took IPv6 only, while gRPC core's (the grpcio engine's
gRPC port, the admin gRPC API) took IPv4 too; a dual-stack pod then failed its IPv4 clients.

The sysctl is per network namespace, so the test runs `batchgate serve` and its clients in a
namespace of its own (``unshare -n``), which needs root or user namespaces: skipped where the
machine allows neither, or has no IPv6 loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchgate.demo import _save, classifier_model
from listener_support import LOOPBACKS, ipv6_loopback

TESTS = Path(__file__).resolve().parents[1]


def _own_namespace() -> list[str] | None:
    """The command prefix that runs a shell in a fresh network namespace whose loopback is up
    and whose bindv6only is 1, or None where this machine cannot make one."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    script = 'ip link set lo up && echo 1 > /proc/sys/net/ipv6/bindv6only && exec "$@"'
    prefix = ["unshare", "-n", "sh", "-c", script, "sh"]
    for extra in ([], ["-r"]):  # as root, else as root of a user namespace of our own
        cmd = [prefix[0], *extra, *prefix[1:]]
        done = subprocess.run([*cmd, "cat", "/proc/sys/net/ipv6/bindv6only"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == "1":
            return cmd
    return None


NAMESPACE = _own_namespace()


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.skipif(NAMESPACE is None, reason="cannot make a network namespace here (unshare -n needs root)")
@pytest.mark.parametrize("engine, workers", [("h2", "1"), ("grpcio", "1"), ("h2", "2"), ("grpcio", "2")])
def test_every_listener_on_the_ipv6_wildcard_takes_ipv4_too_under_bindv6only(tmp_path, engine, workers):
    assert NAMESPACE is not None
    _save(classifier_model(), str(tmp_path), "clf")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [*NAMESPACE, sys.executable, "-m", "listener_support", str(tmp_path), engine, workers],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    said = json.loads(done.stdout.strip().splitlines()[-1])
    listeners = ("http", "grpc", "metrics", "health", "admin", "admin_http")
    assert said == {address: dict.fromkeys(listeners, "ok") for address in LOOPBACKS}
