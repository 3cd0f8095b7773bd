"""The audit log: one JSON line per admin action, appended and fsynced before the action is
answered (setting ``audit_log_file``).

A line::

    {"time":"2025-01-31T12:00:00.123Z","key_id":"ops","peer":"ipv4:10.0.0.7:51234",
     "action":"repository.load","target":"fraud-v2","outcome":"ok",
     "files":{"1/model.onnx":"9f86d0...","config.pbtxt":"2c26b4..."}}

No field takes a token: a caller is named by its key id. What a client controls (peer, target,
detail, file names) is cut to a bounded length; JSON escapes the rest, so a line stays one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import orjson

log = logging.getLogger("batchgate.audit")

MAX_TEXT = 256  # peer, target, detail
MAX_PATH = 1024  # a file name in "files"
MAX_FILES = 1000  # entries of "files" written; the rest are counted in "files_omitted"
CHUNK = 1 << 20
GIB = 1 << 30


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` at most ``limit`` characters, valid UTF-8 (a lone surrogate is written escaped)."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class AuditLog:
    """Appends audit lines to ``path`` (created 0600 if missing). Thread-safe; every record is
    on disk (fsync) when :meth:`record` returns, and a failure to write raises ``OSError``."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        created = not os.path.exists(path)
        fd = self._open()  # OSError now, at start, rather than at the first admin action
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if created:
            dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dirfd)  # the new file's name is on disk too
            finally:
                os.close(dirfd)
        elif mode & 0o077:
            log.warning("audit log %s can be read by others (mode %o); chmod 600 it", path, stat.S_IMODE(mode))

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def line(
        self,
        *,
        key_id: str | None,
        peer: str,
        action: str,
        target: str,
        outcome: str,
        detail: str = "",
        files: Mapping[str, str] | None = None,
    ) -> bytes:
        """The JSON line :meth:`record` appends, newline included."""
        obj: dict[str, object] = {
            "time": _rfc3339(self._clock()),
            "key_id": None if key_id is None else _cut(key_id),
            "peer": _cut(peer),
            "action": _cut(action),
            "target": _cut(target),
            "outcome": _cut(outcome),
        }
        if detail:
            obj["detail"] = _cut(detail)
        if files is not None:
            names = sorted(files)
            obj["files"] = {_cut(n, MAX_PATH): _cut(files[n], 64) for n in names[:MAX_FILES]}
            if len(names) > MAX_FILES:
                obj["files_omitted"] = len(names) - MAX_FILES
        return orjson.dumps(obj) + b"\n"

    def record(self, **fields: Any) -> None:
        """Append one line (the fields of :meth:`line`) and fsync it; ``OSError`` if it could
        not be written."""
        data = self.line(**fields)
        with self._lock:
            fd = self._open()  # per record: a rotated file (moved away) is followed at once
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    async def arecord(self, **fields: Any) -> None:
        """:meth:`record` on a worker thread (the fsync must not stall the event loop)."""
        await asyncio.to_thread(partial(self.record, **fields))


def hash_files(directory: str, max_files: int = 1000, max_bytes: int = 8 * GIB) -> dict[str, str]:
    """SHA-256 (hex) of every regular file under ``directory``, keyed by its path relative to
    it ('/'-separated), in sorted order. Symbolic links (to files or folders) and special files
    are skipped, never followed. ``ValueError`` when the folder holds more than ``max_files``
    files (or as many folders) or more than ``max_bytes`` bytes: nothing is hashed then."""
    files: list[tuple[str, str]] = []  # (relative, full)
    total = folders = 0
    stack = [("", directory)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                name = f"{rel}{entry.name}"
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders += 1
                    if folders > max_files:
                        raise ValueError(f"{directory} holds more than {max_files} folders; at most that are hashed")
                    stack.append((name + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append((name, entry.path))
                    if len(files) > max_files:
                        raise ValueError(f"{directory} holds more than {max_files} files; at most that are hashed")
                    total += entry.stat(follow_symlinks=False).st_size
                    if total > max_bytes:
                        raise ValueError(f"{directory} holds more than {max_bytes} bytes; at most that are hashed")
    files.sort()
    out: dict[str, str] = {}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = max_bytes
    for rel, full in files:
        out[rel], size = _hash_file(full, view, left, directory)
        left -= size
    return out


def _hash_file(path: str, view: memoryview, left: int, directory: str) -> tuple[str, int]:
    """SHA-256 of one regular file, opened without following a link (a file swapped for a
    link or a FIFO since the folder was listed is refused, not followed or waited on), and
    the bytes it held."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is no longer a regular file")
        h = hashlib.sha256()
        size = 0
        while n := f.readinto(view):
            size += n
            if size > left:
                raise ValueError(f"{directory} grew past the byte limit while it was hashed")
            h.update(view[:n])
    return h.hexdigest(), size
