"""What the serving layer needs from an execution engine, and the registry of engines.

Two kinds of backend, chosen once when a model version is built:

- a :class:`LocalBackend` runs a batch synchronously in this process (ONNX Runtime).
  ``ModelVersion`` calls ``run`` on an inference thread, or on the event loop itself for
  batch sizes measured faster than the hand-off to a thread (``inline_execution_max_us``).
- a :class:`RemoteBackend` sends a batch to other servers; ``infer`` is a coroutine that
  runs on the event loop.

A backend is created for one model version and closed when that version is retired
(after the requests in flight on it have finished). Local backends register under the
platform names a ``config.pbtxt`` uses (``platform`` or ``backend``); the repository
finds them with :func:`local_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from ..core.errors import GatewayError, ModelConfigError
from ..core.types import clip, printable

if TYPE_CHECKING:
    from ..monitoring.tracing import TraceHeaders


@dataclass(frozen=True, slots=True)
class IOInfo:
    """A tensor as the engine declares it (used to complete a missing config)."""

    name: str
    v2_datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension
    # The engine's names for its dimensions where it has them (ONNX's symbolic dims: "batch",
    # "N"), None where it has none; empty when the engine names none (TorchScript).
    dim_names: tuple[str | None, ...] = ()


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """What the repository tells a local backend when it opens a model file."""

    gpu_device_id: int = 0


Kind = Literal["local", "remote"]

# The most threads a config's intra_op_thread_count / inter_op_thread_count may ask an engine for:
# the engine starts them while the load runs, and a typo (100000) held a server's start for good.
MAX_THREADS = 256


def thread_counts(params: Mapping[str, str]) -> tuple[int, int]:
    """The config's ``intra_op_thread_count`` and ``inter_op_thread_count`` (0: the backend's own
    choice), each a whole number from 0 to ``MAX_THREADS``; anything else fails the load."""
    counts = []
    for key in ("intra_op_thread_count", "inter_op_thread_count"):
        text = (params.get(key) or "0").strip()
        try:
            n = int(text)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_THREADS:
            raise ModelConfigError(
                f"{key} must be a whole number from 0 to {MAX_THREADS} (0: one thread per core this process "
                f"may use), not '{printable(clip(text, 32))}'"
            )
        counts.append(n)
    return counts[0], counts[1]


class Backend(Protocol):
    """What every backend offers its model version."""

    platform: ClassVar[str]
    kind: ClassVar[Kind]

    def providers(self) -> list[str]:
        """Where it runs, in words (execution providers, upstream addresses)."""
        ...

    def ready(self) -> bool:
        """Whether it can execute now."""
        ...

    def not_ready_reason(self) -> str:
        """Why ``ready()`` is False, for the repository index and errors."""
        ...

    async def close(self) -> None:
        """Free what it holds; called once, after the version's last request."""
        ...


class LocalBackend(Backend, Protocol):
    engine: ClassVar[str]  # the engine's name in words, for load errors ("ONNX Runtime")

    @classmethod
    def load(cls, path: str, config: mc.ModelConfig, options: LocalOptions) -> LocalBackend:
        """Open the model file at ``path`` (blocking: the repository calls it on a thread)."""
        ...

    def inputs(self) -> list[IOInfo]: ...

    def outputs(self) -> list[IOInfo]: ...

    def run(self, feeds: dict[str, np.ndarray], output_names: tuple[str, ...]) -> list[np.ndarray]:
        """Execute one batch; one array per name in ``output_names``."""
        ...

    def warm_up(self, batch: int = 0, free: int = 1) -> list[np.ndarray]:
        """Run on zeros, every dynamic dimension ``free`` except the first, which is ``batch``
        when given (> 0); the outputs, in the order of ``outputs()``."""
        ...


