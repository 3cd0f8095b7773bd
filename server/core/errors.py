"""The one error type used inside the gateway.

Transports map :class:`ErrorCode` to a gRPC status or an HTTP status, each in
exactly one table (``transport/grpc_service.py`` and ``transport/http_app.py``).
"""

from __future__ import annotations

import enum
import re
import time


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"

    # Hashed by identity (members are singletons): Enum's own hash is Python code, 0.6 us against
    # 0.26 us, and a refusal under overload looks codes up in a few tables and sets.
    __hash__ = object.__hash__


# The model owner's codes a front worker reads as one of batch_may_go_alone's (GatewayError.resent_alone)
_RESENT_CODES = frozenset(
    (
        ErrorCode.INVALID_ARGUMENT,
        ErrorCode.FAILED_PRECONDITION,
        ErrorCode.INTERNAL,
        ErrorCode.ALREADY_EXISTS,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.PERMISSION_DENIED,
    )
)


class GatewayError(Exception):
    """An error with a code a transport can map, and a message a caller can act on."""

    __slots__ = ("code", "message", "retry_after_s")

    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def resent_alone(self) -> bool:
        """Whether a front worker whose call to the model owner merged several requests, answered
        this error by the owner, sends each of them again alone (``execution.py``'s batch execution:
        :func:`batch_may_go_alone` of the error it reads, which over gRPC is INTERNAL for a code
        ``backends/remote.py`` does not keep): the owner counts those calls then, not this one, so
        that each client request counts once."""
        return isinstance(self, TooLarge) or self.code in _RESENT_CODES

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"GatewayError({self.code.value}, {self.message!r})"


class TooLarge(GatewayError):
    """RESOURCE_EXHAUSTED because a message passed a size limit (the gateway's on an upstream's
    answer, or the upstream's on what it was sent), not because anyone is overloaded: the
    requests a gateway batch merged may each fit alone."""

    __slots__ = ()

    def __init__(self, message: str):
        super().__init__(ErrorCode.RESOURCE_EXHAUSTED, message)


class ModelRefused(GatewayError):
    """INVALID_ARGUMENT from the model itself, on a request that passed the gateway's checks
    (ONNX Runtime's invalid argument on its values, an upstream's INVALID_ARGUMENT): the
    caller's 400, which a route's rollout also holds against the variant that answered it when
    that variant refuses more than its baseline does (``core/rollout.py``)."""

    __slots__ = ()

    def __init__(self, message: str):
        super().__init__(ErrorCode.INVALID_ARGUMENT, message)


def batch_may_go_alone(e: Exception) -> bool:
    """Whether a batch that failed may owe it to one request's values (the backend refused
    or failed on them, or answered outputs that cannot be split) or to the batch's size, rather
    than to the backend's state: then each of its requests goes again alone."""
    if isinstance(e, GatewayError):
        return isinstance(e, TooLarge) or e.code in (
            ErrorCode.INVALID_ARGUMENT,
            ErrorCode.FAILED_PRECONDITION,
            ErrorCode.INTERNAL,
        )
    return isinstance(e, ValueError)


class ConfigError(ValueError):
    """A setting is wrong (file, environment or flag); the message names it and says what is
    allowed. Raised by ``config.py`` at start, never for a request."""


class ModelConfigError(ValueError):
    """A model's config or files cannot be served (a load error, not a request error); the
    message names the model and what is wrong. Settings errors are ``config.ConfigError``."""


def invalid(message: str) -> GatewayError:
    return GatewayError(ErrorCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> GatewayError:
    return GatewayError(ErrorCode.NOT_FOUND, message)


DEADLINE_SLACK_S = 0.05  # how much sooner than our deadline a client's own may pass


def cancelled_code(deadline: float | None, since: float | None = None) -> ErrorCode:
    """How to count a request cancelled under us (an asyncio cancellation, not an answer):
    DEADLINE_EXCEEDED once its deadline (on ``time.monotonic``) has about come, since the gRPC
    engine's deadline timer and a client giving up at its deadline both cancel the call as a
    client that goes away does; else CANCELLED. The client started its clock before we read the
    request (on a busy loop, well before), so a cancellation within ``DEADLINE_SLACK_S`` of the
    deadline, or within the last quarter of the time from ``since`` (its arrival), counts too."""
    if deadline is None:
        return ErrorCode.CANCELLED
    slack = DEADLINE_SLACK_S if since is None else max(DEADLINE_SLACK_S, (deadline - since) / 4)
    return ErrorCode.DEADLINE_EXCEEDED if time.monotonic() >= deadline - slack else ErrorCode.CANCELLED


# Where an engine's message names its own source: "/onnxruntime_src/.../reshape_helper.h:91 " and
# the C++ function after it. A caller learns nothing from these, and they tell an attacker the
# engine's build; the log keeps the whole message.
# (a path is tried only where one starts, never inside one: "/" * 8192 took 1.7 s otherwise)
_ENGINE_SOURCE = re.compile(
    r"(?<![\w./-])(?:[\w.-]*+/)++[\w.-]+\.(?:h|hpp|cc|cpp|cu|c):\d+\s+(?:[\w:~<>,*& ]+\([^()]*\)(?:\s*const)?\s+)?"
)
ENGINE_MESSAGE_CHARS = 512  # of an engine's message kept in an answer


def engine_message(e: BaseException) -> str:
    """An engine's (ONNX Runtime's, torch's) error as a caller may read it: without the engine's
    source locations, on one line, and at most ``ENGINE_MESSAGE_CHARS`` characters."""
    text = " ".join(_ENGINE_SOURCE.sub("", str(e)[:4096]).split())
    return text if len(text) <= ENGINE_MESSAGE_CHARS else text[: ENGINE_MESSAGE_CHARS - 3] + "..."
