"""The private folder of a front-mode pod: which folders a starting supervisor takes for ones a
dead supervisor left (``pod_dir.remove_leftovers``), on real folders, links and locks; a lock
held by another process stands for a supervisor whose pid this process cannot see (another PID
namespace sharing the volume)."""

from __future__ import annotations

import os
import subprocess
import sys

from batchgate.pod_dir import LOCK, PodDir, remove_leftovers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _folder(root, name: str, lock: bool = True):
    d = root / name
    d.mkdir(mode=0o700)
    d.chmod(0o700)  # (whatever the umask)
    if lock:
        (d / LOCK).write_text("")
    (d / "models.sock").write_text("")  # (a file in place of the socket: removed all the same)
    return d


def test_a_dead_supervisors_folder_is_removed_and_only_that(tmp_path):
    pid = _dead_pid()
    dead = _folder(tmp_path, f"batchgate-{pid}-abcd_123")
    alive = _folder(tmp_path, f"batchgate-{os.getppid()}-abcd_123")  # a running process's pid
    no_lock = _folder(tmp_path, f"batchgate-{pid}-nolock00", lock=False)
    other_name = _folder(tmp_path, f"batchgate-{pid}-ABCD1234")  # not mkdtemp's alphabet
    older = _folder(tmp_path, "batchgate-abcd1234", lock=False)
    open_mode = _folder(tmp_path, f"batchgate-{pid}-open0000")
    open_mode.chmod(0o755)
    assert remove_leftovers(str(tmp_path)) == [str(dead)]
    assert not dead.exists()
    for kept in (alive, no_lock, other_name, older, open_mode):
        assert kept.is_dir(), kept


def test_a_folder_whose_lock_another_process_holds_is_left_until_it_lets_go(tmp_path):
    d = _folder(tmp_path, f"batchgate-{_dead_pid()}-heldheld")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(d / LOCK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert remove_leftovers(str(tmp_path)) == []
        assert d.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert remove_leftovers(str(tmp_path)) == [str(d)]


def test_links_are_never_followed(tmp_path):
    pid = _dead_pid()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = _folder(outside, "target")
    (tmp_path / "tmp").mkdir()
    root = tmp_path / "tmp"
    (root / f"batchgate-{pid}-linklink").symlink_to(target, target_is_directory=True)
    inner = _folder(root, f"batchgate-{pid}-innerlnk", lock=False)
    (inner / LOCK).symlink_to(target / LOCK)  # a lock that is a link: not opened
    leaf = _folder(root, f"batchgate-{pid}-leaflink")
    (leaf / "elsewhere").symlink_to(target, target_is_directory=True)  # removed as a link, never followed
    assert remove_leftovers(str(root)) == [str(leaf)]
    assert (root / f"batchgate-{pid}-linklink").is_symlink() and inner.is_dir()
    assert sorted(os.listdir(target)) == [LOCK, "models.sock"]


def test_a_running_supervisors_own_folder_is_locked_and_removed_at_its_end(tmp_path):
    mine = PodDir(str(tmp_path))
    try:
        assert os.path.dirname(mine.path) == str(tmp_path)
        assert os.path.basename(mine.path).startswith(f"batchgate-{os.getpid()}-")
        # Its name says this very process's pid (what a restarted container's supervisor sees of the
        # one before it): the lock alone keeps it.
        assert remove_leftovers(str(tmp_path)) == []
    finally:
        mine.remove()
    assert not os.path.exists(mine.path)


def test_a_temporary_folder_too_long_for_the_owners_socket_gives_way_to_tmp(tmp_path, monkeypatch):
    """A TMPDIR of more than about 70 characters (a test's tmp_path under xdist) failed front
    mode's start with "AF_UNIX path too long"; the folder now goes to /tmp then."""
    import tempfile

    from batchgate.pod_dir import MAX_SOCKET_PATH, SOCKET, pod_root

    short = tmp_path / "s"
    short.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    assert pod_root() == str(short) or len(str(short)) > 60
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert pod_root() == "/tmp"
    made = PodDir()
    try:
        assert os.path.dirname(made.path) == "/tmp"
        assert len(os.path.join(made.path, SOCKET)) <= MAX_SOCKET_PATH
    finally:
        made.remove()


def test_a_folder_being_made_is_never_taken_for_a_dead_ones(tmp_path, monkeypatch):
    """Another supervisor cleaning the same folder (a container beside this one, whose pid may
    equal this one's) at the moment this one has made its lock file but not locked it yet: it
    found an unheld lock and removed the new folder, and the owner's socket could not be made."""
    import fcntl

    flock = fcntl.flock
    cleaned: list[list[str]] = []
    calls = []

    def flock_after_a_cleaner(fd, how):
        calls.append(fd)
        if len(calls) == 1:  # this supervisor's: a cleaner first (its own flock goes straight through)
            cleaned.append(remove_leftovers(str(tmp_path)))
        return flock(fd, how)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_cleaner)
    mine = PodDir(str(tmp_path))
    try:
        assert cleaned == [[]]
        assert os.path.isdir(mine.path) and os.path.isfile(os.path.join(mine.path, LOCK))
        assert remove_leftovers(str(tmp_path)) == []  # held
    finally:
        mine.remove()


def test_a_folder_whose_lock_could_not_be_made_is_not_left_behind(tmp_path):
    """PodDir made its folder, then failed to make the lock in it (no file descriptor left,
    here): the start failed, and the folder stayed for good, since a folder without a lock is
    never taken for a dead supervisor's."""
    import resource

    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next file cannot be opened
    try:
        with pytest.raises(OSError):
            PodDir(str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert os.listdir(tmp_path) == []
