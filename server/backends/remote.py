"""Remote backend: a model served by one or more Open Inference Protocol servers.

Upstreams: anything that answers the V2 gRPC service (Triton, KServe, MLServer, batchgate), called
with batchgate's HTTP/2 client (``h2_client``) or ``grpc.aio``, tensors raw, never JSON. Per call:

- **Which upstream.** The one in rotation with the fewest calls outstanding (ties go round-robin).
  An upstream leaves the rotation when its readiness probe says the model is not ready there (or
  PROBE_FAILURES in a row get no answer, nor do its calls), or after ``eject_after_failures``
  consecutive failed calls (UNAVAILABLE; UNKNOWN, INTERNAL, DATA_LOSS and a timeout while it
  answered nothing, while another is in rotation): ejected for ``eject_s``, then probed, and used
  again only once a probe succeeds. Each failed probe doubles the ejection (to 60 s, or ``eject_s`` if longer).
- **How long.** The caller's deadline, else ``timeout_s``; cancelling the caller cancels the call.
- **Whether to try again.** Only when the request was never delivered (no connection could be
  made): a call that reached the upstream is never sent twice (inference need not be idempotent).
- **What the caller sees.** No upstream in rotation: UNAVAILABLE at once, naming every upstream and
  why it is out. An upstream's INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED or
  RESOURCE_EXHAUSTED keeps its code, with the upstream's message and address.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, ClassVar, Protocol, cast

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from ..config import RemoteModel
from ..core.errors import ConfigError, ErrorCode, GatewayError, ModelRefused, TooLarge
from ..core.types import clip, printable
from ..monitoring.metrics import Metrics
from ..monitoring.tracing import TraceHeaders
from .base import Kind
from .h2_client import H2RpcError
from .upstream import NOT_AN_ANSWER, Upstream
from .upstream_tls import UpstreamSecurity
from .v2_messages import (
    answer_outputs,
    answer_parameters,
    answer_tensors,
    apart,
    config_from_metadata,
    fill_request,
    heavy_answer,
    heavy_request,
    served_config,
    string_field,
    what_is_served,
    with_parameters,
)

log = logging.getLogger("batchgate.remote")

PLATFORM = "remote"
MAX_EJECT_S = 60.0
PROBE_FAILURES = 3  # probes in a row without an answer that take an upstream out (Kubernetes' failureThreshold)
_NO_ANSWER = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)  # (another code is the upstream's word)
# The longest call timeout given to gRPC: gRPC core overflows a deadline past about 1e10 s from
# now into the past (every call then fails at once, DEADLINE_EXCEEDED); 1e8 s is over 3 years.
MAX_CALL_TIMEOUT_S = 1e8
# A caller's cancel this close to its deadline (as batchgate reckons it, from when the call came)
# is its time running out: its own clock started earlier, by the call's way over the network.
DEADLINE_SLACK_S = 0.05
# Characters of an upstream's error message passed on (to callers, logs, reasons): a Python
# model's traceback may run to many KB, and a gRPC client refuses a grpc-message past 16 KiB
# (gRPC core's hard limit; past 8 KiB, at random). 512, even percent-encoded, stays far below.
UPSTREAM_TEXT_LIMIT = 512
SAID_DOWN: dict[str, set[str]] = {}  # model -> upstreams logged "down at start", until seen up or unloaded
# Failures that say the upstream (or the way to it) is unwell, as opposed to the request.
_BREAKER_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
}
# How gRPC core itself says that no connection could be made (the request never left). Only
# the start of its own message counts: an upstream may answer UNAVAILABLE with any text.
# RESOURCE_EXHAUSTED for a message's size: gRPC's "Received message larger than max (N vs. M)"
# (the upstream's limit, or ours on its answer), the h2 client's "...answer is larger than allowed".
_TOO_LARGE = re.compile(r"larger than (max|allowed)", re.IGNORECASE)
_NOT_SENT = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "name resolution failed",
)
_KEPT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED: ErrorCode.CANCELLED,
    grpc.StatusCode.UNIMPLEMENTED: ErrorCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.FAILED_PRECONDITION,  # (MLServer's 422: a request it refused)
}


class _Status(Protocol):
    """What a failed call says, through grpc.aio or a blocking channel."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...


