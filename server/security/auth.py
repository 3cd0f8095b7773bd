"""API keys: who is calling (:meth:`KeyStore.authenticate`), what they may do
(:meth:`KeyStore.authorize`) and how often (:meth:`KeyStore.charge`).

The keys live in a YAML file (setting ``api_keys_file``) that holds, for each key, the SHA-256
of its token, never the token::

    keys:
      - id: fraud-team
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        scopes: [infer, read]          # subset of infer, read, admin
        models: ["fraud-*"]            # fnmatch patterns (case-sensitive); default ["*"]
        rate_per_s: 100                # optional; absent = unlimited
        burst: 200                     # optional; default max(1, ceil(rate_per_s))
        cert_subjects: ["CN=fraud-client,O=Acme"]   # optional: mTLS subjects that act as this key

The file is re-read when it changes and has then stood still for a poll (:meth:`KeyStore.watch`):
a file caught half-written is not read; a file that no longer parses keeps the keys loaded before.
No gRPC, ASGI or network here: a transport passes the ``authorization`` header (or gRPC metadata)
and the verified client certificate's subject, and maps the :class:`GatewayError` raised.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, NamedTuple

import yaml

from ..core.errors import ConfigError, ErrorCode, GatewayError
from ..core.types import MODEL_NAME, MODEL_NAME_RULE, brief, clip, printable
from ..core.unique_yaml import UniqueKeys
from .subjects import normalize_subject

log = logging.getLogger("batchgate.auth")

SCOPES = ("infer", "read", "admin")
FIELDS = ("id", "sha256", "scopes", "models", "rate_per_s", "burst", "cert_subjects")
TOKEN_PREFIX = "bgk_"
MAX_KEYS = 10_000
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_TOKEN_CHARS = 4096
MAX_PATTERNS = 256  # models patterns of one key
MAX_PATTERN_CHARS = 256
MAX_SUBJECTS = 64  # cert_subjects of one key
MAX_SUBJECT_CHARS = 1024
MAX_RATE = 1e9
_PATTERN = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]+")  # the model name alphabet and fnmatch's * ? [ ] !
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_SEND = "send 'Authorization: Bearer <token>' (an HTTP header, or gRPC metadata 'authorization')"
_NO_DIGEST = bytes(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the keys file holds in ``sha256``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, prefixed ``bgk_`` so a leaked one is recognisable."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _match_all(name: str) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One entry of the keys file, checked."""

    id: str
    digest: bytes = field(repr=False)  # SHA-256 of the token, 32 bytes
    scopes: frozenset[str]
    models: tuple[str, ...] = ("*",)
    rate_per_s: float | None = None  # None = unlimited
    burst: int = 1
    cert_subjects: tuple[str, ...] = ()  # normalised RFC 4514 strings
    _match: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # All patterns as one compiled regex: one match per call, whatever their number.
        if "*" in self.models:
            matcher: Callable[[str], bool] = _match_all
        else:
            rx = re.compile("|".join(f"(?:{translate(p)})" for p in self.models) or "(?!)")
            matcher = lambda name: rx.match(name) is not None  # noqa: E731
        object.__setattr__(self, "_match", matcher)

    @property
    def every_model(self) -> bool:
        """Whether the key may use every model (pattern ``*``): what reaches all models needs it."""
        return "*" in self.models

    def allows_model(self, name: str) -> bool:
        """Whether ``name`` matches one of the key's patterns (fnmatchcase rules)."""
        return self._match(name)


# --- parsing -------------------------------------------------------------------------------------


def _quote(value: object) -> str:
    # a container bounded: str() writes out every copy a YAML alias makes (484 bytes -> 9^9 strings)
    return clip(brief(value), 80) if isinstance(value, (list, dict, set)) else printable(clip(str(value), 80))


