"""The private folder of a ``front`` mode pod (``supervisor.py``): a 0700 directory in the
temporary folder holding the model owner's Unix socket, which only this user's processes reach.

A supervisor killed with SIGKILL (or the OOM killer) cannot remove its folder, and the chart's
``/tmp`` is an emptyDir that outlives a restarted container; so a supervisor starting in front mode
first removes the folders that supervisors now gone left behind. Its own folder is named
``batchgate-<pid>-<random>`` and holds a ``lock`` file it keeps locked (``flock``) while it runs,
named so only once locked: a lock held dies with its process, and is seen by any process using
the same folder, also one in another PID namespace sharing the volume, where a pid says nothing.

A leftover is removed only when all of these hold: the name has that form; it is a directory
itself (never a link), owned by this user and 0700; its ``lock`` is a regular file (opened without
following a link) that no process holds; and its pid runs no process here, or is this process's
own (a restarted container's supervisor has the same pid as the one before it, and is not that
one). Anything else is left as it is. Older versions' folders (``batchgate-<random>``, no lock)
are left: nothing tells a live one from a dead one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile

log = logging.getLogger("batchgate")

LOCK = "lock"
SOCKET = "models.sock"  # the owner's
NAME = re.compile(r"batchgate-(\d+)-[a-z0-9_]{8}")  # mkdtemp's random part: 8 of a-z, 0-9, _
# The longest path a Unix socket may have on Linux (sun_path: 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def pod_root() -> str:
    """Where the folders go: the temporary folder, or /tmp when the owner's socket would be too
    long a path there (a TMPDIR of more than about 70 characters failed front mode's start:
    "AF_UNIX path too long")."""
    tmp = tempfile.gettempdir()
    longest = os.path.join(tmp, "batchgate-4194304-abcdefgh", SOCKET)  # (pid_max is at most 2^22)
    return tmp if len(os.fsencode(longest)) <= MAX_SOCKET_PATH else "/tmp"


class PodDir:
    """This supervisor's folder, locked while it runs; :meth:`remove` at the end."""

    def __init__(self, root: str | None = None) -> None:
        self.path = tempfile.mkdtemp(prefix=f"batchgate-{os.getpid()}-", dir=root or pod_root())
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        # Made under another name, locked, then named ``lock``: a cleaner never finds it unheld
        # (one that came between making and locking it took this live folder for a dead one's).
        making = os.path.join(self.path, LOCK + ".new")
        self._fd = -1
        try:
            self._fd = os.open(making, flags, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a file just made: no one else holds it)
            os.rename(making, os.path.join(self.path, LOCK))
        except BaseException:
            # No cleaner would ever take a folder without its lock: removed here, by path (rmtree
            # needs file descriptors, and running out of them is one way to get here).
            if self._fd >= 0:
                os.close(self._fd)
            with contextlib.suppress(OSError):
                os.unlink(making)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
            raise

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)  # the lock goes last: no cleaner takes the folder while it is removed


def remove_leftovers(root: str | None = None) -> list[str]:
    """Remove the folders in ``root`` (the temporary folder) that dead supervisors left; those
    removed, for the log."""
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux has the safe one
        return []
    root = root or pod_root()
    try:
        entries = [e for e in os.scandir(root) if NAME.fullmatch(e.name)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        try:
            if _left_behind(entry):
                removed.append(entry.path)
        except OSError as e:  # (another supervisor removing it at the same time, say)
            log.debug("front mode: %s left as it is: %s", entry.path, e)
    return removed


def _left_behind(entry: os.DirEntry) -> bool:
    """Remove ``entry`` if it is a dead supervisor's folder; whether it was removed."""
    st = entry.stat(follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        return False
    m = NAME.fullmatch(entry.name)
    assert m is not None
    pid = int(m.group(1))
    if pid != os.getpid() and _runs(pid):
        return False
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(entry.path, LOCK), flags)
    except OSError:  # no lock (not made yet, or not ours) or a link: left
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its supervisor runs
            return False
        shutil.rmtree(entry.path)  # (a link inside is removed, never followed)
        return True
    finally:
        os.close(fd)


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
