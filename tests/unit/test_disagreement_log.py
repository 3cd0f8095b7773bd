"""The disagreement log's lines: one line each, bounded, with what a client sent escaped (a
caller's text must not forge lines or read otherwise in a viewer)."""

from __future__ import annotations

import json
import os
import types

import numpy as np

from batchgate.core.types import InferRequest, InferResponse, Tensor
from batchgate.shadows import MAX_LINE, DisagreementLog


def _runner():
    return types.SimpleNamespace(
        route="r", spec=types.SimpleNamespace(name="next"), compare=types.SimpleNamespace(output="y")
    )


def _write(tmp_path, inputs: list[Tensor], rid: str = "id") -> list[str]:
    path = tmp_path / "d.jsonl"
    log = DisagreementLog(str(path), 1 << 20, 1000)
    request = InferRequest("m", "", tuple(inputs), id=rid)
    primary = InferResponse("m_v1", "1", [])
    log.write(_runner(), request, primary, np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32))
    log.close()
    return path.read_text(encoding="utf-8").splitlines()


def test_client_text_is_cut_and_escaped_in_one_line(tmp_path):
    evil = 'ok\u202e\nforged {"route": "x"}\u2066' + "z" * 500
    text = np.array([[evil.encode(), evil]], dtype=object)
    lines = _write(tmp_path, [Tensor("in\u202ename\n", "BYTES", (1, 2), text)], rid="r\u202e\n1")
    assert len(lines) == 1
    line = lines[0]
    assert "\u202e" not in line and "\u2066" not in line  # bidirectional controls escaped
    doc = json.loads(line)
    first = doc["inputs"][0]["first"]
    assert all(len(v) <= 64 + 16 for v in first) and all("\n" not in v and "\u202e" not in v for v in first)
    assert "\u202e" not in doc["inputs"][0]["name"] and "\n" not in doc["inputs"][0]["name"]
    assert "\u202e" not in doc["request_id"] and "\n" not in doc["request_id"]


def test_a_line_stays_bounded_whatever_the_inputs(tmp_path):
    # 64 inputs of long text, each character escaped to six: without bounds a line of megabytes
    value = "\u202e" * 5000
    big = [Tensor(f"in{i}", "BYTES", (1, 16), np.array([[value] * 16], dtype=object)) for i in range(64)]
    lines = _write(tmp_path, big)
    assert len(lines) == 1 and len(lines[0]) <= MAX_LINE
    doc = json.loads(lines[0])
    assert len(doc["inputs"]) <= 8 and doc["inputs"][0] == {"name": "in0", "shape": [1, 16]}


def test_the_file_and_its_rotated_copy_are_readable_by_their_owner_only(tmp_path):
    """Review finding: the log (sampled inputs clients sent) was created with the umask's mode,
    0644 here: readable by every local user. Created 0600 now, its rotated successor too."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "d.jsonl"
        log = DisagreementLog(str(path), 4096, 1000)
        request = InferRequest("m", "", (Tensor("x", "FP32", (1, 64), np.zeros((1, 64), np.float32)),), id="id")
        for _ in range(40):  # past 4 KiB: rotated once at least
            log.write(_runner(), request, InferResponse("m_v1", "1", []), np.zeros((1, 3)), np.ones((1, 3)))
        log.close()
    finally:
        os.umask(old)
    rotated = tmp_path / "d.jsonl.1"
    assert rotated.exists() and path.exists()
    assert {os.stat(p).st_mode & 0o777 for p in (path, rotated)} == {0o600}