class RemoteBackend(Backend, Protocol):
    version: str  # the upstream version served, known once open() has answered

    async def open(self) -> mc.ModelConfig:
        """Reach the upstreams and read the model's config; UNAVAILABLE when none serves it."""
        ...

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        output_names: tuple[str, ...],
        deadline: float | None,
        request_id: str = "",
        trace: TraceHeaders | None = None,
        params: Mapping[str, Any] | None = None,
        input_params: Mapping[str, Mapping[str, Any]] | None = None,
        answered: dict | None = None,
    ) -> list[np.ndarray]:
        """Execute one batch remotely; ``deadline`` is absolute on the monotonic clock;
        ``trace``: the W3C trace context headers to send with the call; the batch's request and
        input parameters go with it."""
        ...

    async def infer_open(
        self,
        feeds: dict[str, np.ndarray],
        types: dict[str, str],
        names: tuple[str, ...],
        deadline: float | None,
        request_id: str = "",
        trace: TraceHeaders | None = None,
        params: Mapping[str, Any] | None = None,
        input_params: Mapping[str, Mapping[str, Any]] | None = None,
        answered: dict | None = None,
    ) -> dict[str, tuple[str, np.ndarray]]:
        """Execute one batch of a model that declares no signature: inputs typed by the caller,
        every output (``names`` ()) or those named, answered by name as (V2 datatype, array);
        the caller's request and input parameters go with it."""
        ...

    async def forward(self, request: bytes, deadline: float | None, trace: TraceHeaders | None = None) -> bytes:
        """Send a caller's serialized ModelInferRequest on unchanged but for the model name and
        version; the upstream's serialized ModelInferResponse."""
        ...

    def unavailable(self) -> GatewayError:
        """The error a caller gets at once while ``ready()`` is False."""
        ...


_LOCAL: dict[str, type[LocalBackend]] = {}
L = TypeVar("L", bound="type[LocalBackend]")


def register_local(*platforms: str) -> Callable[[L], L]:
    """Class decorator: serve model files whose config names one of ``platforms``."""

    def add(cls: L) -> L:
        for p in platforms:
            _LOCAL[p] = cls
        return cls

    return add


def local_backend(platform: str) -> type[LocalBackend]:
    """The backend class for a config's ``platform`` (or ``backend``) name; KeyError if none."""
    return _LOCAL[platform]


def local_platforms() -> list[str]:
    return sorted(_LOCAL)


class Reshaped:
    """A local backend whose ``config.pbtxt`` reshapes tensors (Triton's ``reshape``): callers'
    tensors have the config's ``dims``, the model's have ``reshape.shape`` (say ``dims: [1]``
    with ``reshape: { shape: [] }`` for a model that takes one value a row). Inputs are reshaped
    on the way in, outputs back to their ``dims`` on the way out; numpy's reshape copies nothing."""

    def __init__(self, inner: LocalBackend, config: mc.ModelConfig):
        self._inner = inner
        self._config = config
        self._batched = config.max_batch_size > 0
        self._in = {t.name: tuple(t.reshape.shape) for t in config.input if t.HasField("reshape")}
        self._out = {t.name: tuple(t.dims) for t in config.output if t.HasField("reshape")}

    @staticmethod
    def wanted(config: mc.ModelConfig) -> bool:
        return any(t.HasField("reshape") for t in [*config.input, *config.output])

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def twin(self) -> Reshaped:
        return Reshaped(self._inner.twin(), self._config)  # type: ignore[attr-defined]

    def _shaped(self, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        want = (a.shape[0], *shape) if self._batched and a.ndim else shape
        try:
            return a.reshape(want)
        except ValueError:  # (an output whose dims leave its shape open twice: as the model gave it)
            return a

    def run(self, feeds: dict[str, np.ndarray], output_names: tuple[str, ...]) -> list[np.ndarray]:
        if self._in:
            feeds = {k: self._shaped(v, self._in[k]) if k in self._in else v for k, v in feeds.items()}
        outs = self._inner.run(feeds, output_names)
        if self._out:
            outs = [self._shaped(o, self._out[n]) if n in self._out else o for n, o in zip(output_names, outs)]
        return outs
