"""Logging set-up: plain lines or one JSON object per line, request id included.

A log line may quote what a client sent (a model name, an id): in plain lines every control
character of the message and the request id is written escaped (``\n`` as ``\x0a``), so a
client can never start a line of its own. JSON lines are escaped by the encoder, and what it leaves
raw that still breaks a line for some readers (C1 controls, U+2028 / U+2029) or reorders it
(bidirectional controls) is written as ``\\uXXXX`` escapes as well (:func:`one_line`)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
from typing import IO

import orjson

from .core.types import printable as escape

# Characters JSON leaves raw that split a line for some readers (str.splitlines and log shippers
# break at C1 controls such as U+0085, and at U+2028 / U+2029) or make it read otherwise than it is
# written (bidirectional controls): written as JSON escapes, which read back as the same text.
_UNSAFE = re.compile("[\x80-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """JSON text (an encoder's output) with what :data:`_UNSAFE` matches written as ``\\uXXXX``
    escapes: one line to any reader, the same text to a JSON reader."""
    if text.isascii():  # (nearly every line: nothing to look at)
        return text
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_worker: str | None = None  # which worker process this is, when it is one of several


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            obj["worker"] = self.worker
        rid = getattr(record, "request_id", None)
        if rid is not None:
            obj["request_id"] = rid
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        # (a message or request id may quote a client: a model name, an id with U+2028 in it)
        return one_line(orjson.dumps(obj).decode())


class PlainFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None):
        where = "" if worker is None else f" [{worker}]"
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)  # a traceback, if any, keeps its own lines after the message
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={escape(str(rid))}]" if rid is not None else line


def worker_name() -> str | None:
    """This process's name when it is one of several workers ("worker 0", "model owner")."""
    return _worker


def _ours_or_warning(record: logging.LogRecord) -> bool:
    """Other libraries' lines below WARNING are dropped at any level: their debug lines are not
    written for a shared log (hpack's show every request header, bearer tokens included)."""
    return record.levelno >= logging.WARNING or record.name == "batchgate" or record.name.startswith("batchgate.")


def setup(fmt: str = "plain", level: str = "info", worker: str | None = None) -> None:
    """Log lines to stderr; a worker process's name it (``worker``: "worker 0", "model owner")."""
    global _worker
    _worker = worker
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ours_or_warning)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else PlainFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------- Triton's logging extension
# The settings a client may read and change at run time (GET/POST /v2/logging, gRPC LogSettings).
# Python's logging has one threshold, not a switch per level: the lowest level turned on sets it,
# and the levels above it are on too (the answer shows what is in effect). A client never picks
# a file to write: log_file is refused unless empty.
LOG_KEYS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
_LEVELS = (("log_info", logging.INFO), ("log_warning", logging.WARNING), ("log_error", logging.ERROR))
# What a client last set, read back as it was given (Triton answers its own words: "default",
# "ISO8601", a verbose level of 3), as long as the level and format in effect are still those.
_given: dict[str, tuple] = {}


def log_settings() -> dict[str, object]:
    """The logging settings in effect, in Triton's terms."""
    root = logging.getLogger()
    level = root.getEffectiveLevel()
    handler = root.handlers[0] if root.handlers else None
    formatter = handler.formatter if handler is not None else None
    fmt = "json" if isinstance(formatter, JsonFormatter) else "plain"
    verbose = 1 if level <= logging.DEBUG else 0
    said_verbose, at_level = _given.get("verbose", (None, None))
    said_fmt, with_formatter = _given.get("format", (None, None))
    return {
        "log_file": "",
        "log_info": level <= logging.INFO,
        "log_warning": level <= logging.WARNING,
        "log_error": level <= logging.ERROR,
        "log_verbose_level": said_verbose if verbose and at_level == level else verbose,
        "log_format": said_fmt if formatter is not None and with_formatter is formatter else fmt,
    }


def change_log_settings(changes: dict[str, object]) -> dict[str, object]:
    """Apply ``changes`` (a subset of LOG_KEYS) and return the settings in effect; ValueError
    names what is wrong (nothing is changed then)."""
    unknown = sorted(set(changes) - set(LOG_KEYS))
    if unknown:
        raise ValueError(f"unknown log setting(s) {', '.join(unknown)[:256]}; known: {', '.join(LOG_KEYS)}")
    if "log_file" in changes and type(changes["log_file"]) is not str:  # (gRPC: a SettingValue with no field)
        raise ValueError('log_file must be text, "" (the server logs to its standard error)')
    if changes.get("log_file"):
        raise ValueError("log_file cannot be set by a client: the server logs to its standard error")
    now = log_settings()
    base = dict(now)
    # While a verbose level holds the threshold at debug, the three switches read as on; what they
    # were set to before stays the base, so a verbose level back to 0 gives back that threshold.
    switches, at_level = _given.get("switches", (None, None))
    if switches is not None and now["log_verbose_level"] and at_level == logging.getLogger().getEffectiveLevel():
        base.update(switches)
    merged = {**base, **changes}
    for key in ("log_info", "log_warning", "log_error"):
        if type(merged[key]) is not bool:
            raise ValueError(f"{key} must be true or false")
    verbose = merged["log_verbose_level"]
    if type(verbose) is not int or not 0 <= verbose < 2**32:
        raise ValueError("log_verbose_level must be a whole number >= 0")
    fmt = merged["log_format"]
    formats = {"plain": "plain", "default": "plain", "ISO8601": "plain", "json": "json"}
    if fmt not in formats:
        raise ValueError("log_format must be one of plain, json (or Triton's default, ISO8601: plain lines)")
    if verbose > 0:
        level = logging.DEBUG
    else:
        level = next((lv for key, lv in _LEVELS if merged[key]), logging.CRITICAL)
    root = logging.getLogger()
    root.setLevel(level)
    if "log_format" in changes and root.handlers:
        root.handlers[0].setFormatter(
            JsonFormatter(_worker) if formats[str(fmt)] == "json" else PlainFormatter(_worker)
        )
    if "log_verbose_level" in changes:
        _given["verbose"] = (verbose, level)
    _given["switches"] = ({key: merged[key] for key, _ in _LEVELS}, level)
    if "log_format" in changes and root.handlers:
        _given["format"] = (fmt, root.handlers[0].formatter)
    return log_settings()


def open_private(path: str, binary: bool = False, encoding: str | None = "utf-8", errors: str | None = None) -> IO:
    """``path`` opened for appending, created readable by its owner only (0600, as the audit log):
    the access and disagreement logs hold peer addresses, request ids and, sampled, the data
    clients sent. A file that exists keeps the mode its operator gave it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if binary:
            return open(fd, "ab")  # noqa: SIM115
        return open(fd, "a", encoding=encoding, errors=errors)  # noqa: SIM115
    except BaseException:
        os.close(fd)
        raise


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """logging's rotating file handler, its files created 0600 (:func:`open_private`); its
    ``encoding`` as the caller gives it (logging makes an unnamed one the locale's)."""

    def _open(self):
        return open_private(self.baseFilename, encoding=self.encoding, errors=self.errors)
