"""The parts of the data plane that answer Triton's extensions beside inference: system shared
memory (register, unregister, status, and the view a request reads through), the logging and
trace settings, and CUDA shared memory (refused); with the supervisor's side of them for worker
processes (:class:`Coordinator`). :class:`~batchgate.dataplane.DataPlane` inherits them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn, Protocol

from . import logs
from .core.errors import ErrorCode, GatewayError, invalid, not_found
from .core.types import printable
from .monitoring.tracing import SETTING_KEYS as TRACE_KEYS
from .monitoring.tracing import Policy, Tracing, parse_changes
from .security.access import ADMIN, INFER, OPEN_CALLER, READ, Access, Caller
from .shm import RegionView, SharedMemory


class Extensions:
    """Shared memory, logging and trace settings, for :class:`DataPlane` (which sets these)."""

    access: Access
    shm: SharedMemory
    coordinator: Coordinator | None
    tracing: Tracing | None

    def knows(self, name: str, version: str = "") -> bool:  # (the DataPlane's own)
        raise NotImplementedError

    async def _shm_caller(self, caller: Caller, action: str, target: str) -> str | None:
        """The owner of the caller's regions (its API key's id; None without keys). With API keys,
        registering or unregistering shared memory needs scope infer or admin; a refusal is
        counted and audited."""
        keys = self.access.keys
        if keys is None:
            return None
        try:
            key = keys.authenticate(caller.authorization, caller.subject)
            if not key.scopes & {INFER, ADMIN}:
                raise GatewayError(
                    ErrorCode.PERMISSION_DENIED,
                    f"API key '{key.id}' may not register shared memory: it needs scope 'infer' or 'admin'",
                )
            keys.charge(key)
        except GatewayError as e:
            self.shm.count(action.removeprefix("shm."), e.code.value)
            await self.access.audited(caller, None, action, target[:128], e.code.value, e.message[:256])
            raise
        return key.id

    async def malformed_admin_body(
        self, caller: Caller, action: str, target: str, model: str | None, error: GatewayError
    ) -> NoReturn:
        """An admin call (``action``: repository.load, logging.update, shm.register...) whose HTTP
        body is malformed: the caller is judged before the body, as on gRPC, where the message is
        parsed before any of this, and the attempt is audited (see :meth:`Access.refuse_body`)."""
        if action.startswith("shm."):  # (scope infer or admin: its own check, refusals audited there)
            await self._shm_caller(caller, action, target)
            await self.access.audited(caller, None, action, target, error.code.value, error.message[:256])
            raise error
        await self.access.refuse_body(caller, ADMIN, action, target, model, error)

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int, caller: Caller) -> None:
        owner = await self._shm_caller(caller, "shm.register", name)
        try:
            if self.coordinator is not None:
                await self.coordinator.shm_register(name, key, offset, byte_size, owner)
                self.shm.count("register", "OK")
            else:
                self.shm.register(name, key, offset, byte_size, owner)
        except GatewayError as e:
            if self.coordinator is not None:
                self.shm.count("register", e.code.value)
            await self.access.audited(caller, None, "shm.register", name[:128], e.code.value, e.message[:256])
            raise
        await self.access.audited(caller, None, "shm.register", name, "ok", f"key={key} byte_size={byte_size}")

    async def shm_unregister(self, name: str, caller: Caller) -> None:
        """``name`` "" unregisters every region."""
        owner = await self._shm_caller(caller, "shm.unregister", name or "*")
        try:
            if self.coordinator is not None:
                await self.coordinator.shm_unregister(name, owner)
                self.shm.count("unregister", "OK")
            else:
                self.shm.unregister(name, owner)
        except GatewayError as e:
            if self.coordinator is not None:
                self.shm.count("unregister", e.code.value)
            await self.access.audited(caller, None, "shm.unregister", name[:128], e.code.value, e.message[:256])
            raise
        await self.access.audited(caller, None, "shm.unregister", name or "*", "ok")

    def shm_status(self, name: str, caller: Caller = OPEN_CALLER) -> list[dict[str, Any]]:
        """The caller's own regions (with API keys, those its key registered)."""
        key = self.access.check(caller, READ)
        return self.shm.status(name, None if key is None else key.id)

    def shm_view(self, caller: Caller) -> RegionView:
        """The regions a request of ``caller`` may read and write (its key's, with API keys). The
        request was admitted already: the key is known good and was charged."""
        keys = self.access.keys
        if keys is None:
            return self.shm.view(None)
        return self.shm.view(keys.authenticate(caller.authorization, caller.subject).id)

    async def log_settings(self, changes: Mapping[str, Any] | None, caller: Caller = OPEN_CALLER) -> dict[str, Any]:
        """Triton's logging extension: the settings in effect, after ``changes`` (admin scope,
        audited, a refusal too)."""
        if not changes:
            self.access.check(caller, READ)
            return logs.log_settings()
        key = None
        try:
            key = self.access.check(caller, ADMIN)
            _every_model(key, "the log settings")
            detail = ", ".join(f"{k}={str(v)[:32]}" for k, v in list(changes.items())[:8])[:256]
            try:
                now = logs.change_log_settings(dict(changes))
            except ValueError as e:
                raise invalid(str(e)) from None
            if self.coordinator is not None:  # every worker logs alike
                await self.coordinator.log_settings(dict(changes))
        except GatewayError as e:
            await self.access.audited(caller, key, "logging.update", "logging", e.code.value, e.message[:256])
            raise
        await self.access.audited(caller, key, "logging.update", "logging", "ok", printable(detail))
        return now

    async def trace_settings(
        self, model: str, changes: Mapping[str, Any] | None, caller: Caller = OPEN_CALLER
    ) -> dict[str, Any]:
        """Triton's trace extension: the trace settings in effect for the server (``model`` "") or
        one model, after ``changes`` (admin scope, for that model when one is named; audited, a
        refusal too; ``None`` as a model's value clears its own). They map onto request tracing
        (``monitoring/tracing.py``): trace_level OFF or TIMESTAMPS, trace_rate one request in N,
        trace_count traces left; trace_file and log_frequency name Triton's files and cannot be set."""
        tracing = self.tracing
        if not changes:
            # the key first, the model after: a caller without a key learns nothing of the models
            self.access.check(caller, READ, model or None)
            if model and not self.knows(model):
                raise not_found(f"no model named '{printable(model[:128])}'")
            return tracing.settings(model) if tracing is not None else Policy("OFF", 0, -1).as_triton("")
        target = f"model {printable(model[:128])}" if model else "server"
        key = None
        try:
            key = self.access.check(caller, ADMIN, model or None)
            if not model:
                _every_model(key, "the server's trace settings")
            if model and not self.knows(model):
                raise not_found(f"no model named '{printable(model[:128])}'")
            if len(changes) > len(TRACE_KEYS):
                raise invalid(f"at most {len(TRACE_KEYS)} trace settings in one request, not {len(changes)}")
            try:
                parsed = parse_changes(dict(changes))
            except ValueError as e:
                raise invalid(str(e)) from None
            if tracing is None:  # only "off", which it is, can be set
                if not (parsed.get("trace_level", "OFF") == "OFF" and set(parsed) <= {"trace_level"}):
                    raise GatewayError(
                        ErrorCode.FAILED_PRECONDITION,
                        "request tracing is off: start batchgate with tracing: otlp and an otlp_endpoint to trace "
                        "requests",
                    )
                now = Policy("OFF", 0, -1).as_triton("")
            else:
                now = tracing.change(model, parsed)
                if self.coordinator is not None:  # every worker traces alike
                    await self.coordinator.trace_settings(model, parsed)
        except GatewayError as e:
            await self.access.audited(caller, key, "tracing.update", target, e.code.value, e.message[:256])
            raise
        detail = ", ".join(f"{k}={str(v)[:32]}" for k, v in parsed.items())
        await self.access.audited(caller, key, "tracing.update", target, "ok", printable(detail[:256]))
        return now

    @staticmethod
    def one_repository(repository: str) -> None:
        """A repository call that names a repository (HTTP ``/v2/repository/<name>/...``, gRPC
        ``repository_name``) is refused, as Triton refuses it: this server has one repository,
        and a load or unload meant for another must not act on it."""
        if repository:
            raise GatewayError(
                ErrorCode.UNIMPLEMENTED,
                f"naming a repository ('{printable(repository[:128])}') is not supported: this server serves "
                "one model repository; leave the repository name out",
            )

    @staticmethod
    def cuda_shared_memory() -> None:
        raise GatewayError(
            ErrorCode.UNIMPLEMENTED,
            "CUDA shared memory is not supported by batchgate; use system shared memory "
            "(/v2/systemsharedmemory, gRPC SystemSharedMemory*) or send the tensors in the request",
        )


class Coordinator(Protocol):
    """What a worker process asks the supervisor for (``worker.py`` implements it)."""

    owner_ready: bool  # front mode: the model-owning process is ready (always True otherwise)

    async def load(self, name: str, config: str | None, files: dict[str, bytes] | None) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int, owner: str | None) -> None: ...

    async def shm_unregister(self, name: str, owner: str | None) -> None: ...

    async def statistics(self) -> dict[tuple[str, str], dict[str, Any]]: ...

    async def log_settings(self, changes: dict[str, Any]) -> None: ...

    async def trace_settings(self, model: str, changes: dict[str, Any]) -> None: ...


def _every_model(key: Any, what: str) -> None:
    """A change that reaches every model needs a key allowed every model (``models: ["*"]``)."""
    if key is not None and not key.every_model:
        raise GatewayError(
            ErrorCode.PERMISSION_DENIED,
            f"API key '{key.id}' may change only some models; {what} reach every model, so they need a key whose "
            'models are ["*"]',
        )
