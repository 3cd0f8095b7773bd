"""``batchgate serve`` picks gRPC's older socket engine (cheaper per forwarded request) only when
the user has not chosen one, grpc is not loaded yet, and the grpcio release is one it was measured
with. Each case runs in a fresh interpreter: the choice is made before grpc loads."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import os, sys
{before}
from batchgate.cli import GRPC_IO_EXPERIMENTS, prefer_legacy_grpc_io
print(prefer_legacy_grpc_io(), os.environ.get("GRPC_EXPERIMENTS"), GRPC_IO_EXPERIMENTS)
"""


def _probe(before: str = "", env_value: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_older_engine_is_chosen_only_when_nothing_else_decided():
    done, value, wanted = _probe()
    assert done == "True" and value == wanted
    assert _probe(env_value="-event_engine_client")[:2] == ["False", "-event_engine_client"]  # the user's wins
    assert _probe(before="import grpc")[:2] == ["False", "None"]  # too late: grpc is loaded


def test_a_grpcio_release_it_was_not_measured_with_keeps_its_default(monkeypatch):
    import batchgate.cli as cli

    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    monkeypatch.setattr(cli, "GRPC_IO_TESTED", ((0, 1), (0, 2)))
    modules = dict(sys.modules)
    monkeypatch.setattr(sys, "modules", {k: v for k, v in modules.items() if k != "grpc"})
    assert cli.prefer_legacy_grpc_io() is False and "GRPC_EXPERIMENTS" not in os.environ
