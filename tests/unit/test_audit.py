"""The audit log: one JSON line per record, appended, fsynced, bounded, never a token; and
hash_files: SHA-256 of a folder's regular files, bounded; links to files followed, others skipped."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading

import orjson
import pytest

from batchgate.security import audit
from batchgate.security.audit import AuditLog, hash_files

T0 = 1_738_324_800.1234  # 2025-01-31T12:00:00.123Z


def lines(path) -> list[dict]:
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.split(b"\n")[:-1]]


def test_a_record_is_one_json_line_with_every_field(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), clock=lambda: T0)
    log.record(
        key_id="ops",
        peer="ipv4:10.0.0.7:51234",
        action="repository.load",
        target="fraud-v2",
        outcome="ok",
        detail="loaded version 2",
        files={"config.pbtxt": "b" * 64, "1/model.onnx": "a" * 64},
    )
    (line,) = lines(path)
    assert line == {
        "time": "2025-01-31T12:00:00.123Z",
        "key_id": "ops",
        "peer": "ipv4:10.0.0.7:51234",
        "action": "repository.load",
        "target": "fraud-v2",
        "outcome": "ok",
        "detail": "loaded version 2",
        "files": {"1/model.onnx": "a" * 64, "config.pbtxt": "b" * 64},
    }
    assert list(line["files"]) == ["1/model.onnx", "config.pbtxt"]  # sorted


def test_optional_fields_are_left_out_and_key_id_may_be_null(tmp_path):
    path = tmp_path / "audit.log"
    AuditLog(str(path)).record(key_id=None, peer="p", action="repository.unload", target="m", outcome="denied")
    (line,) = lines(path)
    assert line["key_id"] is None and "detail" not in line and "files" not in line
    assert line["time"].endswith("Z") and len(line["time"]) == len("2025-01-31T12:00:00.123Z")


def test_records_append_and_never_truncate(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"earlier":1}\n')
    log = AuditLog(str(path))
    for i in range(3):
        log.record(key_id="k", peer="p", action="a", target=f"m{i}", outcome="ok")
    AuditLog(str(path)).record(key_id="k", peer="p", action="a", target="m3", outcome="ok")
    got = lines(path)
    assert got[0] == {"earlier": 1} and [g["target"] for g in got[1:]] == ["m0", "m1", "m2", "m3"]


def test_file_is_created_0600(tmp_path):
    path = tmp_path / "audit.log"
    old = os.umask(0)
    try:
        AuditLog(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_file_readable_by_others_is_warned_about(tmp_path, caplog):
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    AuditLog(str(path))
    assert "chmod 600" in caplog.text


def test_every_record_is_fsynced_before_record_returns(tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    synced: list[bytes] = []
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        synced.append(path.read_bytes())  # what was on the file when it was synced

    monkeypatch.setattr(audit.os, "fsync", fsync)
    log.record(key_id="k", peer="p", action="a", target="t1", outcome="ok")
    log.record(key_id="k", peer="p", action="a", target="t2", outcome="ok")
    assert len(synced) == 2
    assert synced[0].count(b"\n") == 1 and b'"t1"' in synced[0]
    assert synced[1].count(b"\n") == 2 and b'"t2"' in synced[1]


def test_client_strings_are_cut_and_stay_on_one_line(tmp_path):
    path = tmp_path / "audit.log"
    evil = 'x\n{"forged": true}\r\n' + "y" * 5000
    AuditLog(str(path)).record(
        key_id="k", peer=evil, action="a", target=evil, outcome="error", detail=evil, files={evil: "0" * 64}
    )
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1
    (line,) = lines(path)
    for field in ("peer", "target", "detail"):
        assert len(line[field]) == 256 and line[field].endswith("...") and line[field].startswith("x\\x0a{")
    (name,) = line["files"]
    assert len(name) <= 1024


def test_lone_surrogates_are_written_escaped(tmp_path):
    path = tmp_path / "audit.log"
    AuditLog(str(path)).record(key_id="k", peer="p", action="a", target="m\udcff", outcome="ok")
    (line,) = lines(path)
    assert line["target"] == "m\\udcff"


def test_files_are_bounded(tmp_path):
    path = tmp_path / "audit.log"
    files = {f"f{i:05d}": "0" * 64 for i in range(audit.MAX_FILES + 5)}
    AuditLog(str(path)).record(key_id="k", peer="p", action="a", target="t", outcome="ok", files=files)
    (line,) = lines(path)
    assert len(line["files"]) == audit.MAX_FILES and line["files_omitted"] == 5


def test_no_field_takes_a_token():
    import inspect

    # record and arecord take exactly the fields of line
    params = set(inspect.signature(AuditLog.line).parameters) - {"self"}
    assert params == {
        "key_id",
        "peer",
        "action",
        "target",
        "outcome",
        "detail",
        "files",
        "files_omitted",
        "config_sha256",
    }


def test_record_refuses_a_field_line_does_not_have(tmp_path):
    log = AuditLog(str(tmp_path / "audit.log"))
    with pytest.raises(TypeError):
        log.record(key_id="k", peer="p", action="a", target="t", outcome="ok", token="secret")
    assert (tmp_path / "audit.log").read_bytes() == b""


def test_concurrent_records_never_interleave(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))

    def work(n):
        for i in range(25):
            log.record(key_id=f"k{n}", peer="p", action="a", target=f"{n}-{i}-" + "z" * 200, outcome="ok")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = lines(path)
    assert len(got) == 100 and len({g["target"] for g in got}) == 100


def test_write_failures_raise_oserror(tmp_path):
    with pytest.raises(OSError):
        AuditLog(str(tmp_path / "missing-dir" / "audit.log"))
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    os.unlink(path)
    os.mkdir(path)  # the path is now a folder: the next record cannot be written
    with pytest.raises(OSError):
        log.record(key_id="k", peer="p", action="a", target="t", outcome="ok")


async def test_arecord_writes_from_a_thread(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    await asyncio.gather(
        *(log.arecord(key_id="k", peer="p", action="a", target=f"t{i}", outcome="ok") for i in range(5))
    )
    assert sorted(g["target"] for g in lines(path)) == [f"t{i}" for i in range(5)]


# --- hash_files ----------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_bytes(b'name: "m"\n')
    (d / "1" / "model.onnx").write_bytes(b"\x08\x07" * 1000)
    (d / "empty").mkdir()
    return d


def test_hash_files_hashes_every_regular_file_sorted(model_dir):
    big = os.urandom(3 * audit.CHUNK + 17)  # several chunks
    (model_dir / "1" / "weights.bin").write_bytes(big)
    got, omitted = hash_files(str(model_dir))
    assert got == {
        "1/model.onnx": sha(b"\x08\x07" * 1000),
        "1/weights.bin": sha(big),
        "config.pbtxt": sha(b'name: "m"\n'),
    }
    assert list(got) == sorted(got) and omitted == 0


def test_hash_files_follows_links_to_files_and_skips_other_links_and_special_files(model_dir, tmp_path):
    """A mounted volume's model file is a link: what was loaded through it is what gets hashed.
    Links to folders (loops) and FIFOs (a read would wait) are skipped."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "weights").write_bytes(b"the weights served")
    os.symlink(outside / "weights", model_dir / "1" / "weights.bin")
    os.symlink(outside, model_dir / "linked-dir")
    os.symlink(tmp_path / "nothing-there", model_dir / "dangling")
    os.mkfifo(model_dir / "fifo")
    os.mkfifo(outside / "fifo")
    os.symlink(outside / "fifo", model_dir / "link-to-fifo")
    os.symlink(model_dir / "loop", model_dir / "loop")  # ELOOP: counted, the others still hashed
    got, omitted = hash_files(str(model_dir))
    assert omitted == 1
    assert got == {
        "1/model.onnx": sha(b"\x08\x07" * 1000),
        "1/weights.bin": sha(b"the weights served"),
        "config.pbtxt": sha(b'name: "m"\n'),
    }


