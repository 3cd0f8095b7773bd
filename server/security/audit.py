"""The audit log: one JSON line per admin action, appended and fsynced before the action is
answered (setting ``audit_log_file``).

A line::

    {"time":"2025-01-31T12:00:00.123Z","key_id":"ops","peer":"ipv4:10.0.0.7:51234",
     "action":"repository.load","target":"fraud-v2","outcome":"ok",
     "files":{"1/model.onnx":"9f86d0...","config.pbtxt":"2c26b4..."}}

No field takes a token: a caller is named by its key id. Every string is cut to a bounded
length and written with its control characters, line separators and bidirectional controls
escaped (what a client controls: peer, target, detail, file names), so a line stays one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import orjson

from ..core.types import printable

log = logging.getLogger("batchgate.audit")

MAX_TEXT = 256  # peer, target, detail
MAX_PATH = 1024  # a file name in "files"
MAX_FILES = 1000  # entries of "files" written; the rest are counted in "files_omitted"
CHUNK = 1 << 20
GIB = 1 << 30


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` at most ``limit`` characters, written as the plain logs write a client's words
    (:func:`printable`): control characters (C0, DEL, C1 such as U+0085), the Unicode line and
    paragraph separators and the bidirectional controls as escapes, so a record is one line to
    any reader (``str.splitlines`` splits at U+2028, U+2029 and U+0085, which JSON leaves as
    they are) and reads as it was written; valid UTF-8 (a lone surrogate is written escaped)."""
    long = len(text) > limit
    text = printable(text[:limit])
    if long or len(text) > limit:
        text = text[: limit - 3] + "..."
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


# Outcomes of callers refused at the door: no key, one without the scope or model, one over its
# rate (RESOURCE_EXHAUSTED, also a shared-memory limit's: the rate's refusals were each recorded
# and fsynced, so a key allowed one request a second wrote 700 records a second).
REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
SUMMED_UP = "UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, failed shared-memory calls"


def bounded(outcome: str, action: str) -> bool:
    """Whether a record is one of those :class:`RefusedRecords` bounds: a refusal at the door,
    or a failed shared-memory call, which needs scope infer only (on an open server, nothing):
    not an admin action, and every failed one was recorded and fsynced (an anonymous client wrote
    2,000 records a second of registrations naming no segment)."""
    return outcome in REFUSED or (outcome != "ok" and action.startswith("shm."))


BURST_S = 5.0  # seconds of audit_refused_per_s a burst of refused attempts may take at once


class RefusedRecords:
    """The records of refused attempts (:func:`bounded`: no key, an unknown one, one without the
    scope or model or over its rate; a failed shared-memory call), at most ``rate`` a second after a burst of
    ``BURST_S`` seconds of them (a token bucket); ``rate`` 0 records every one. A caller needs
    no key to be refused, and each record is fsynced: unbounded, one keep-alive connection wrote
    ~250 kB/s of them. Those left out are counted (``dropped``: a counter's value) and said in
    one summary record, written before the next record that is (:meth:`summary`). Admin actions
    of a key allowed to take them, done or failed, are never left out."""

    __slots__ = ("rate", "burst", "dropped", "_tokens", "_stamp", "_left_out", "_since", "_clock", "_wall")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.rate = rate
        self.burst = max(1, math.ceil(rate * BURST_S))
        self.dropped = 0
        self._tokens, self._stamp = float(self.burst), clock()
        self._left_out, self._since = 0, 0.0
        self._clock, self._wall = clock, wall

    def take(self, outcome: str, action: str = "") -> bool:
        """Whether a record of this outcome and action is written (always, unless it is one of
        those bounded (:func:`bounded`) past the rate: then it is counted as left out)."""
        if self.rate <= 0 or not bounded(outcome, action):
            return True
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if not self._left_out:
            self._since = self._wall()
        self._left_out += 1
        self.dropped += 1
        return False

    def summary(self) -> dict[str, Any] | None:
        """The fields of the record saying how many refused attempts were left out since when
        (once: the count starts again), or None when none were."""
        if not self._left_out:
            return None
        n, self._left_out = self._left_out, 0
        return {
            "key_id": None,
            "peer": "",
            "action": "audit.refused_not_recorded",
            "target": "",
            "outcome": "ok",
            "detail": f"{n} refused attempt{'' if n == 1 else 's'} ({SUMMED_UP}) not recorded since "
            f"{_rfc3339(self._since)}: past audit_refused_per_s ({self.rate:g} a second, burst {self.burst}); "
            "batchgate_audit_log_dropped_total counts them",
        }


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
        files_omitted: int = 0,
        config_sha256: str | None = None,
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
        if config_sha256 is not None:  # the config a load was given, in place of the folder's
            obj["config_sha256"] = _cut(config_sha256, 64)
        if files is not None:
            names = sorted(files)
            obj["files"] = {_cut(n, MAX_PATH): _cut(files[n], 64) for n in names[:MAX_FILES]}
            omitted = files_omitted + max(0, len(names) - MAX_FILES)
            if omitted:
                obj["files_omitted"] = omitted
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


