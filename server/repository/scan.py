"""Reading a Triton-layout model repository from disk: model directories, version
directories, and the fingerprint a poll compares."""

from __future__ import annotations

import logging
import os
import re

from ..core.errors import ErrorCode, GatewayError, invalid
from ..core.types import MODEL_NAME, MODEL_NAME_RULE, clip, is_version_text, printable

log = logging.getLogger("batchgate.repository")
MAX_FILE_DEPTH = 8  # directories in the path of a file given with a load
_warned: set[str] = set()  # invalid directory names already reported


def model_names(root: str) -> list[str]:
    """The model directories of ``root``, sorted; hidden ones are skipped, and so, with a
    warning, are names no model may have (they would become labels and log text)."""
    try:
        entries = os.listdir(root)
    except OSError as e:
        raise GatewayError(ErrorCode.UNAVAILABLE, f"cannot read the model repository: {e.strerror}") from None
    names = []
    for n in sorted(entries):
        if n.startswith(".") or not os.path.isdir(os.path.join(root, n)):
            continue
        if MODEL_NAME.fullmatch(n) is None:
            if n not in _warned and len(_warned) < 1024:  # said once per name, not on every scan
                _warned.add(n)
                log.warning(
                    "skipping directory '%s' of the model repository: not a valid model name (%s)",
                    printable(clip(n)),
                    MODEL_NAME_RULE,
                )
            continue
        names.append(n)
    return names


def staged_path(model: str, key: str) -> str:
    """The relative path of a file given with a load (``file:<path>``), checked: plain names
    separated by ``/``, inside the model directory, nothing else."""
    parts = key.split("/")
    bad = not key or len(parts) > MAX_FILE_DEPTH or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts)
    if bad:
        raise invalid(
            f"model '{model}': file path '{printable(clip(key))}' is not allowed: give a relative path of plain "
            f"names inside the model directory, e.g. '1/model.onnx' (at most {MAX_FILE_DEPTH} levels)"
        )
    return os.path.join(*parts)


MAX_NAME_BYTES = 255  # one path component, as file systems allow


def staged_paths(model: str, files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The checked relative paths of every file given with a load; a path that is another's
    directory (``1`` beside ``1/model.onnx``) or a component too long for a file system is
    refused before anything is written."""
    staged = [(staged_path(model, key), data) for key, data in files.items()]
    paths = {rel for rel, _ in staged}
    for rel, _ in staged:
        parts = rel.split(os.sep)
        if any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
            raise invalid(
                f"model '{model}': a name in file path '{printable(clip(rel))}' is over {MAX_NAME_BYTES} bytes"
            )
        for k in range(1, len(parts)):
            if os.path.join(*parts[:k]) in paths:
                raise invalid(
                    f"model '{model}': file path '{printable(clip(rel))}' needs a directory where another file is given"
                )
    return staged


def write_files(directory: str, files: list[tuple[str, bytes]]) -> None:
    """Write checked relative paths (``staged_path``) under ``directory`` (blocking)."""
    for rel, data in files:
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


_ABSOLUTE_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s"'`(=:,\[]))/[^\s"'`),\]]+""")


def hide_paths(message: str, *directories: str) -> str:
    """``message`` with the server's directories taken out (errors from engines and the OS
    name absolute paths; a caller is told paths relative to the model directory)."""
    for d in sorted((d for d in directories if d), key=len, reverse=True):
        message = message.replace(d.rstrip("/") + "/", "").replace(d, "<model directory>")
    # Any other absolute path (ONNX Runtime names where an external-data location resolves to,
    # "../../x.bin" included): where the server keeps its files is not the caller's to learn.
    return _ABSOLUTE_PATH.sub("<server path>", message)


def list_versions(model_dir: str) -> list[int]:
    """The numeric version directories of a model (no leading zeros), sorted."""
    out: list[int] = []
    try:
        names = os.listdir(model_dir)
    except OSError:
        return out
    for n in names:
        # (a longer number would be served as a version no request can name, past int64)
        if is_version_text(n) and not n.startswith("0") and os.path.isdir(os.path.join(model_dir, n)):
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
