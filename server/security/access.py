"""Who may call what: the check the data plane makes before any work, and the audit trail.

A :class:`Caller` is what a transport knows of the party calling: the ``authorization``
header (HTTP) or metadata entry (gRPC), the verified client certificate's subject (mTLS) and
the peer address. :class:`Access` decides from it, per scope (``infer``, ``read``, ``admin``):

- with ``api_keys_file``: the key must be valid (UNAUTHENTICATED), hold the scope and match
  the model (PERMISSION_DENIED) and be within its rate (RESOURCE_EXHAUSTED + Retry-After);
- without: everything is open except the admin scope, which is refused unless
  ``allow_open_admin`` says otherwise (a Triton-like set-up on a trusted network).

Health and /metrics stay open unless ``health_requires_key`` / ``metrics_requires_key``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, NoReturn

from ..core.errors import ConfigError, ErrorCode, GatewayError
from .audit import AuditLog, RefusedRecords
from .auth import ApiKey, KeyStore

log = logging.getLogger("batchgate.auth")

INFER, READ, ADMIN = "infer", "read", "admin"


class Caller(NamedTuple):
    authorization: str | None = None
    subject: str | None = None  # RFC 4514 subject of a verified client certificate
    peer: str = ""  # address, for the audit log


def credentials(pairs: Iterable[tuple[str | bytes, str | bytes]], name: str | bytes) -> str | None:
    """Every value of a credential header or metadata entry, as one field value: field lines
    given twice join with ", " (RFC 9110), which no key accepts, so a request carrying two
    tokens is refused rather than judged by whichever comes first."""
    values = [v if isinstance(v, str) else v.decode("latin-1") for k, v in pairs if k == name]
    return ", ".join(values) if values else None


OPEN_CALLER = Caller()


def open_server_notes(settings: Any) -> str:
    """What the start-up warning of a server without ``api_keys_file`` adds for the ``auth``
    settings that ask for keys: they cannot, so the endpoints they name stay open (an operator
    who closed /metrics and forgot the keys file was told only that metadata was open)."""
    notes = [
        f"{name} has no effect without it: {what} open to anyone"
        for name, what in (("health_requires_key", "health endpoints"), ("metrics_requires_key", "/metrics"))
        if getattr(settings, name)
    ]
    if settings.allow_open_admin:
        notes.append("allow_open_admin lets anyone load and unload models")
    return "".join("; " + n for n in notes)


class Access:
    __slots__ = ("keys", "allow_open_admin", "audit", "refused", "health_requires_key", "metrics_requires_key")

    def __init__(
        self,
        keys: KeyStore | None = None,
        *,
        allow_open_admin: bool = False,
        audit: AuditLog | None = None,
        health_requires_key: bool = False,
        metrics_requires_key: bool = False,
        audit_refused_per_s: float = 20.0,
    ):
        self.keys = keys
        self.allow_open_admin = allow_open_admin
        self.audit = audit
        self.refused = RefusedRecords(audit_refused_per_s)  # the bound on records of refused attempts
        self.health_requires_key = health_requires_key and keys is not None
        self.metrics_requires_key = metrics_requires_key and keys is not None

    @classmethod
    def of(cls, settings: Any, keys: KeyStore | None, audit: Any) -> Access:
        """The access rules of the ``auth`` settings section, with its keys and audit log."""
        return cls(
            keys,
            allow_open_admin=settings.allow_open_admin,
            audit=audit,
            health_requires_key=settings.health_requires_key,
            metrics_requires_key=settings.metrics_requires_key,
            audit_refused_per_s=settings.audit_refused_per_s,
        )

    @property
    def enforcing(self) -> bool:
        """Whether callers must present a key (transports read credentials only then)."""
        return self.keys is not None

    def check(self, caller: Caller, scope: str, model: str | None = None) -> ApiKey | None:
        """The key that allows ``caller`` this ``scope`` (on ``model``), None on an open server;
        raises UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED."""
        keys = self.keys
        if keys is None:
            if scope == ADMIN and not self.allow_open_admin:
                raise GatewayError(
                    ErrorCode.PERMISSION_DENIED,
                    "loading and unloading models, changing routes, drift and log settings are admin actions: "
                    "configure api_keys_file "
                    "and call with a key of scope 'admin', or set allow_open_admin: true on a trusted network",
                )
            return None
        key = keys.authenticate(caller.authorization, caller.subject)
        keys.authorize(key, scope, model)
        keys.charge(key)
        return key

    def check_stream(self, caller: Caller, scope: str = INFER) -> None:
        """Whether ``caller`` may open a stream (an inference stream; gRPC reflection, ``read``):
        with API keys, a valid key of that scope. Nothing is charged and no model judged: each
        request of an inference stream is checked as it comes (:meth:`check`). A stranger's stream
        is refused at its opening, not left open answering each request with an error: its place
        among the streams a server holds open (``grpc_max_streaming_calls``) is for callers with
        a key."""
        if self.keys is not None:
            self.keys.authorize(self.keys.authenticate(caller.authorization, caller.subject), scope)

    async def refuse_body(
        self, caller: Caller, scope: str, action: str, target: str, model: str | None, error: GatewayError
    ) -> NoReturn:
        """Answer an admin call whose body is malformed (``error``, found while reading it) as a
        well-formed one would be answered first: the caller is checked (no key: 401, a key without
        the scope or model: 403), then the body's error; audited either way."""
        key = None
        try:
            key = self.check(caller, scope, model)
            raise error
        except GatewayError as e:
            await self.audited(caller, key, action, target, e.code.value, e.message[:256])
            raise

    async def audited(
        self,
        caller: Caller,
        key: ApiKey | None,
        action: str,
        target: str,
        outcome: str,
        detail: str = "",
        files: dict[str, str] | None = None,
        files_omitted: int = 0,
        config_sha256: str | None = None,
    ) -> None:
        """One audit line (when ``audit_log_file`` is set); a refused attempt's only within
        ``audit_refused_per_s`` (:class:`RefusedRecords`), preceded by the summary of those left
        out. A failure to write is logged as an error: the action it records has already happened."""
        if self.audit is None or not self.refused.take(outcome, action):
            return
        if key is None and self.keys is not None:  # refused for its scope or model: still name the key
            with contextlib.suppress(GatewayError):
                key = self.keys.authenticate(caller.authorization, caller.subject)
        try:
            if (left_out := self.refused.summary()) is not None:
                await self.audit.arecord(**left_out)
            await self.audit.arecord(
                key_id=None if key is None else key.id,
                peer=caller.peer,
                action=action,
                target=target,
                outcome=outcome,
                detail=detail,
                files=files,
                files_omitted=files_omitted,
                config_sha256=config_sha256,
            )
        except OSError as e:
            log.error("could not write the audit log %s: %s", self.audit.path, e)

    async def watch(self, interval_s: float) -> None:
        if self.keys is not None:
            await self.keys.watch(interval_s)


def access_from_settings(a: Any, worker_audit: Callable[[str], Any] | None = None) -> Access:
    """API keys, the open-admin rule and the audit log, from the ``auth`` settings section ``a``
    (a bad keys file or an audit log that cannot be opened is a ConfigError: the server does not
    start). A worker process's audit lines go through ``worker_audit(path)`` to the supervisor
    (one writer of the file)."""
    keys = KeyStore(a.api_keys_file) if a.api_keys_file else None
    try:
        audit: Any = None
        if worker_audit is not None and a.audit_log_file:
            audit = worker_audit(a.audit_log_file)
        elif a.audit_log_file:
            audit = AuditLog(a.audit_log_file)
    except OSError as e:
        raise ConfigError(f"audit_log_file '{a.audit_log_file}' cannot be opened for appending: {e.strerror}") from None
    if keys is None:
        log.warning(
            "no api_keys_file: every caller may infer and read metadata without a key%s",
            open_server_notes(a),
        )
    else:
        log.info("API keys required: %d keys from %s", len(keys), a.api_keys_file)
    return Access.of(a, keys, audit)
