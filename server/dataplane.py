"""DataPlane: the one API both transports call.

gRPC and HTTP differ in bytes, never in behaviour: whatever a caller asks (infer,
health, metadata, config, statistics, the repository API), the transport decodes the
wire into plain values, calls the method here, and encodes what comes back. Request
ids, deadlines, validation, errors and their log lines are decided here or below,
once for both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Mapping
from typing import Any, TypedDict

import orjson
from tritonclient.grpc import model_config_pb2 as mc

from . import __version__
from .config import SETTINGS
from .core.errors import ErrorCode, GatewayError, invalid
from .core.signature import TensorSpec
from .core.types import InferRequest, InferResponse, RequestLimits, check_model_name
from .model import ModelVersion
from .monitoring.metrics import Metrics
from .repository.config import config_to_json
from .repository.manager import ModelRepository
from .security.limits import Admission

log = logging.getLogger("batchgate")

EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "statistics",
    "parameters",
)
# The settings of the limits section: the reasons a refusal may be counted under.
LIMIT_NAMES = frozenset(name for name, spec in SETTINGS.items() if spec.section == "limits")
_LIMIT_IN_MESSAGE = re.compile(r"\((max_[a-z_]+)\)$")
# Refusals that come in floods when the server is overloaded or draining.
_QUIET = frozenset({ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED})
# Load parameters of the repository API (V2 model_repository extension).
CONFIG_PARAM = "config"
FILE_PARAM_PREFIX = "file:"


class ServerMetadata(TypedDict):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(TypedDict):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class ModelMetadata(TypedDict):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        limits: RequestLimits,
        strict_readiness: bool = True,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
    ):
        self.repository = repository
        self.metrics = metrics or repository.metrics
        self.limits = limits
        self.strict_readiness = strict_readiness
        self.admission = admission or Admission(max_inflight=1 << 30, max_queue_wait_s=0.0)
        self.accepting = False  # set by the Gateway once everything listens; cleared on drain

    # ------------------------------------------------------------------ health
    @staticmethod
    def live() -> bool:
        return True

    def ready(self) -> bool:
        """Accepting work and, with strict readiness (Triton's default), every model that
        should be loaded is ready. Liveness is separate: a process that is not ready is alive."""
        return self.accepting and (not self.strict_readiness or self.repository.all_ready())

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.repository.ready(name, version)

    # ------------------------------------------------------------------ inference
    def admit(self, name: str, version: str = "") -> ModelVersion:
        """Admit one inference request for ``name`` (``version``: "" = latest) before anything
        of it is decoded, or refuse it: UNAVAILABLE while draining, NOT_FOUND for an unknown
        model, RESOURCE_EXHAUSTED past the admission limits (``security/limits.py``).

        Returns the version to hand the request to (:meth:`infer`). The caller must call
        :meth:`release` with it exactly once when the request is answered or abandoned."""
        if not self.accepting:
            raise GatewayError(ErrorCode.UNAVAILABLE, "batchgate is shutting down; send the request to another replica")
        served = self.repository.resolve(name, version)
        self.admission.admit(served)
        return served

    def release(self, served: ModelVersion) -> None:
        self.admission.release(served)

    @staticmethod
    def infer(served: ModelVersion, request: InferRequest) -> Awaitable[InferResponse]:
        """Hand ``request`` to the version :meth:`admit` returned; await the answer.

        Not a coroutine itself (one frame less per request): a refusal found here raises at
        once, before anything is queued."""
        return served.submit(request)

    @property
    def in_flight(self) -> int:
        """Requests admitted or submitted and not yet answered."""
        return max(self.admission.inflight, sum(s.in_flight for s in self.repository.served()))

    def count_error(self, protocol: str, e: GatewayError) -> None:
        """Count an inference request answered with an error, by the limit that refused it when
        one did (read from the message's closing "(setting)", checked against the limits'
        names: never client text as a label)."""
        m = _LIMIT_IN_MESSAGE.search(e.message)
        reason = m.group(1) if m is not None and m.group(1) in LIMIT_NAMES else "none"
        self.metrics.request_error(protocol, e.code.value, reason)

    def log_failure(self, protocol: str, model: str, request_id: str, e: GatewayError) -> None:
        """One log line per failed request, the same for both transports. Client values are
        cut to a bounded length (a log line never carries unbounded input). Refusals for
        overload go to DEBUG: under overload there are thousands a second, and each one an
        INFO line would turn the overload into a logging storm (the refusal counters count them)."""
        log.log(
            logging.DEBUG if e.code in _QUIET else logging.INFO,
            "%s request to model '%s' failed: %s %s",
            protocol,
            model[:128],
            e.code.value,
            e.message[:1024],
            extra={"request_id": request_id[:128] or "-"},
        )

    # ------------------------------------------------------------------ metadata
    @staticmethod
    def server_metadata() -> ServerMetadata:
        return {"name": "batchgate", "version": __version__, "extensions": list(EXTENSIONS)}

    def knows(self, name: str, version: str = "") -> bool:
        """Whether a model of this name (and version, when given) exists: a transport caches
        only what is real, never a client's made-up names."""
        entry = self.repository.models.get(name)
        if entry is None:
            return False
        return not version or (version.isdigit() and int(version) in entry.versions)

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        served = self.repository.resolve(name, version)
        sig = served.signature
        entry = self.repository.entry(name)

        def tensors(specs: tuple[TensorSpec, ...]) -> list[TensorMetadata]:
            return [{"name": t.name, "datatype": t.dtype.v2, "shape": t.full_shape(sig.max_batch_size)} for t in specs]

        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": sig.platform,
            "inputs": tensors(sig.inputs),
            "outputs": tensors(sig.outputs),
        }

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        return self.repository.resolve(name, version).config

    def model_config_json(self, name: str, version: str) -> dict[str, Any]:
        return config_to_json(self.model_config(name, version))

    def statistics(self, name: str, version: str) -> list[dict[str, Any]]:
        if name:
            entry = self.repository.entry(name)
            if version:
                return [self.repository.resolve(name, version).stats.as_dict()]
            return [s.stats.as_dict() for _, s in sorted(entry.versions.items())]
        if version:
            raise invalid("a version needs a model name")
        return [s.stats.as_dict() for s in self.repository.served()]

    # ------------------------------------------------------------------ repository API
    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.repository.index(ready_only=ready_only)

    async def load_model(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Load or reload ``name``. ``parameters`` are the load request's, decoded from the wire
        (gRPC string/bytes params; HTTP JSON with ``file:`` values already base64-decoded):
        ``config`` is the model config as JSON text or an object, ``file:<path>`` the bytes
        of a file of the model directory."""
        check_model_name(name)
        config = parameters.get(CONFIG_PARAM)
        if config is not None and not isinstance(config, str):
            if isinstance(config, dict):
                config = orjson.dumps(config).decode()
            else:
                raise invalid("load parameter 'config' must be the model config as JSON text")
        files: dict[str, bytes] = {}
        for k, v in parameters.items():
            if k.startswith(FILE_PARAM_PREFIX):
                if not isinstance(v, bytes):
                    raise invalid(f"load parameter '{k[:128]}' must carry the file's bytes")
                files[k[len(FILE_PARAM_PREFIX) :]] = v
        await self.repository.load(name, config, files or None)

    async def unload_model(self, name: str) -> None:
        check_model_name(name)
        await self.repository.unload(name)
