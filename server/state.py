"""Small JSON documents kept across restarts in ``state_dir``: a route's runtime weights and
bucket table, a rollout's step (and, later, a drift detector's reference).

Each document is one file, ``<kind>-<name>.json``, written atomically: to a temporary file in
the same directory, flushed to disk, renamed over the old one, and the directory flushed, so a
crash leaves either the old document or the new one, never a torn one. Names come from the
configuration (route names), are checked against the model-name alphabet and never become a
path outside the directory. A document over :data:`MAX_BYTES`, or one that is not a JSON
object, is refused on reading (ValueError), and the caller falls back to its configuration.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .core.types import MODEL_NAME

KINDS = frozenset({"route", "rollout"})
MAX_BYTES = 4 * 1024 * 1024


def read_capped(path: str, limit: int, what: str) -> bytes:
    """A configuration file's bytes, refused (ConfigError, naming ``what``) when it cannot be
    read or is larger than ``limit``."""
    from .core.errors import ConfigError

    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(raw) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit // (1024 * 1024)} MiB")
    return raw


class StateDir:
    def __init__(self, path: str):
        """OSError when the directory cannot be made or written: found at start, not at the
        first change that would be lost."""
        self.path = Path(path)
        self.failures = 0  # writes (and removals) that failed: batchgate_state_write_failures
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=self.path)
        os.close(fd)
        os.unlink(probe)

    def _file(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown kind of state '{kind}'")
        if MODEL_NAME.fullmatch(name) is None:
            raise ValueError(f"'{name[:128]!r}' cannot name a state file")
        return self.path / f"{kind}-{name}.json"

    def load(self, kind: str, name: str) -> dict[str, Any] | None:
        """The document, or None if there is none; ValueError if it cannot be one."""
        path = self._file(kind, name)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_BYTES:
            raise ValueError(f"{path.name} is larger than {MAX_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:  # (nested past the parser's depth: RecursionError)
            raise ValueError(f"{path.name} is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path.name} does not hold a JSON object")
        return doc

    def save(self, kind: str, name: str, doc: dict[str, Any]) -> None:
        """Write the document in place of the one kept (atomically); OSError or ValueError,
        counted, when it cannot be."""
        try:
            self._save(kind, name, doc)
        except (OSError, ValueError):
            self.failures += 1
            raise

    def _save(self, kind: str, name: str, doc: dict[str, Any]) -> None:
        path = self._file(kind, name)
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > MAX_BYTES:
            raise ValueError(f"{path.name} would be larger than {MAX_BYTES} bytes")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, kind: str, name: str) -> None:
        try:
            self._file(kind, name).unlink(missing_ok=True)
        except OSError:
            self.failures += 1
            raise
