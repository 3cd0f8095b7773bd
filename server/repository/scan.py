"""Reading a Triton-layout model repository from disk: model directories, version
directories, and the fingerprint a poll compares."""

from __future__ import annotations

import os

from ..core.errors import ErrorCode, GatewayError


def model_names(root: str) -> list[str]:
    """The model directories of ``root`` (hidden ones skipped), sorted."""
    try:
        return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    except OSError as e:
        raise GatewayError(ErrorCode.UNAVAILABLE, f"cannot read the model repository: {e.strerror}") from None


def list_versions(model_dir: str) -> list[int]:
    """The numeric version directories of a model (no leading zeros), sorted."""
    out: list[int] = []
    try:
        names = os.listdir(model_dir)
    except OSError:
        return out
    for n in names:
        if n.isdigit() and not n.startswith("0") and os.path.isdir(os.path.join(model_dir, n)):
            out.append(int(n))
    return sorted(out)


def fingerprint(model_dir: str) -> tuple:
    """What a poll compares: every file's path, size and modification time."""
    items = []
    for root, _dirs, files in os.walk(model_dir):
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            items.append((os.path.relpath(p, model_dir), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))