def _hint(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _strings(value: object, fail: Callable[[str], ConfigError], example: str, limit: int) -> list[str]:
    if not isinstance(value, list):
        raise fail(f"must be a list, e.g. {example}, not {_quote(value)}")
    if len(value) > limit:
        raise fail(f"has {len(value)} items; at most {limit} are allowed")
    for v in value:
        if not isinstance(v, str):
            raise fail(f"must hold strings (quote them), not {_quote(v)}")
    return value


def parse_entry(entry: object, where: str) -> ApiKey:
    """One key from a keys-file entry (a mapping); ``where`` starts every error message
    (``keys file F: entry 3``). ``batchgate keys new`` checks its entry through here too."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping of {', '.join(FIELDS)} (e.g. '- id: NAME'), not {_quote(entry)}")
    ident = entry.get("id")
    if isinstance(ident, str) and MODEL_NAME.fullmatch(ident):
        where = f"{where} (id '{ident}')"

    def fail(name: str) -> Callable[[str], ConfigError]:
        return lambda text: ConfigError(f"{where}: field '{name}' {text}")

    for k in entry:
        name = str(k)
        if name in FIELDS:
            continue
        if name.lower() in ("token", "secret", "key", "api_key", "password"):
            raise ConfigError(
                f"{where}: field '{_quote(name)}' is refused: never store a token in the keys file; store only "
                "its SHA-256 in 'sha256' (`batchgate keys hash` prints it), and remove the token from the file"
            )
        raise ConfigError(f"{where}: unknown field '{_quote(name)}'{_hint(name, FIELDS)}; allowed: {', '.join(FIELDS)}")

    if "id" not in entry:
        raise fail("id")("is required: a name for the key (shown in logs, errors and the audit log)")
    if not isinstance(ident, str):
        raise fail("id")(f"must be a string (quote it), not {_quote(ident)}")
    if not MODEL_NAME.fullmatch(ident):
        raise fail("id")(f"'{_quote(ident)}' is not allowed: ids follow the model name rule ({MODEL_NAME_RULE})")

    digest_hex = entry.get("sha256")
    if digest_hex is None:
        raise fail("sha256")("is required: the SHA-256 of the token, 64 hex digits (`batchgate keys hash`)")
    if not isinstance(digest_hex, str) or not _HEX64.fullmatch(digest_hex):
        raise fail("sha256")("must be 64 hex digits (the SHA-256 of the token, as `batchgate keys hash` prints it)")
    digest = bytes.fromhex(digest_hex)

    if entry.get("scopes") is None:
        raise fail("scopes")(f"is required: a list of one or more of {', '.join(SCOPES)}")
    scopes = _strings(entry["scopes"], fail("scopes"), "[infer, read]", len(SCOPES) * 4)
    if not scopes:
        raise fail("scopes")(f"must name at least one of {', '.join(SCOPES)}")
    for s in scopes:
        if s not in SCOPES:
            raise fail("scopes")(f"has unknown scope '{_quote(s)}'{_hint(s, SCOPES)}; allowed: {', '.join(SCOPES)}")

    for name in ("models", "rate_per_s", "burst", "cert_subjects"):
        if name in entry and entry[name] is None:
            # An empty field is a mistake or a file caught half-written: never read it as
            # the default, which for models and rate_per_s is the widest a key can be.
            raise fail(name)("is empty; give a value, or leave the field out for its default")

    models: Sequence[str] = ("*",)
    if entry.get("models") is not None:
        models = _strings(entry["models"], fail("models"), '["fraud-*"]', MAX_PATTERNS)
        if not models:
            raise fail("models")('is empty: list the patterns the key may use (e.g. ["fraud-*"], or ["*"] for all)')
        for p in models:
            if len(p) > MAX_PATTERN_CHARS or not _PATTERN.fullmatch(p):
                raise fail("models")(
                    f"has pattern '{_quote(p)}': patterns are 1 to {MAX_PATTERN_CHARS} of the model name characters "
                    "[A-Za-z0-9_.-] and the wildcards * ? [ ] ! (one pattern per list item)"
                )

    rate: float | None = None
    if entry.get("rate_per_s") is not None:
        r = entry["rate_per_s"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= MAX_RATE:
            raise fail("rate_per_s")(
                f"must be a number of requests per second above 0 and at most {MAX_RATE:.0e}, not {_quote(r)} "
                "(leave it out for no limit; remove the key to block it)"
            )
        rate = float(r)

    burst = max(1, math.ceil(rate)) if rate is not None else 1
    if entry.get("burst") is not None:
        b = entry["burst"]
        if rate is None:
            raise fail("burst")("needs rate_per_s: a burst is the bucket size of a rate limit")
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_RATE:
            raise fail("burst")(f"must be a whole number of requests from 1 to {MAX_RATE:.0e}, not {_quote(b)}")
        burst = b

    subjects: list[str] = []
    if entry.get("cert_subjects") is not None:
        given = _strings(entry["cert_subjects"], fail("cert_subjects"), '["CN=client,O=Acme"]', MAX_SUBJECTS)
        for s in given:
            norm = normalize_subject(s)
            if not norm or len(s) > MAX_SUBJECT_CHARS or printable(s) != s or "=" not in norm:
                raise fail("cert_subjects")(
                    f"has '{_quote(s)}': a subject is an RFC 4514 string such as 'CN=client,O=Acme' "
                    f"(at most {MAX_SUBJECT_CHARS} characters, no control characters)"
                )
            if norm in subjects:
                raise fail("cert_subjects")(f"lists '{_quote(s)}' twice")
            subjects.append(norm)

    return ApiKey(ident, digest, frozenset(scopes), tuple(models), rate, burst, tuple(subjects))


def parse_keys(data: object, source: str) -> tuple[ApiKey, ...]:
    """Every key of a parsed keys file (``source`` names it in errors), checked one by one
    and against each other: ids, hashes and certificate subjects are each unique."""
    if data is None:
        raise ConfigError(
            f"{source} is empty; it must hold 'keys:' and a list of keys ('keys: []' refuses every caller)"
        )
    if isinstance(data, list):
        raise ConfigError(
            f"{source} holds a bare list; put 'keys:' above it (the file is a mapping with one entry 'keys')"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with one entry 'keys', not {_quote(data)}")
    for k in data:
        if k != "keys":
            raise ConfigError(f"{source}: unknown entry '{_quote(k)}'{_hint(str(k), ['keys'])}; the only one is 'keys'")
    entries = data.get("keys")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'keys' must be a list of keys (write 'keys: []' for none), not {_quote(entries)}")
    if len(entries) > MAX_KEYS:
        raise ConfigError(f"{source} has {len(entries)} keys; at most {MAX_KEYS} are allowed")
    keys: list[ApiKey] = []
    ids: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    subjects: dict[str, int] = {}
    for i, entry in enumerate(entries):
        key = parse_entry(entry, f"{source}: entry {i}")
        where = f"{source}: entry {i} (id '{key.id}')"
        if key.id in ids:
            raise ConfigError(f"{where}: field 'id': entry {ids[key.id]} has the same id; ids must be unique")
        if key.digest in digests:
            j = digests[key.digest]
            raise ConfigError(
                f"{where}: field 'sha256': the same hash as entry {j} (id '{keys[j].id}'); each key needs its own "
                "token (`batchgate keys new`)"
            )
        for s in key.cert_subjects:
            if s in subjects:
                j = subjects[s]
                raise ConfigError(
                    f"{where}: field 'cert_subjects': '{_quote(s)}' is already given to entry {j} (id '{keys[j].id}'); "
                    "a certificate subject acts as one key only"
                )
            subjects[s] = i
        ids[key.id] = digests[key.digest] = i
        keys.append(key)
    return tuple(keys)


class Signature(NamedTuple):
    """What :func:`os.stat` says of a file; a change in any of these is a change of the file."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int  # a rewrite in place that keeps size and mtime (cp -p, touch -r) still moves it


def _signature(st: os.stat_result) -> Signature:
    return Signature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_keys_file(path: str) -> tuple[tuple[ApiKey, ...], Signature]:
    """The keys of ``path`` and the signature of the file they were read from (taken from
    the open file, so a change made while it was read shows at the next check)."""
    source = f"keys file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot read {source}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{source} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{source} is {st.st_size} bytes; at most {MAX_FILE_BYTES} (4 MiB) are allowed")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise ConfigError(f"{source} is over {MAX_FILE_BYTES} bytes (4 MiB); at most that is allowed")
            chunks.append(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read {source}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source} is not UTF-8 text (byte {e.start} is not)") from None
    try:
        # (a key given twice took its last value: a second scopes line widened a key unseen)
        data: Any = yaml.load(text, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(e)}") from None
    except (ValueError, RecursionError, OverflowError) as e:  # PyYAML on odd input (deep nesting, huge escapes)
        raise ConfigError(f"{source} is not valid YAML: {type(e).__name__}: {clip(printable(str(e)), 200)}") from None
    return parse_keys(data, source), _signature(st)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, not the lines it quotes (a token wrongly in the file)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{clip(printable(str(problem)), 200)}{where}"