def hash_files(
    directory: str,
    max_files: int = MAX_FILES,
    max_bytes: int = 8 * GIB,
    max_listed: int = 100 * MAX_FILES,
    *,
    linked_folders: bool = False,
    hidden: bool = True,
) -> tuple[dict[str, str], int]:
    """SHA-256 (hex) of the regular files under ``directory``, keyed by their paths relative to
    it ('/'-separated), in sorted order: the first ``max_files`` of them, and how many more there
    are (not hashed). A symbolic link to a regular file is hashed as the file it names (the model
    was loaded through it: a mounted volume's files are links); special files are skipped, and
    links to folders too unless ``linked_folders`` (then followed, each folder once: a
    ConfigMap's ``1 -> ..data/1``). ``hidden`` False leaves out entries whose names start with a
    dot (the ConfigMap's own ``..data`` and timestamped folders). ``ValueError`` when the folder
    holds more than ``max_listed`` files (or as many folders), or the files hashed more than
    ``max_bytes`` bytes."""
    files: list[tuple[str, str, bool]] = []  # (relative, full, through a link)
    folders = unreadable = 0
    st = os.stat(directory)
    seen = {(st.st_dev, st.st_ino)}  # folders listed (linked ones may lead back)
    stack = [("", directory)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                if not hidden and entry.name.startswith("."):
                    continue
                name = f"{rel}{entry.name}"
                link = entry.is_symlink()
                if (not link and entry.is_dir(follow_symlinks=False)) or (link and linked_folders and _folder(entry)):
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    folders += 1
                    if folders > max_listed:
                        raise ValueError(f"{directory} holds more than {max_listed} folders")
                    stack.append((name + "/", entry.path))
                    continue
                try:
                    regular = entry.is_file(follow_symlinks=link)
                except OSError:  # a link in a loop, one we may not follow: counted, the rest still hashed
                    unreadable += 1
                    continue
                if regular:
                    files.append((name, entry.path, link))
                    if len(files) > max_listed:
                        raise ValueError(f"{directory} holds more than {max_listed} files")
    files.sort()
    if sum(os.stat(full).st_size for _, full, _ in files[:max_files]) > max_bytes:  # (before reading any)
        raise ValueError(f"{directory} holds more than {max_bytes} bytes in the files to hash")
    out: dict[str, str] = {}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = max_bytes
    for rel, full, link in files[:max_files]:
        out[rel], size = _hash_file(full, view, left, directory, link)
        left -= size
    return out, max(0, len(files) - max_files) + unreadable


def _folder(entry: os.DirEntry) -> bool:
    """Whether a link names a folder (False for a broken or looping one)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _hash_file(path: str, view: memoryview, left: int, directory: str, link: bool = False) -> tuple[str, int]:
    """SHA-256 of one regular file and the bytes it held. Opened without following a link unless
    ``link`` (it was listed as one), and never waiting on a FIFO: what is opened must be a regular
    file, else it is refused (a file swapped for something else since the folder was listed)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if link else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is no longer a regular file")
        h = hashlib.sha256()
        size = 0
        while n := f.readinto(view):
            size += n
            if size > left:
                raise ValueError(f"{directory} holds more than {left} bytes in the files hashed")
            h.update(view[:n])
    return h.hexdigest(), size
