"""DataPlane: the one API both transports call.

gRPC and HTTP differ in bytes, never in behaviour: whatever a caller asks (infer,
health, metadata, config, statistics, the repository API), the transport decodes the
wire into plain values, calls the method here, and encodes what comes back. Request
ids, deadlines, validation, errors and their log lines are decided here or below,
once for both.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from random import random
from typing import TYPE_CHECKING, Any, TypedDict

import orjson
from tritonclient.grpc import model_config_pb2 as mc

from . import __version__
from .config import SETTINGS
from .core.errors import ErrorCode, GatewayError, invalid
from .core.rate import LineBudget
from .core.signature import TensorSpec
from .core.types import (
    EMPTY,
    FINAL_RESPONSE_REQUESTED,
    MAX_TENSOR_PARAMETERS,
    InferRequest,
    InferResponse,
    RequestLimits,
    check_grpc_outputs,
    check_model_name,
    check_parameter_name,
    check_shape,
    check_tensors,
    clip,
    is_version_text,
    printable,
)
from .dataplane_extensions import Coordinator, Extensions
from .model import ModelVersion
from .monitoring.access_log import AccessLog
from .monitoring.metrics import Metrics
from .monitoring.trace_context import passed_on, trace_context
from .monitoring.tracing import Tracing
from .repository.config import config_to_json
from .repository.manager import ModelRepository
from .routes import Header, Routed, ServedRoute
from .security.access import ADMIN, INFER, OPEN_CALLER, READ, Access, Caller
from .security.audit import hash_files
from .security.limits import Admission
from .shm import REGION as SHM_REGION
from .shm import SharedMemory

if TYPE_CHECKING:
    from .monitoring.drift import DriftService
    from .route_table import RouteTable

log = logging.getLogger("batchgate")

EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "schedule_policy",  # a request's priority (the model's priority levels) and timeout (µs)
    "statistics",
    "parameters",
    "system_shared_memory",
    "logging",
    "trace",
)
# The settings of the limits section: the reasons a refusal may be counted under.
LIMIT_NAMES = frozenset(name for name, spec in SETTINGS.items() if spec.section == "limits")
_LIMIT_IN_MESSAGE = re.compile(r"\(([a-z_]+)\)$")
_REASONS: dict[str, str] = {}  # an error message's limit, as count_error found it
# Refusals that come in floods when the server is overloaded or draining.
_QUIET = frozenset({ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED})
_monotonic = time.monotonic
# Load parameters of the repository API (V2 model_repository extension).
CONFIG_PARAM = "config"
FILE_PARAM_PREFIX = "file:"
UNLOAD_DEPENDENTS = "unload_dependents"  # (an unload parameter)


# What admission hands back and inference takes: a model version, or a request's passage
# through a route. Transports hold it without looking inside.
Served = ModelVersion | Routed
# The kinds Triton takes each sequence parameter (and the stream's final-response flag) in over
# gRPC (its int64 sequence_id being a uint64's bits): a request sent on as it came carries them so
# or goes the decoded way, which refuses what Triton refuses.
_SEQUENCE_KINDS = {
    "sequence_id": ("int64_param", "string_param"),
    "sequence_start": ("bool_param",),
    "sequence_end": ("bool_param",),
    FINAL_RESPONSE_REQUESTED: ("bool_param",),
}
PRECHECK_BYTES = 1 << 20  # requests past this are checked against the signature before decoding


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


class DataPlane(Extensions):
    def __init__(
        self,
        repository: ModelRepository,
        limits: RequestLimits,
        strict_readiness: bool = True,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
        access: Access | None = None,
    ):
        self.repository = repository
        self.metrics = metrics or repository.metrics
        self.limits = limits
        self.strict_readiness = strict_readiness
        self.admission = admission or Admission(max_inflight=1 << 30, max_queue_wait_s=0.0)
        self.access = access or Access()
        self._keys = self.access.keys  # None: an open server (fixed for its life)
        self.accepting = False  # set by the Gateway once everything listens; cleared on drain
        self.routes: RouteTable | None = None  # set by the Gateway when routes are configured
        self.drift: DriftService | None = None  # set by the Gateway when drift monitors are configured
        self.shm = SharedMemory("", 1, 1)  # registered shared-memory regions; the Gateway sets its limits
        # In a worker process (one of several): what must reach every worker (loads, unloads,
        # shared-memory registrations) and pod-wide statistics go through the supervisor.
        self.coordinator: Coordinator | None = None
        # The model-owning process of front mode: its callers are the pod's own workers, and it
        # counts each call as the client requests it says it merged (``x-batchgate-requests``).
        self.weighs_calls = False
        self.access_log: AccessLog | None = None  # set by the Gateway unless access_log is off
        self.tracing: Tracing | None = None  # set by the Gateway with tracing: otlp
        self.failure_lines = LineBudget(100)  # "failed" log lines a second; the Gateway sets the limit

    def key_id(self, caller: Caller) -> str | None:
        """The id of the key ``caller`` presents (for the access log; None: none or not valid)."""
        keys = self._keys
        if keys is None or (caller.authorization is None and caller.subject is None):
            return None
        try:
            return keys.authenticate(caller.authorization, caller.subject).id
        except GatewayError:
            return None

    def _route(self, name: str) -> ServedRoute | None:
        routes = self.routes
        return None if routes is None else routes.routes.get(name)

    # ------------------------------------------------------------------ health
    def live(self, caller: Caller | None = None) -> bool:
        """``caller``: who asks over the wire (None: the gateway itself)."""
        if caller is not None and self.access.health_requires_key:
            self.access.check(caller, READ)
        return True

    def ready(self, caller: Caller | None = None) -> bool:
        """Accepting work and, with strict readiness (Triton's default), every model that
        should be loaded is ready. Liveness is separate: a process that is not ready is alive."""
        if caller is not None and self.access.health_requires_key:
            self.access.check(caller, READ)
        if self.strict_readiness and self.coordinator is not None and not self.coordinator.owner_ready:
            return False  # a front worker: the process that owns the models is not ready
        return self.accepting and (not self.strict_readiness or self.repository.all_ready())

    def model_ready(self, name: str, version: str = "", caller: Caller = OPEN_CALLER) -> bool:
        self.access.check(caller, READ, name)
        route = self._route(name)
        if route is not None:
            return not version and route.not_ready_reason() is None
        return self.repository.ready(name, version)

    # ------------------------------------------------------------------ inference
    def admit(
        self,
        name: str,
        version: str = "",
        caller: Caller = OPEN_CALLER,
        header: Header | None = None,
        count: bool = True,
        again: bool = False,
    ) -> Served:
        """Admit one inference request for ``name`` (``version``: "" = latest) before anything
        of it is decoded, or refuse it: UNAVAILABLE while draining; with API keys,
        UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED (its rate) for the caller, before
        the model is looked up (a caller without a key learns nothing of the models); NOT_FOUND
        for an unknown model; RESOURCE_EXHAUSTED past the admission limits (``security/limits.py``).
        A route's name admits the request on the variant it picks (``routes.py``), which may read
        the pin and sticky headers through ``header``.

        Returns the version (or routed passage) to hand the request to (:meth:`infer`). The
        caller must call :meth:`release` with it exactly once when the request is answered or
        abandoned. ``count`` False: an overload refusal is raised as ``Held``, counted nowhere,
        for a caller that will wait and ask ``again`` (its key checked and its rate taken once)."""
        if not self.accepting:
            raise GatewayError(ErrorCode.UNAVAILABLE, "batchgate is shutting down; send the request to another replica")
        if self._keys is not None and not again:
            self.access.check(caller, INFER, name)
        routes = self.routes
        if routes is not None:
            route = routes.routes.get(name)
            if route is not None:
                return route.admit(version, header, count)
        served = self.repository.resolve(name, version)
        self.admission.admit(served, count)
        return served

    def shedding(self) -> bool:
        """Whether requests are being refused now: :meth:`quick_refusal` is worth asking."""
        return self.admission.shedding()

    def quick_refusal(self, name: str, protocol: str, admit: bool = False) -> GatewayError | ModelVersion | None:
        """The overload refusal of a request for ``name`` (its latest version) before it is
        decoded, counted as :meth:`admit` counts one; None if admitted, or if the full path must
        decide (draining, keys, tracing, a route, an unknown model). With ``admit``, one it does
        not refuse is admitted: its version is returned (released once, as :meth:`admit`'s)."""
        if not self.accepting or self._keys is not None or self.tracing is not None:
            return None
        if self.routes is not None and name in self.routes.routes:
            return None
        if (entry := self.repository.models.get(name)) is None or (served := entry.latest) is None:
            return None
        refused = self.admission.refusal(served)
        if refused is not None:
            self.count_error(protocol, refused)
            return refused
        if admit:
            self.admission.take(served)
            return served
        return None

    def release(self, served: Served) -> None:
        self.admission.release(served.version if type(served) is Routed else served)  # type: ignore[arg-type]

    @staticmethod
    def precheck(served: Served, size: int, shared: bool = False) -> Callable[[str, str, tuple[int, ...]], None] | None:
        """For a request of ``size`` bytes past ``PRECHECK_BYTES``, or one that may read a
        shared-memory region (``shared``: a few bytes may name 64 MB there), the serving
        version's check of one input's name, datatype and shape, for the codec to run before the
        input's values are read: a large request the model refuses is never decoded (a 61 MB
        JSON body took the loop 1.9 s to be refused; a 100-byte one naming a region of 11 M
        strings, 7 s). None for a small one (checked once, after) or an open signature."""
        if size <= PRECHECK_BYTES and not shared:
            return None
        signature = (served.version if isinstance(served, Routed) else served).signature
        return None if signature.open else signature.precheck

    def infer(self, served: Served, request: InferRequest, sampled: bool | None = None) -> Awaitable[InferResponse]:
        """Hand ``request`` to the version :meth:`admit` returned; await the answer. With drift
        monitors, a sampled request's rows are offered to the detector once it is answered
        (``sampled``: decided already, by :meth:`drift_sampled`; None: decided here).

        Not a coroutine itself (one frame less per request): a refusal found here raises at
        once, before anything is queued."""
        drift = self.drift
        if request.offline:  # batch scoring: counted apart, never sampled for drift
            self.metrics.offline(request.model_name)
            return served.submit(request)
        if drift is None or request.synthetic or sampled is False:
            return served.submit(request)
        variant = served.version.name if type(served) is Routed else None
        return drift.watch(served.submit(request), request, variant, sampled)

    def drift_sampled(self, served: Served, model_name: str) -> bool | None:
        """Whether drift monitoring samples a gRPC request to a model that may forward it as it
        came (:meth:`forward`): decided once, before, so a sampled request takes the decoded path
        and is sampled there for sure (deciding again there would sample at the rate squared).
        None when no monitor watches it (or it never forwards): :meth:`infer` decides."""
        drift = self.drift
        if drift is None or type(served) is not ModelVersion or served.forwarder is None:
            return None
        tap = drift.taps.get(model_name)
        return None if tap is None else random() < tap.rate

    def forward(
        self, served: Served, raw: bytes, msg: Any, remaining: float | None, span: Any = None, metadata: Any = ()
    ) -> Awaitable[bytes] | None:
        """The fast path of a gRPC request to a remote model: its serialized bytes ``raw`` go to
        the upstream as they came, and the upstream's serialized answer comes back, with no
        tensor decoded or encoded here (``ModelVersion.forward``). None when the request must
        take the ordinary path: a route (it picks, compares and measures on decoded requests),
        a model the gateway batches, a tensor in shared
        memory, or every instance busy. The upstream is given the request's trace context: its
        ``span``'s, else what the call's ``metadata`` carried (read only when forwarding). The
        limits on what a request names still hold; the tensors themselves are the upstream's to
        check. ``msg``: the parsed request; ``remaining``: seconds to the call's deadline."""
        if type(served) is not ModelVersion or served.forwarder is None:
            return None
        limits = self.limits
        inputs = msg.inputs
        check_tensors(len(inputs), len(msg.outputs), limits)
        params = msg.parameters
        deadline = None if remaining is None else _monotonic() + remaining
        if params:
            if len(params) > limits.max_request_parameters:
                raise invalid(
                    f"the request has {len(params)} parameters; at most {limits.max_request_parameters} "
                    "are accepted (max_request_parameters)"
                )
            for k in params:  # (as on the decoded path: new_request)
                check_parameter_name(k)
                kinds = _SEQUENCE_KINDS.get(k)
                if kinds is not None and params[k].WhichOneof("parameter_choice") not in kinds:
                    return None  # not as Triton takes it: the decoded path checks it, and sends it so
            if "timeout" in params:  # V2's timeout (µs) bounds the upstream call, as on the decoded path
                p = params["timeout"]
                v = getattr(p, p.WhichOneof("parameter_choice") or "int64_param")
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise invalid(f"parameter 'timeout' must be a non-negative integer of microseconds, not {v!r:.64}")
                if v:
                    dl = _monotonic() + v / 1e6
                    deadline = dl if deadline is None else min(deadline, dl)
        if len(msg.id) > limits.max_request_id_bytes:
            raise invalid(f"the request id is longer than {limits.max_request_id_bytes} bytes (max_request_id_bytes)")
        strings = 0
        for t in inputs:
            strings = check_shape(t.name, t.shape, limits, t.datatype, strings)
            if len(t.parameters) > MAX_TENSOR_PARAMETERS:
                raise invalid(f"input '{printable(clip(t.name))}': at most {MAX_TENSOR_PARAMETERS} parameters")
        check_grpc_outputs(msg.outputs)
        # Per tensor, not a search of the bytes: that would cost time in proportion to the tensors.
        if any(SHM_REGION in t.parameters for t in inputs) or any(SHM_REGION in o.parameters for o in msg.outputs):
            return None
        rows = 1
        if served.signature.max_batch_size > 0 and inputs and inputs[0].shape:
            rows = inputs[0].shape[0]
        return served.forward(raw, rows, deadline, passed_on(span, *trace_context(metadata)))

    @property
    def in_flight(self) -> int:
        """Requests admitted or submitted and not yet answered."""
        return max(self.admission.inflight, sum(s.in_flight for s in self.repository.served()))

    def count_error(self, protocol: str, e: GatewayError) -> None:
        """Count an inference request answered with an error, by the limit that refused it when
        one did (read from the message's closing "(setting)", checked against the limits'
        names: never client text as a label)."""
        reason = _REASONS.get(e.message)
        if reason is None:
            m = _LIMIT_IN_MESSAGE.search(e.message)
            reason = m.group(1) if m is not None and m.group(1) in LIMIT_NAMES else "none"
            if len(_REASONS) >= 1024:  # (messages with figures in them vary: the memory stays bounded)
                _REASONS.clear()
            _REASONS[e.message] = reason
        self.metrics.request_error(protocol, e.code.value, reason)

    def log_failure(self, protocol: str, model: str, request_id: str, e: GatewayError) -> None:
        """One log line per failed request, the same for both transports. Client values are
        cut to a bounded length (a log line never carries unbounded input). Refusals for
        overload go to DEBUG: under overload there are thousands a second, and each one an
        INFO line would turn the overload into a logging storm (the refusal counters count them)."""
        level = logging.DEBUG if e.code in _QUIET else logging.INFO
        if not log.isEnabledFor(level):
            return
        # At most failure_log_max_lines_per_s a second: one client sending bad requests in a loop
        # must not flood the log (the lines past it are counted, and summed up with the next one).
        left_out = self.failure_lines.take()
        if left_out is None:  # (counted by the budget: batchgate_failure_log_dropped_total)
            return
        if left_out:
            log.warning(
                "%d failed requests were not logged since the last line of this kind "
                "(failure_log_max_lines_per_s %d; batchgate_failure_log_dropped_total counts them)",
                left_out,
                self.failure_lines.limit,
            )
        log.log(
            level,
            "%s request to model '%s' failed: %s %s",
            protocol,
            model[:128],
            e.code.value,
            e.message[:1024],
            extra={"request_id": request_id[:128] or "-"},
        )

    # ------------------------------------------------------------------ metadata
    def server_metadata(self, caller: Caller = OPEN_CALLER) -> ServerMetadata:
        self.access.check(caller, READ)
        return {"name": "batchgate", "version": __version__, "extensions": list(EXTENSIONS)}

    def knows(self, name: str, version: str = "") -> bool:
        """Whether a model of this name (and version, when given) exists: a transport caches
        only what is real, never a client's made-up names."""
        entry = self.repository.models.get(name)
        if entry is None:
            return not version and self._route(name) is not None
        if not version:
            return True
        return is_version_text(version) and int(version) in entry.versions

    def model_metadata(self, name: str, version: str, caller: Caller = OPEN_CALLER) -> ModelMetadata:
        self.access.check(caller, READ, name)
        route = self._route(name)
        if route is not None:
            served, versions = self._route_version(route, version), []
        else:
            served = self.repository.resolve(name, version)
            versions = [str(v) for v in sorted(self.repository.entry(name).versions)]
        sig = served.signature
        outputs = sig.outputs if route is None else tuple(t for t in sig.outputs if t.name in route.outputs)

        def tensors(specs: tuple[TensorSpec, ...]) -> list[TensorMetadata]:
            return [{"name": t.name, "datatype": t.dtype.v2, "shape": t.full_shape(sig.max_batch_size)} for t in specs]

        return {
            "name": name,
            "versions": versions,
            "platform": sig.platform,
            "inputs": tensors(sig.inputs),
            "outputs": tensors(outputs),
        }

    def model_config(self, name: str, version: str, caller: Caller = OPEN_CALLER) -> mc.ModelConfig:
        self.access.check(caller, READ, name)
        route = self._route(name)
        if route is None:
            return _shown(self.repository.resolve(name, version))
        config = mc.ModelConfig()
        config.CopyFrom(_shown(self._route_version(route, version)))
        config.name = name  # the heaviest variant's config, under the route's name
        config.ClearField("version_policy")
        shared = [o for o in config.output if o.name in route.outputs]  # (those every variant gives)
        if len(shared) < len(config.output):
            del config.output[:]
            config.output.extend(shared)
        return config

    @staticmethod
    def _route_version(route: ServedRoute, version: str) -> ModelVersion:
        """The version that speaks for a route in metadata and config (its heaviest variant's)."""
        if version:
            raise invalid(f"'{route.name}' is a route, which has no versions: ask without a model version")
        served = route.primary()
        if served is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"route '{route.name}' is not ready: no variant is loaded")
        return served

    def model_config_json(self, name: str, version: str, caller: Caller = OPEN_CALLER) -> dict[str, Any]:
        return config_to_json(self.model_config(name, version, caller))

    def statistics(self, name: str, version: str, caller: Caller = OPEN_CALLER) -> list[dict[str, Any]]:
        key = self.access.check(caller, READ, name or None)
        route = self._route(name) if name else None
        if route is not None:
            if version:
                raise invalid(f"'{name}' is a route, which has no versions: ask without a model version")
            return [route.stats.as_dict()]
        if name:
            entry = self.repository.entry(name)
            if version or not entry.versions:  # (none served: not ready, as its metadata answers)
                return [self.repository.resolve(name, version).stats.as_dict()]
            return [s.stats.as_dict() for _, s in sorted(entry.versions.items())]
        if version:
            raise invalid("a version needs a model name")
        # every model and route the key may see (an open server: every one)
        stats = [s.stats for s in self.repository.served()]
        if self.routes is not None:
            stats += [r.stats for r in self.routes.routes.values()]
        return [st.as_dict() for st in stats if key is None or key.allows_model(st.name)]

    async def statistics_of_all(self, name: str, version: str, caller: Caller = OPEN_CALLER) -> list[dict[str, Any]]:
        """:meth:`statistics`, and in a worker process each row summed over every worker."""
        rows = self.statistics(name, version, caller)  # access, names and versions checked here
        if self.coordinator is None:
            return rows
        merged = await self.coordinator.statistics()
        return [merged.get((r["name"], r["version"]), r) for r in rows]

    # ------------------------------------------------------------------ repository API
    def repository_index(
        self, ready_only: bool = False, caller: Caller = OPEN_CALLER, repository: str = ""
    ) -> list[dict[str, str]]:
        key = self.access.check(caller, READ)
        self.one_repository(repository)
        rows = self.repository.index(ready_only=ready_only)
        for route in self.routes.routes.values() if self.routes is not None else ():
            reason = route.not_ready_reason()
            if reason is None or not ready_only:
                state = "READY" if reason is None else "UNAVAILABLE"
                # a route has no versions: Triton's row for a model with no version number
                rows.append({"name": route.name, "state": state, "reason": reason or ""})
        return rows if key is None else [r for r in rows if key.allows_model(r["name"])]

    async def load_model(
        self, name: str, parameters: Mapping[str, Any], caller: Caller = OPEN_CALLER, repository: str = ""
    ) -> None:
        """Load or reload ``name`` (scope ``admin``). ``parameters`` are the load request's,
        decoded from the wire (gRPC string/bytes params; HTTP JSON with ``file:`` values already
        base64-decoded): ``config`` is the model config as JSON text or an object, ``file:<path>``
        the bytes of a file of the model directory. Audited, whatever the outcome."""
        files: dict[str, bytes] = {}
        key = None
        try:
            key = self.access.check(caller, ADMIN, name)
            self.one_repository(repository)
            check_model_name(name)
            if self._route(name) is not None:
                raise invalid(f"'{name}' is a route; a model needs a name of its own")
            config = parameters.get(CONFIG_PARAM)
            if config is not None and not isinstance(config, str):
                if isinstance(config, dict):
                    config = orjson.dumps(config).decode()
                else:
                    raise invalid("load parameter 'config' must be the model config as JSON text")
            for k, v in parameters.items():
                if k.startswith(FILE_PARAM_PREFIX):
                    if not isinstance(v, bytes):
                        raise invalid(f"load parameter '{k[:128]}' must carry the file's bytes")
                    files[k[len(FILE_PARAM_PREFIX) :]] = v
                elif k != CONFIG_PARAM:  # (a misspelt 'config' must not load the model without it)
                    raise invalid(
                        f"unrecognized load parameter '{printable(k[:128])}': a load takes 'config' and "
                        "'file:<version>/<name>'"
                    )
            if self.coordinator is not None:
                await self.coordinator.load(name, config, files or None)
            else:
                await self.repository.load(name, config, files or None)
        except GatewayError as e:
            await self.access.audited(caller, key, "repository.load", name, e.code.value, e.message)
            raise
        hashed, omitted = await self._hashes(name, files)
        digest = None
        if config is not None:  # the config loaded: the one given, not the folder's config.pbtxt
            digest = hashlib.sha256(config.encode()).hexdigest()
            if hashed is not None:
                hashed.pop("config.pbtxt", None)
        await self.access.audited(
            caller, key, "repository.load", name, "ok", files=hashed, files_omitted=omitted, config_sha256=digest
        )

    async def unload_model(
        self, name: str, caller: Caller = OPEN_CALLER, parameters: Mapping[str, Any] = EMPTY, repository: str = ""
    ) -> None:
        """``parameters``: the request's (both wires give them as plain values)."""
        key = None
        try:
            key = self.access.check(caller, ADMIN, name)
            self.one_repository(repository)
            check_model_name(name)
            # No ensembles here, so no dependents; but a value that is no boolean is refused, as
            # Triton refuses it, rather than read as anything.
            if UNLOAD_DEPENDENTS in parameters and type(parameters[UNLOAD_DEPENDENTS]) is not bool:
                raise invalid(f"unload parameter '{UNLOAD_DEPENDENTS}' must be true or false")
            if self.coordinator is not None:  # (each process holding models says NOT_FOUND if need be: a
                # front worker knows only the owner's ready models, not one that failed to load there)
                await self.coordinator.unload(name)
            else:
                await self.repository.unload(name)
        except GatewayError as e:
            await self.access.audited(caller, key, "repository.unload", name, e.code.value, e.message)
            raise
        await self.access.audited(caller, key, "repository.unload", name, "ok")

    async def _hashes(self, name: str, uploaded: dict[str, bytes]) -> tuple[dict[str, str] | None, int]:
        """SHA-256 of each file a load used (the uploaded ones, else the model's directory's first
        files), and how many more files there are."""
        if self.access.audit is None:
            return None, 0
        if uploaded:
            return {path: hashlib.sha256(data).hexdigest() for path, data in uploaded.items()}, 0
        root = self.repository.root
        if not root or not os.path.isdir(os.path.join(root, name)):
            return None, 0
        try:
            return await asyncio.to_thread(hash_files, os.path.join(root, name))
        except (OSError, ValueError) as e:
            log.warning("audit: could not hash the files of model '%s': %s", name, e)
            return None, 0


def _shown(served: ModelVersion) -> mc.ModelConfig:
    """A version's config as clients see it: a front worker shows the model owner's (its own is
    the hop's: the workers' batching, an internal socket), as a replicate pod would."""
    owner = getattr(served.backend, "owner_config", None)
    return owner if owner is not None else served.config