def test_hash_files_hashes_the_first_files_and_counts_the_rest(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x")
    got, omitted = hash_files(str(tmp_path), max_files=3)
    assert list(got) == ["f0", "f1", "f2"] and omitted == 2
    with pytest.raises(ValueError, match="more than 4 files"):
        hash_files(str(tmp_path), max_files=3, max_listed=4)


def test_hash_files_bounds_the_folder_count(tmp_path):
    d = tmp_path / "deep"
    p = d
    for i in range(5):
        p = p / f"d{i}"
    p.mkdir(parents=True)
    with pytest.raises(ValueError, match="folders"):
        hash_files(str(d), max_listed=4)


def test_hash_files_bounds_the_bytes(model_dir):
    total = 2000 + len(b'name: "m"\n')
    assert len(hash_files(str(model_dir), max_bytes=total)[0]) == 2
    with pytest.raises(ValueError, match="bytes"):
        hash_files(str(model_dir), max_bytes=total - 1)


def test_hash_files_refuses_a_file_that_grows_past_the_limit(model_dir, monkeypatch):
    real = audit._hash_file

    def grow_then_hash(path, view, left, directory, link=False):
        with open(path, "ab") as f:
            f.write(b"x" * 10_000)
        return real(path, view, left, directory, link)

    monkeypatch.setattr(audit, "_hash_file", grow_then_hash)
    with pytest.raises(ValueError, match="bytes in the files hashed"):
        hash_files(str(model_dir), max_bytes=5000)


def test_hash_files_can_follow_linked_folders_once_and_leave_hidden_entries_out(tmp_path):
    """A ConfigMap volume: the files live in a hidden, timestamped folder, reached through
    ``..data`` and a link per entry. With linked_folders and hidden=False they are keyed as the
    model sees them, each once, whatever the timestamp; a link back up the tree does not loop."""
    d = tmp_path / "model"
    real = d / "..2026_12_04_22_50_00.123" / "1"
    real.mkdir(parents=True)
    (real / "model.onnx").write_bytes(b"weights")
    os.symlink("..2026_12_04_22_50_00.123", d / "..data")
    os.symlink("..data/1", d / "1")
    os.symlink("..", real / "up")  # back to the timestamped folder
    (d / ".hidden-file").write_bytes(b"not the model's")
    got, omitted = hash_files(str(d), linked_folders=True, hidden=False)
    assert got == {"1/model.onnx": sha(b"weights")} and omitted == 0
    # by default (the audit log's way) links to folders are skipped and hidden entries hashed
    got, _ = hash_files(str(d))
    assert got == {
        ".hidden-file": sha(b"not the model's"),
        "..2026_12_04_22_50_00.123/1/model.onnx": sha(b"weights"),
    }


def test_line_separators_and_bidi_controls_are_written_escaped(tmp_path):
    # JSON leaves U+2028, U+2029, U+0085 and the bidi controls as they are: str.splitlines() cut a
    # record in three, and U+202E showed "risk" + "attack" reversed. Written as the plain logs do.
    path = tmp_path / "audit.log"
    evil = "risk\u202ekcatta\u2028second\x85third\u2029\u2066x\u2069\u200f"
    AuditLog(str(path)).record(
        key_id="k", peer=evil, action="repository.unload", target=evil, outcome="ok", detail=evil, files={evil: "0"}
    )
    text = path.read_text("utf-8")
    assert len(text.splitlines()) == 1
    for c in "\u2028\u2029\x85\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c":
        assert c not in text
    (line,) = lines(path)
    for value in (line["peer"], line["target"], line["detail"], *line["files"]):
        assert value == "risk\\u202ekcatta\\u2028second\\x85third\\u2029\\u2066x\\u2069\\u200f"
    AuditLog(str(path)).record(key_id="k", peer="p", action="a", target="\u2028" * 300, outcome="ok")
    assert len(lines(path)[1]["target"]) == 256  # escapes count toward the bound


def test_refused_records_are_a_token_bucket_and_the_left_out_are_summed_up_once():
    now = [100.0]
    budget = audit.RefusedRecords(2.0, clock=lambda: now[0], wall=lambda: T0)
    assert budget.burst == 10  # five seconds of the rate
    assert [budget.take("UNAUTHENTICATED") for _ in range(12)] == 10 * [True] + 2 * [False]
    assert budget.take("PERMISSION_DENIED") is False
    assert budget.take("RESOURCE_EXHAUSTED") is False  # a key over its rate (or a shared-memory limit)
    assert budget.take("NOT_FOUND", "shm.register") is False  # a failed shared-memory call
    assert budget.take("ok") and budget.take("NOT_FOUND") and budget.take("INVALID_ARGUMENT", "repository.load")
    assert budget.take("ok", "shm.register")  # never bounded: done, or an admin action's failure
    assert budget.dropped == 5
    summary = budget.summary()
    assert summary is not None and summary["action"] == "audit.refused_not_recorded"
    assert summary["detail"].startswith(
        "5 refused attempts (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, failed shared-memory calls) "
        "not recorded since"
    )
    assert "2025-01-31T12:00:00.123Z" in summary["detail"]
    assert budget.summary() is None  # said once
    now[0] += 0.5  # one more token
    assert budget.take("UNAUTHENTICATED") and not budget.take("UNAUTHENTICATED")
    assert budget.dropped == 6 and budget.summary()["detail"].startswith("1 refused")
    now[0] += 3600  # refilled to the burst, no more
    assert sum(budget.take("UNAUTHENTICATED") for _ in range(20)) == 10
    unbounded = audit.RefusedRecords(0)  # audit_refused_per_s 0: every one
    assert all(unbounded.take("UNAUTHENTICATED") for _ in range(1000)) and unbounded.summary() is None


def test_a_summary_record_is_an_ordinary_line(tmp_path):
    path = tmp_path / "audit.log"
    budget = audit.RefusedRecords(1.0, clock=lambda: 0.0, wall=lambda: T0)
    while budget.take("UNAUTHENTICATED"):
        pass
    AuditLog(str(path), clock=lambda: T0).record(**budget.summary())
    (line,) = lines(path)
    assert line["key_id"] is None and line["outcome"] == "ok" and line["detail"].startswith("1 refused attempt (")