def said(e: _Status, limit: int = UPSTREAM_TEXT_LIMIT) -> str:
    """What an upstream's error says, bounded and on one line (control characters as escapes)."""
    return printable(clip(e.details() or "", limit))


def not_delivered(e: _Status) -> bool:
    """True when gRPC says the connection could not be made, so the upstream never saw the call."""
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return (e.details() or "").lower().startswith(_NOT_SENT)


class RemoteV2Backend:
    """A remote model: executes batches by calling its upstreams (``infer`` is a coroutine)."""

    platform: ClassVar[str] = PLATFORM
    kind: ClassVar[Kind] = "remote"

    def __init__(
        self,
        spec: RemoteModel,
        metrics: Metrics,
        max_message_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spec = spec
        self._clock = clock
        # TLS and token files: read here, watched by the probe loop. Unusable (changed since the
        # server started): no upstream is set up, and open() fails naming the file.
        self.security: UpstreamSecurity | None = None
        self._unusable = ""
        try:
            self.security = UpstreamSecurity(spec) if spec.tls or spec.token_file else None
        except ConfigError as e:
            self._unusable = str(e)
        addresses = () if self._unusable else spec.upstreams
        self.upstreams = [
            Upstream(a, spec, metrics.upstream(spec.name, a), max_message_bytes, self.security) for a in addresses
        ]
        self._turn = 0
        self._prober: asyncio.Task | None = None
        self._closed = False
        self._retired: set[asyncio.Future] = set()  # the closing of channels a TLS reload replaced
        self.version = spec.upstream_version  # the upstream version served; filled by open()
        self._loaded: tuple | None = None  # what the upstream served when the model was loaded (_served)
        # Called once when every upstream serves another version or signature: the repository loads it again
        self.on_change: Callable[[], None] | None = None
        self._in_types: dict[str, str] = {}
        self._out_types: dict[str, str] = {}
        self._out_shapes: dict[str, tuple[int, ...]] = {}  # (-1: any size; the batch dimension first)
        # Appended to a forwarded request's bytes: the upstream's model name and version (a singular
        # protobuf field given twice takes its last value: the caller's replaced, not re-encoded).
        self.forward_suffix = string_field(1, spec.target) + string_field(2, spec.upstream_version)
        self.raw_forwarding = spec.forwarding == "raw"  # the remote model's setting (remote_models.py)
        self.sequences = False  # sequences or shape tensors upstream: each request goes as it came (shadows too)
        self.owner_config: mc.ModelConfig | None = None  # front mode: the model owner's, what clients are shown

    # ------------------------------------------------------------------ loading
    async def open(self) -> mc.ModelConfig:
        """Probe every upstream, read the model's metadata and config from one that is ready,
        and start probing in the background. UNAVAILABLE when no upstream serves the model."""
        if self._unusable:  # (TLS or token files that changed since the start: no upstream was set up)
            raise GatewayError(ErrorCode.UNAVAILABLE, self._unusable)
        await self.probe_all()
        problems = []
        for up in self.upstreams:
            if not up.ready:
                problems.append(f"{up.address}: {up.why}")
                continue
            try:
                cfg = await self._read_config(up)
            except grpc.aio.AioRpcError as e:
                problems.append(f"{up.address}: {e.code().name}: {said(e, 256)}")
                continue
            except GatewayError as e:
                await self.close()
                raise GatewayError(ErrorCode.UNAVAILABLE, f"{up.address}: {e.message}") from None
            except BaseException:
                await asyncio.shield(self.close())
                raise
            self._prober = asyncio.ensure_future(self._probe_loop())
            return cfg
        await self.close()
        raise GatewayError(
            ErrorCode.UNAVAILABLE, f"no upstream serves model '{self.spec.target}': " + "; ".join(problems)
        )

    async def _read_config(self, up: Upstream) -> mc.ModelConfig:
        spec = self.spec
        meta = await up.stub.ModelMetadata(
            pb.ModelMetadataRequest(name=spec.target, version=spec.upstream_version), timeout=5
        )
        served = what_is_served(meta, spec.upstream_version)
        self._loaded, self.version = (*served, None), served[0]
        try:
            got = await up.stub.ModelConfig(
                pb.ModelConfigRequest(name=spec.target, version=spec.upstream_version), timeout=5
            )
            cfg = mc.ModelConfig()
            cfg.CopyFrom(got.config)
            if (not cfg.input or not cfg.output) and (meta.inputs or meta.outputs):
                raise ValueError("the config lists no inputs or outputs")
            self._loaded = (*served, cfg.max_batch_size)  # (followed by the probes: see _probe)
        except (grpc.aio.AioRpcError, ValueError) as e:
            # Not every V2 server has Triton's config extension: build it from the metadata.
            log.info(
                "model '%s': upstream %s gives no usable config (%s); using its metadata",
                spec.name,
                up.address,
                said(e, 256) if isinstance(e, grpc.aio.AioRpcError) else e,
            )
            cfg = config_from_metadata(meta, spec.max_batch_size)
        if not cfg.input or not cfg.output:
            log.info(
                "model '%s': upstream %s declares no %s; requests are forwarded unchecked (%s)",
                spec.name,
                up.address,
                "inputs or outputs" if not cfg.input and not cfg.output else "inputs" if not cfg.input else "outputs",
                f"batched by the gateway, up to {spec.max_batch_size} rows"
                if spec.batching == "gateway" and spec.max_batch_size > 0
                else "each request sent as it came",
            )
            if spec.batching != "gateway" or not spec.max_batch_size:
                cfg.max_batch_size = 0
            elif not cfg.max_batch_size:
                cfg.max_batch_size = spec.max_batch_size
        return self._our_config(cfg)

    def _our_config(self, upstream: mc.ModelConfig) -> mc.ModelConfig:
        """The upstream's config, as batchgate serves it (see ``served_config``)."""
        served = served_config(self.spec, upstream)
        self.owner_config = None
        if self.spec.tells_requests:  # (a front worker's: the owner's config, under our name)
            self.owner_config = mc.ModelConfig()
            self.owner_config.CopyFrom(upstream)
            self.owner_config.name = self.spec.name
        self.sequences = served.one_by_one  # (shadow copies too go one by one then)
        if self.spec.batching == "gateway" and served.one_by_one:
            log.info("model '%s': the upstream %s; each request is sent as it came", self.spec.name, served.why)
        self._in_types, self._out_types, self._out_shapes = served.in_types, served.out_types, served.out_shapes
        return served.config

    # ------------------------------------------------------------------ health
    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(up) for up in self.upstreams))
        # Every upstream in rotation now serves another version or signature than the one loaded
        # (a Triton that loaded version 2, say): the model is loaded again from them, once. While
        # they disagree (a rolling upgrade half done) it serves on as loaded.
        seen = {up.serves for up in self.upstreams if up.in_rotation and up.serves is not None}
        if self.on_change is not None and len(seen) == 1 and self._loaded is not None:
            now = seen.pop()
            if now != self._loaded:
                on_change, self.on_change = self.on_change, None
                if now[0] != self._loaded[0]:
                    what = f"version {self._loaded[0]} -> {now[0]}"
                else:
                    what = "inputs or outputs" if now[:-1] != self._loaded[:-1] else f"max_batch_size -> {now[-1]}"
                log.info("model '%s': its upstreams changed (%s); loading it again", self.spec.name, what)
                on_change()

    async def _probe(self, up: Upstream) -> None:
        now, was_ejected = self._clock(), up.ejected
        seen, up.probe_seen = up.probe_seen, up.answered  # (calls it answered since the last probe: it serves)
        if was_ejected and now < up.ejected_until:
            return
        timeout = min(2.0, max(0.2, self.spec.probe_interval_s))
        try:
            request = {"name": self.spec.target, "version": self.spec.upstream_version}
            resp = await up.stub.ModelReady(pb.ModelReadyRequest(**request), timeout=timeout)
            up.probes_failed = 0
            ok, why = resp.ready, "" if resp.ready else f"model '{self.spec.target}' is not ready there"
            if ok and self.on_change is not None:
                try:
                    meta = await up.stub.ModelMetadata(pb.ModelMetadataRequest(**request), timeout=timeout)
                    batch = await self._batch(up, request, timeout)
                    up.serves = (*what_is_served(meta, self.spec.upstream_version), batch)
                except grpc.aio.AioRpcError:
                    pass  # (read to follow a change, not to judge readiness: the next probe reads it again)
        except grpc.aio.AioRpcError as e:
            ok, why = False, f"{e.code().name}: {said(e, 256)}"
            # A busy server answers calls and probes late: PROBE_FAILURES in a row while no call got an
            # answer either take it out (until 2026-12-06 one did, a model's only upstream included)
            up.probes_failed = 0 if up.answered != seen else up.probes_failed + 1
            if up.in_rotation and up.probes_failed < PROBE_FAILURES and e.code() in _NO_ANSWER:
                return
        if up.ejected and not was_ejected:
            # A call ejected it while this probe waited: the answer predates that, and letting it
            # back in at once made the ejection last a moment (until 2026-12-06) instead of eject_s.
            return
        name, addr = self.spec.name, up.address
        if up.ejected:
            if ok:
                log.info("upstream %s of model '%s' rejoined the rotation: its probe succeeded", addr, name)
                up.ejected, up.failures, up.eject_s = False, 0, self.spec.eject_s
            else:  # still unwell: out for longer (up to 60 s; an eject_s beyond that is kept, never shortened)
                up.eject_s = min(max(MAX_EJECT_S, self.spec.eject_s), up.eject_s * 2)
                up.ejected_until = self._clock() + up.eject_s
                up.why = f"ejected, probe failed ({why}); next probe in {up.eject_s:g} s"
                log.warning("upstream %s of model '%s': probe failed (%s); next in %g s", addr, name, why, up.eject_s)
        elif not up.probed:  # (said once for a model's retried loads, until the upstream is seen up)
            if not ok and addr not in SAID_DOWN.setdefault(name, set()):
                SAID_DOWN[name].add(addr)
                log.warning("upstream %s of model '%s' is down at start: %s", addr, name, why)
        elif up.ready and not ok:
            log.warning("upstream %s of model '%s' left the rotation: %s", addr, name, why)
        elif ok and not up.ready:
            log.info("upstream %s of model '%s' rejoined the rotation: the model is ready there", addr, name)
        if ok:
            SAID_DOWN.get(name, set()).discard(addr)
        up.probed = True
        up.ready = ok
        if not ok and not up.ejected:
            up.why = why
        up.update_gauge()

    async def _batch(self, up: Upstream, request: dict, timeout: float) -> int | None:
        """The upstream's max_batch_size now, followed as the version is: a Triton that reloaded
        the model with a smaller one refused every batch batchgate made of the old size, until a
        restart. None for an upstream without Triton's config extension (loaded from metadata); as
        last seen when its config cannot be read now."""
        if self._loaded is None or self._loaded[-1] is None:
            return None
        try:
            got = await up.stub.ModelConfig(pb.ModelConfigRequest(**request), timeout=timeout)
            return got.config.max_batch_size
        except grpc.aio.AioRpcError:
            return self._loaded[-1] if up.serves is None else up.serves[-1]

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.spec.probe_interval_s)
            try:
                if self.security is not None and await self.security.reload_if_changed():
                    self._renew()
                await self.probe_all()
            except Exception:  # pragma: no cover - probing must go on whatever happens
                log.exception("probing the upstreams of model '%s' failed", self.spec.name)

    def _renew(self) -> None:
        """New TLS files: each upstream's next connections use them; the calls on the old
        grpc.aio channels may end within their timeout before those channels close."""
        old = [up.renew() for up in self.upstreams]
        grace = min(MAX_EJECT_S, self.spec.timeout_s)
        closing = asyncio.ensure_future(asyncio.gather(*(c.close(grace) for c in old), return_exceptions=True))
        self._retired.add(closing)  # (a task only the loop refers to may be collected before it ends)
        closing.add_done_callback(self._retired.discard)

    def ready(self) -> bool:
        return any(up.in_rotation for up in self.upstreams)

    def not_ready_reason(self) -> str:
        return "no upstream in rotation: " + "; ".join(f"{u.address} ({u.why})" for u in self.upstreams)

    def unavailable(self) -> GatewayError:
        return GatewayError(ErrorCode.UNAVAILABLE, f"model '{self.spec.name}': {self.not_ready_reason()}")

    def _pick(self, exclude: list[Upstream]) -> Upstream | None:
        best = None
        n = len(self.upstreams)
        self._turn = (self._turn + 1) % n
        for i in range(n):
            up = self.upstreams[(self._turn + i) % n]
            if up.in_rotation and up not in exclude and (best is None or up.outstanding < best.outstanding):
                best = up
        return best

    def _count_failure(self, up: Upstream, e: _Status, seen: int, budget_s: float) -> None:
        """A failed call: counted by its code; a code that says the upstream is unwell counts towards
        ejecting it. Only a call that never reached the upstream (it could not be connected to)
        counts always; the others (INTERNAL, UNKNOWN, which a request's own values may cause, and an
        UNAVAILABLE the upstream answered, as Triton does with a full queue or a request's timeout)
        count only while another upstream is in rotation: neither a caller nor a moment's overload
        takes the model's last one away (its probe does, when the model is not ready there).

        A DEADLINE_EXCEEDED counts (so with another in rotation) only when the upstream answered
        nothing at all while the call waited (``seen``: its answers when the call began) and the
        call had ten times its usual time: it hangs, its readiness probe still answering. Until
        2026-12-06 no timeout counted, and a hung upstream took its share of the calls for good; a
        caller's short deadline, or a slow upstream that answers others, is not its fault."""
        code = e.code()
        up.metrics.errors[code.name] = up.metrics.errors.get(code.name, 0) + 1
        others = any(u.in_rotation for u in self.upstreams if u is not up)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            self._timed_out(up, seen, budget_s, e)
            return
        if not not_delivered(e):
            up.answered += 1
        if code in _BREAKER_CODES and (others or not_delivered(e)):
            self._failed(up, e)

    def _timed_out(self, up: Upstream, seen: int, budget_s: float, e: _Status) -> None:
        """A call out of time (its own timeout, or its caller's deadline cancelling it): see
        :meth:`_count_failure`."""
        if any(u.in_rotation for u in self.upstreams if u is not up) and up.hangs(seen, budget_s):
            self._failed(up, e)

    def _failed(self, up: Upstream, e: _Status) -> None:
        up.failures += 1
        if up.failures >= self.spec.eject_after_failures and not up.ejected:
            up.ejected = True
            up.ejected_until = self._clock() + up.eject_s
            up.why = (
                f"ejected after {up.failures} consecutive failures, "
                f"last {e.code().name}: {said(e, 256)}; "
                f"probed again in {up.eject_s:g} s"
            )
            up.metrics.ejections += 1
            up.update_gauge()
            log.warning("upstream %s of model '%s' %s", up.address, self.spec.name, up.why)

    # ------------------------------------------------------------------ inference
    def request(
        self, feeds: dict[str, np.ndarray], names: tuple[str, ...], request_id: str = "", types: dict | None = None
    ) -> pb.ModelInferRequest:
        """The upstream's request; ``types``: the inputs' V2 datatypes when the model declares
        none (an open signature), else those of its config."""
        msg = pb.ModelInferRequest(model_name=self.spec.target, model_version=self.spec.upstream_version, id=request_id)
        return fill_request(msg, feeds, self._in_types if types is None else types, names)

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        names: tuple[str, ...],
        deadline: float | None,
        request_id: str = "",
        trace: TraceHeaders | None = None,
        params: Mapping[str, Any] | None = None,
        input_params: Mapping[str, Mapping[str, Any]] | None = None,
        answered: dict | None = None,
    ) -> list[np.ndarray]:
        """Run one batch on an upstream; ``deadline`` is on this backend's monotonic clock;
        ``trace``: the batch's W3C trace context headers, sent on (the upstream's spans join the
        trace); ``params``, ``input_params``: the batch's request and input parameters;
        ``answered`` gets the answer's parameters ("": its own, else by output name)."""
        msg = await apart(heavy_request(feeds), self.request, feeds, names, request_id)
        up, resp = await self._call(with_parameters(msg, params, input_params), deadline, trace=trace)
        answer_parameters(resp, answered)
        return await apart(heavy_answer(resp), self._outputs, up, resp, names)

    def _outputs(self, up: Upstream, resp: pb.ModelInferResponse, names: tuple[str, ...]) -> list[np.ndarray]:
        """The outputs ``names`` of an answer, in order, as the signature declares them."""
        return answer_outputs(up.address, resp, names, self._out_types, self._out_shapes)

    async def infer_apart(
        self, feeds: dict[str, np.ndarray], names: tuple[str, ...], deadline: float | None, executor: Executor, *params
    ) -> list[np.ndarray]:
        """:meth:`infer` for work that must take none of the event loop's time (a shadow's copies):
        the request is built, sent over a synchronous channel and its answer decoded on a thread of
        ``executor`` (a gRPC call through grpc.aio costs the loop about as much as answering a
        request); ``params``: :meth:`infer`'s ``params`` and ``input_params``. One upstream, no
        retry; counted, ejecting and translated like any other call."""
        up = self._pick([])
        if up is None:
            raise self.unavailable()
        at = self._clock() + self.spec.timeout_s if deadline is None else deadline
        call, m = up.blocking_infer(), up.metrics
        up.outstanding += 1
        m.outstanding += 1
        m.requests += 1
        t0, seen, budget = time.perf_counter(), up.answered, at - self._clock()
        try:
            got = await asyncio.get_running_loop().run_in_executor(
                executor, self._blocking_call, up, call, feeds, names, at, *params
            )
        except grpc.RpcError as e:
            status = cast(_Status, e)  # a blocking call's error is also its grpc.Call
            self._count_failure(up, status, seen, budget)
            raise self._translate(up, status) from None
        finally:
            up.outstanding -= 1
            m.outstanding -= 1
            m.latency.observe(time.perf_counter() - t0)
        up.answered_well(time.perf_counter() - t0)
        return got

    def _blocking_call(
        self, up: Upstream, call: Callable[..., pb.ModelInferResponse], feeds, names: tuple, at: float, *params
    ) -> list[np.ndarray]:
        """(on an executor's thread) one blocking ModelInfer before the monotonic time ``at``
        (judged here: the executor may have kept the call waiting): the outputs ``names``."""
        timeout = min(MAX_CALL_TIMEOUT_S, at - self._clock())
        if timeout <= 0:
            raise GatewayError(ErrorCode.DEADLINE_EXCEEDED, f"deadline exceeded before model '{self.spec.name}' ran")
        msg = with_parameters(self.request(feeds, names), *params)
        return self._outputs(up, call(msg, timeout=timeout), names)

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
        """Run one batch of a model that declares no signature: the inputs' datatypes and the
        request's and inputs' parameters are the caller's, ``names`` () asks for every output,
        and the answer is every output the upstream gave, by name: (V2 datatype, array)."""
        msg = await apart(heavy_request(feeds), self.request, feeds, names, request_id, types)
        up, resp = await self._call(with_parameters(msg, params, input_params), deadline, trace=trace)
        answer_parameters(resp, answered)
        return await apart(heavy_answer(resp), answer_tensors, up.address, resp)

    async def forward(self, request: bytes, deadline: float | None, trace: TraceHeaders | None = None) -> bytes:
        """Send a caller's serialized ModelInferRequest on as it came, but for the model name and
        version (see ``forward_suffix``), and return the upstream's serialized answer. The same
        choice of upstream, ejection, retry and error translation as :meth:`infer`."""
        return (await self._call(request + self.forward_suffix, deadline, raw=True, trace=trace))[1]

    async def _call(self, msg, deadline: float | None, raw: bool = False, trace: TraceHeaders | None = None):
        """(the upstream that answered, its answer): a ModelInferResponse, or its bytes with ``raw``."""
        tried: list[Upstream] = []
        last: GatewayError | None = None
        while True:
            up = self._pick(tried)
            if up is None:
                raise last or self.unavailable()
            timeout = min(MAX_CALL_TIMEOUT_S, self.spec.timeout_s if deadline is None else deadline - self._clock())
            if timeout <= 0:
                raise GatewayError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"deadline exceeded before model '{self.spec.name}' could call an upstream",
                )
            m = up.metrics
            up.outstanding += 1
            m.outstanding += 1
            m.requests += 1
            t0, seen = time.perf_counter(), up.answered
            try:
                resp = await (up.raw_infer if raw else up.model_infer)(msg, timeout=timeout, metadata=trace)
                if resp is None:  # (grpc.aio's answer, when the bytes it got were no ModelInferResponse)
                    raise H2RpcError(grpc.StatusCode.INTERNAL, NOT_AN_ANSWER)
            except grpc.aio.AioRpcError as e:
                self._count_failure(up, e, seen, timeout)
                if not_delivered(e) and len(tried) < self.spec.retries:
                    tried.append(up)
                    last = self._translate(up, e)
                    continue
                raise self._translate(up, e) from None
            except asyncio.CancelledError:  # the caller went away, or its deadline came; gRPC cancels the call upstream
                m.errors["CANCELLED"] = m.errors.get("CANCELLED", 0) + 1
                if deadline is not None and self._clock() >= deadline - min(DEADLINE_SLACK_S, timeout / 4):
                    self._timed_out(
                        up, seen, timeout, H2RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time")
                    )
                raise
            finally:
                up.outstanding -= 1
                m.outstanding -= 1
                m.latency.observe(time.perf_counter() - t0)
            up.answered_well(time.perf_counter() - t0)
            return up, resp

    def _translate(self, up: Upstream, e: _Status) -> GatewayError:
        code = _KEPT_CODES.get(e.code(), ErrorCode.INTERNAL)
        message = f"upstream {up.address} ({e.code().name}): {said(e)}"
        if code is ErrorCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(e.details() or ""):
            return TooLarge(message)  # (an answer past our limit, or a call past the upstream's)
        return ModelRefused(message) if code is ErrorCode.INVALID_ARGUMENT else GatewayError(code, message)

    # ------------------------------------------------------------------ the rest of the Backend protocol
    def providers(self) -> list[str]:
        return [f"upstreams {', '.join(self.spec.upstreams)} ({self.spec.batching} batching)"]

    async def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
        await asyncio.gather(*(up.channel.close() for up in self.upstreams), return_exceptions=True)
        await asyncio.gather(*(up.h2.close() for up in self.upstreams if up.h2 is not None), return_exceptions=True)
        for up in self.upstreams:
            up.close_blocking()
            up.ready = False
            if up.metrics.owner is up:  # not when a newer backend (a reload) reports this upstream
                up.update_gauge()


__all__ = ["RemoteV2Backend", "config_from_metadata", "not_delivered", "string_field", "PLATFORM"]