# --- the store -----------------------------------------------------------------------------------


class _Bucket:
    """A token bucket: ``tokens`` of ``burst`` left at ``stamp``, refilled at ``rate`` per second."""

    __slots__ = ("tokens", "stamp", "rate", "burst")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), now


class _Table(NamedTuple):
    """The keys of one read of the file, indexed; replaced whole on a reload."""

    keys: tuple[ApiKey, ...]
    by_digest: dict[bytes, ApiKey]
    by_subject: dict[str, ApiKey]


def _index(keys: tuple[ApiKey, ...]) -> _Table:
    return _Table(keys, {k.digest: k for k in keys}, {s: k for k in keys for s in k.cert_subjects})


class KeyStore:
    """The keys of ``api_keys_file``, reloaded when it changes, and a rate bucket per key id.

    Built and used on one thread (the event loop): :meth:`poll` and :meth:`reload_settled` read
    the file on a worker thread but swap the keys in on the loop."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._clock = clock
        keys, self._signature = read_keys_file(path)  # ConfigError: the server does not start
        self._signature_seen: Signature | None = self._signature  # the last one applied or found wrong
        self._signature_polled: Signature | None = self._signature  # what the last poll saw
        self._table = _index(keys)
        self._buckets: dict[str, _Bucket] = {}
        self._apply(keys)
        # told the ids of keys a reload removed: what they held (shared memory) goes with them
        self.on_removed: Callable[[list[str]], None] | None = None
        self.reload_failures = 0  # changes of the file that could not be used (a metric)

    # -- what is loaded

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return self._table.keys

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.id for k in self._table.keys)

    def __len__(self) -> int:
        return len(self._table.keys)

    # -- the request path

    def authenticate(self, authorization: str | None, cert_subject: str | None = None) -> ApiKey:
        """The key a caller presents: the bearer token of its ``authorization`` header, else
        (no header) the verified client certificate's subject. UNAUTHENTICATED otherwise;
        no message quotes the header, which may hold a token."""
        table = self._table
        if authorization is None:
            if cert_subject is not None and len(cert_subject) <= MAX_SUBJECT_CHARS:
                key = table.by_subject.get(normalize_subject(cert_subject))
                if key is not None:
                    return key
                raise GatewayError(
                    ErrorCode.UNAUTHENTICATED,
                    f"the client certificate '{printable(clip(cert_subject))}' is not given to any API key; {_SEND}",
                )
            raise GatewayError(ErrorCode.UNAUTHENTICATED, f"this server needs an API key: {_SEND}")
        if len(authorization) > MAX_TOKEN_CHARS + 64:
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                f"the authorization header is {len(authorization)} characters; a token has at most {MAX_TOKEN_CHARS}",
            )
        if "," in authorization:  # tokens hold none: two header lines joined, or a list of credentials
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED,
                f"the request carries more than one authorization header or credential; {_SEND} once",
            )
        scheme, _, token = authorization.strip(" \t").partition(" ")
        token = token.lstrip(" ")
        if scheme.lower() != "bearer" or not token or " " in token:
            raise GatewayError(ErrorCode.UNAUTHENTICATED, f"the authorization header is not a bearer token: {_SEND}")
        if len(token) > MAX_TOKEN_CHARS:
            raise GatewayError(
                ErrorCode.UNAUTHENTICATED, f"the bearer token is {len(token)} characters; at most {MAX_TOKEN_CHARS}"
            )
        if not token.isascii():
            raise GatewayError(ErrorCode.UNAUTHENTICATED, "the bearer token must be ASCII text")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        # The dict lookup is keyed by the SHA-256 of what the caller sent: its timing can only
        # tell a caller about digests of its own guesses, and turning a stored digest back into
        # a token needs a preimage of SHA-256 over a 256-bit random secret. The final equality
        # is still decided in constant time.
        key = table.by_digest.get(digest)
        if hmac.compare_digest(key.digest if key is not None else _NO_DIGEST, digest) and key is not None:
            return key
        raise GatewayError(
            ErrorCode.UNAUTHENTICATED, f"the API key is not valid (unknown or revoked): {_SEND} with a current token"
        )

    def authorize(self, key: ApiKey, scope: str, model: str | None = None) -> None:
        """PERMISSION_DENIED unless ``key`` has ``scope`` and, when a model is named, a
        pattern matching it."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; scopes are {', '.join(SCOPES)}")
        if scope not in key.scopes:
            raise GatewayError(
                ErrorCode.PERMISSION_DENIED,
                f"API key '{key.id}' does not have scope '{scope}' (it has {', '.join(sorted(key.scopes))}); "
                f"use a key with scope '{scope}'",
            )
        if model is not None and not key.allows_model(model):
            raise GatewayError(
                ErrorCode.PERMISSION_DENIED,
                f"API key '{key.id}' may not use model '{printable(clip(model))}' "
                f"(its models: {clip(', '.join(key.models), 200)})",
            )

    def charge(self, key: ApiKey) -> None:
        """Take one request from the key's rate bucket; RESOURCE_EXHAUSTED with the seconds
        until the next one is due when it is empty. A key without a rate (or one revoked
        since it was authenticated) is not limited."""
        b = self._buckets.get(key.id)
        if b is None:
            return
        now = self._clock()
        tokens = b.tokens + (now - b.stamp) * b.rate
        if tokens > b.burst:
            tokens = b.burst
        b.stamp = now
        if tokens >= 1.0:
            b.tokens = tokens - 1.0
            return
        b.tokens = tokens
        raise GatewayError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"API key '{key.id}' is over its rate of {b.rate:g} requests/s (burst {b.burst}); retry later",
            retry_after_s=min((1.0 - tokens) / b.rate, 86400.0),  # (at most a day: a rate near 0, infinite)
        )

    # -- reloading

    def _stat(self) -> Signature | None:
        try:
            return _signature(os.stat(self.path))
        except OSError:
            return None

    def _apply(self, keys: tuple[ApiKey, ...]) -> None:
        """Swap in a new set of keys; a bucket lives on for an id that still has a rate."""
        now = self._clock()
        buckets: dict[str, _Bucket] = {}
        for k in keys:
            if k.rate_per_s is None:
                continue
            b = self._buckets.get(k.id)
            if b is None:
                b = _Bucket(k.rate_per_s, k.burst, now)
            else:
                b.rate, b.burst = k.rate_per_s, k.burst
                b.tokens = min(b.tokens, float(k.burst))
            buckets[k.id] = b
        self._table = _index(keys)
        self._buckets = buckets

    def _settled(self, signature: Signature | None) -> bool:
        """Whether the file changed and then stood still for one poll: a change is read only
        when two polls in a row see the same signature. A file written in place is caught
        half-written by a poll between two writes; read then, an entry cut after its ``scopes``
        would parse, its models and rate left at their widest defaults, and the keys after it
        would be revoked. A revocation so takes effect within two polls."""
        if signature != self._signature_polled:  # (still) being written: wait for it to stand still
            self._signature_polled = signature
            return False
        return signature != self._signature_seen

    def _load(self) -> tuple[tuple[ApiKey, ...], Signature] | None:
        """The file's keys, or None (logged) when it cannot be read or is wrong."""
        try:
            return read_keys_file(self.path)
        except ConfigError as e:
            log.error("%s; keeping the %d keys loaded before", e, len(self._table.keys))
            self.reload_failures += 1
            return None

    def _finish(self, signature: Signature | None, loaded: tuple[tuple[ApiKey, ...], Signature] | None) -> bool:
        if loaded is None:
            self._signature_seen = signature  # logged once per change of the file
            return False
        keys, self._signature = loaded
        self._signature_seen = self._signature
        before = set(self.key_ids)
        self._apply(keys)
        after = set(self.key_ids)
        added, removed = sorted(after - before), sorted(before - after)
        if removed and self.on_removed is not None:
            self.on_removed(removed)
        log.info(
            "API keys reloaded from %s: %d keys%s%s",
            self.path,
            len(keys),
            f"; added {clip(', '.join(added), 200)}" if added else "",
            f"; removed {clip(', '.join(removed), 200)}" if removed else "",
        )
        return True

    def reload_if_changed(self) -> bool:
        """A poll: re-read the file if its stat signature changed and the last poll saw the same
        (see :meth:`_settled`). True when new keys were loaded; False when nothing changed, the
        change has not stood still for a poll yet, or the new file is wrong (the old keys stay,
        an ERROR is logged). A key removed from the file is refused from then on."""
        signature = self._stat()
        if not self._settled(signature):
            return False
        loaded = self._load()  # (read again meanwhile, it has not settled: judged at the next poll)
        return (loaded is None or loaded[1] == signature) and self._finish(signature, loaded)

    async def poll(self) -> bool:
        """:meth:`reload_if_changed` from the event loop: the file looked at and read on a thread,
        the keys swapped in and :attr:`on_removed` told on the loop, which uses what they drop."""
        signature = await asyncio.to_thread(self._stat)
        if not self._settled(signature):
            return False
        loaded = await asyncio.to_thread(self._load)
        return (loaded is None or loaded[1] == signature) and self._finish(signature, loaded)

    async def reload_settled(self, signature: Sequence[int]) -> bool:
        """Load the file that another process's poll just found settled with ``signature`` (a
        worker told by the supervisor): only if what is read still has it, else it is being
        written again, and the supervisor's next polls will say when it settles. Read on a
        worker thread, swapped in on the loop, as :meth:`poll` does."""
        expected = Signature(*signature)
        if expected == self._signature_seen:
            return False
        loaded = await asyncio.to_thread(self._load)
        return loaded is not None and loaded[1] == expected and self._finish(expected, loaded)

    @property
    def signature(self) -> Signature:
        """The signature of the file the keys loaded now were read from."""
        return self._signature

    async def watch(self, interval_s: float) -> None:
        """:meth:`poll` every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception:  # never let the watcher die: revocation depends on it
                log.exception("checking the API keys file %s failed", self.path)
