"""The V2 gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

Wire types come from tritonclient's generated modules. Errors are mapped to a
gRPC status in exactly one table, :data:`GRPC_STATUS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..core.errors import ErrorCode, GatewayError, cancelled_code, invalid
from ..core.routing import PIN_HEADER as VARIANT_HEADER
from ..core.types import (
    FINAL_RESPONSE,
    FINAL_RESPONSE_REQUESTED,
    OFFLINE_HEADER,
    REQUEST_ID_HEADER,
    REQUESTS_HEADER,
    InferRequest,
    caller_headers,
    clip,
    printable,
    weight_of,
)
from ..dataplane import PRECHECK_BYTES, DataPlane
from ..monitoring.access_log import Note
from ..monitoring.trace_context import trace_context
from ..security.access import OPEN_CALLER, Caller
from ..security.limits import Held
from ..shm import REGION as SHM_REGION
from ..shm import RegionView
from . import grpc_codec
from .grpc_status import GRPC_STATUS, caller_of, retry_metadata
from .grpc_status import abort as _abort

log = logging.getLogger("batchgate.grpc")


_monotonic = time.monotonic
_decoded = grpc_codec.decode_request  # (typed contents are read value by value)
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
SHM_MARK = SHM_REGION.encode()  # in a request's bytes when it names a shared-memory region
_REFUSALS: dict[tuple, tuple] = {}  # overload refusals' (status, words, metadata), by words and Retry-After


async def _encoded(resp, written) -> pb.ModelInferResponse:
    """The answer's message; a large one made on a thread (the event loop serves others meanwhile)."""
    if grpc_codec.heavy_answer(resp, written):
        return await asyncio.to_thread(grpc_codec.encode_response, resp, written)
    return grpc_codec.encode_response(resp, written)


def _metadata(context, name: str) -> str | None:
    """One metadata value of the call (the pin and sticky headers of a route)."""
    return _find(context.invocation_metadata() or (), name)


def _find(md, name: str) -> str | None:
    """One value in the call's metadata as read once (grpc.aio builds the pairs afresh on each
    ``invocation_metadata()``: a request reads them once and looks up here)."""
    for k, v in md:
        if k == name:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def _request_id(msg, headers) -> str:
    """The id a failure is answered and logged with: the V2 id, else x-request-id."""
    return msg.id or (headers.get("x-request-id", "") if headers else "")


def _parse(raw: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(raw)
    except DecodeError as e:
        raise invalid(f"the request is not a valid inference.ModelInferRequest message: {e}") from None


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, max_stream_inflight: int = 64):
        self.dp = dataplane
        self.max_stream_inflight = max_stream_inflight

    # ------------------------------------------------------------ health and metadata
    def _caller(self, context) -> Caller:
        return caller_of(context) if self.dp.access.enforcing else OPEN_CALLER

    async def ServerLive(self, request, context):
        try:
            return pb.ServerLiveResponse(live=self.dp.live(self._caller(context)))
        except GatewayError as e:
            return await _abort(context, e)

    async def ServerReady(self, request, context):
        try:
            return pb.ServerReadyResponse(ready=self.dp.ready(self._caller(context)))
        except GatewayError as e:
            return await _abort(context, e)

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(
                ready=self.dp.model_ready(request.name, request.version, self._caller(context))
            )
        except GatewayError as e:
            return await _abort(context, e)

    async def ServerMetadata(self, request, context):
        try:
            m = self.dp.server_metadata(self._caller(context))
        except GatewayError as e:
            return await _abort(context, e)
        return pb.ServerMetadataResponse(name=m["name"], version=m["version"], extensions=m["extensions"])

    async def ModelMetadata(self, request, context):
        try:
            m = self.dp.model_metadata(request.name, request.version, self._caller(context))
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"])
        for key in ("inputs", "outputs"):
            for t in m[key]:
                getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelConfig(self, request, context):
        try:
            config = self.dp.model_config(request.name, request.version, self._caller(context))
        except GatewayError as e:
            return await _abort(context, e)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        try:
            stats = await self.dp.statistics_of_all(request.name, request.version, self._caller(context))
        except GatewayError as e:
            return await _abort(context, e)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    # ------------------------------------------------------------ repository
    async def RepositoryIndex(self, request, context):
        try:
            rows = self.dp.repository_index(request.ready, self._caller(context), request.repository_name)
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.RepositoryIndexResponse()
        for r in rows:
            resp.models.add(**r)
        return resp

    async def RepositoryModelLoad(self, request, context):
        params = grpc_codec.parameters_of(request.parameters)
        try:
            await self.dp.load_model(request.model_name, params, caller_of(context), request.repository_name)
        except GatewayError as e:
            return await _abort(context, e)
        except Exception:  # a bug answers INTERNAL with a message, not grpc's bare UNKNOWN
            log.exception("gRPC load of model '%s' failed", printable(clip(request.model_name)))
            return await _abort(context, GatewayError(ErrorCode.INTERNAL, "internal error; see the server log"))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        params = grpc_codec.parameters_of(request.parameters)
        try:
            await self.dp.unload_model(request.model_name, caller_of(context), params, request.repository_name)
        except GatewayError as e:
            return await _abort(context, e)
        except Exception:
            log.exception("gRPC unload of model '%s' failed", printable(clip(request.model_name)))
            return await _abort(context, GatewayError(ErrorCode.INTERNAL, "internal error; see the server log"))
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------ shared memory, logging, trace
    async def SystemSharedMemoryStatus(self, request, context):
        try:
            regions = self.dp.shm_status(request.name, self._caller(context))
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in regions:
            resp.regions[r["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**r))
        return resp

    async def SystemSharedMemoryRegister(self, request, context):
        try:
            await self.dp.shm_register(request.name, request.key, request.offset, request.byte_size, caller_of(context))
        except GatewayError as e:
            return await _abort(context, e)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        try:
            await self.dp.shm_unregister(request.name, caller_of(context))
        except GatewayError as e:
            return await _abort(context, e)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def _cuda(self, request, context):
        try:
            self.dp.cuda_shared_memory()
        except GatewayError as e:
            return await _abort(context, e)

    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _cuda

    async def TraceSetting(self, request, context):
        changes = {}
        for key, value in list(request.settings.items())[:64]:
            changes[key] = list(value.value) if value.value else None  # no value: clear a model's own
        try:
            now = await self.dp.trace_settings(request.model_name, changes, caller_of(context))
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.TraceSettingResponse()
        for key, v in now.items():
            resp.settings[key].value.extend(v if isinstance(v, list) else [str(v)])
        return resp

    async def LogSettings(self, request, context):
        changes = {}
        for key, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            changes[key] = getattr(value, kind) if kind else None
        try:
            now = await self.dp.log_settings(changes, caller_of(context))
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.LogSettingsResponse()
        for key, v in now.items():
            field = "bool_param" if type(v) is bool else "uint32_param" if type(v) is int else "string_param"
            setattr(resp.settings[key], field, v)
        return resp

    # ------------------------------------------------------------ inference
    async def _decode(self, msg, size: int, context, headers, shm: RegionView | None, note, precheck) -> InferRequest:
        """The request in ``msg`` (``size`` bytes: past PRECHECK_BYTES, or with many values read one by
        one, on a thread), its deadline the earlier of its V2 timeout and the call's; ``shm``: the
        caller's regions."""
        args = (msg, _monotonic(), self.dp.limits, headers, grpc_codec.call_deadline(context), shm, note, precheck)
        apart = size > PRECHECK_BYTES or grpc_codec.many_values(msg)
        return await asyncio.to_thread(_decoded, *args) if apart else _decoded(*args)

    def quick_refusal(self, raw: bytes, peer: str) -> tuple[grpc.StatusCode, str, tuple] | None:
        """A ModelInfer refused for overload before it is parsed: status, message and trailing
        metadata, or None to take the whole path (see ``DataPlane.quick_refusal``). Used by the
        h2 engine, which then answers without a call object, task or exception: under overload
        most requests are refused, and a refusal must cost a small part of an answer."""
        dp = self.dp
        if not dp.shedding():  # nothing refused lately: the usual way, with nothing judged twice
            return None
        name = grpc_codec.peek_model_name(raw)
        if name is None:
            return None
        e = dp.quick_refusal(name, "grpc")
        if not isinstance(e, GatewayError):
            return None
        dp.log_failure("grpc", name, "", e)
        refusal = _REFUSALS.get(key := (e.message, e.retry_after_s))
        if refusal is None:  # (the same few words, refusal after refusal: the answer is made once)
            if len(_REFUSALS) >= 64:  # (messages with figures in them vary)
                _REFUSALS.clear()
            refusal = _REFUSALS[key] = (GRPC_STATUS[e.code], e.message, retry_metadata(e))
        alog = dp.access_log
        if alog is not None and alog.overload_wanted():
            alog.request(
                None, "grpc", name, refusal[0].name, e.code.value, lambda: (peer, None), path=MODEL_INFER, sampled=True
            )
        return refusal

    async def ModelInfer(self, raw: bytes, context):
        alog, tracing = self.dp.access_log, self.dp.tracing
        if alog is None and tracing is None:
            return await self._model_infer(raw, context, None)
        note, since = Note(), _monotonic()
        note.bytes_in = len(raw)
        status = "OK"
        try:
            note.answer = answer = await self._model_infer(raw, context, note)
            # (an error with no AbortError: grpc.aio's abort of a call already over returns)
            status = GRPC_STATUS[ErrorCode(note.error)].name if note.error else "OK"
            return answer
        except grpc.aio.AbortError:
            status = GRPC_STATUS[ErrorCode(note.error)].name if note.error else "UNKNOWN"
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline came
            status = note.error = cancelled_code(grpc_codec.call_deadline(context), since).value
            raise
        finally:
            self._noted(note, status, context, MODEL_INFER)

    def _noted(self, note: Note, status: str, context, method: str, who=None) -> None:
        """End an answered request's span and write its access line, when wanted. ``who``: the
        caller's address and key id, when they were read before (a stream's requests may end
        after the call: its context must not be read then)."""
        if note.span is not None:
            note.tracing.finish(note.span, note, status, note.error)
        alog = self.dp.access_log
        if alog is not None:
            alog.request(note, "grpc", note.model, status, note.error, who or (lambda: self._who(context)), path=method)

    def _who(self, context) -> tuple[str, str | None]:
        """The caller's address and key id (read only for a line that is written)."""
        caller = caller_of(context)
        return caller.peer, self.dp.key_id(caller)

    def _observe(self, note: Note, msg, headers, md) -> None:
        """Name a stream request's model and id in its note and start its span when it is traced
        (a span that cannot be started leaves the request untraced, never unanswered)."""
        note.model = msg.model_name
        note.request_id = _request_id(msg, headers)
        if self.dp.tracing is not None:
            try:
                self._trace(note, md)
            except Exception as e:  # noqa: BLE001 - tracing must never cost a request its answer
                note.span = None
                log.debug("a stream request could not be traced: %s", e)

    def _trace(self, note: Note, md) -> None:
        """Start the request's span when it is traced (``md``: the call's metadata pairs)."""
        tracing = self.dp.tracing
        assert tracing is not None
        note.span = tracing.begin(note.model, *trace_context(md), "grpc", note.start)
        if note.span is not None:
            note.tracing = tracing

    async def _model_infer(self, raw: bytes, context, note: Note | None):
        request = headers = None
        since = _monotonic()
        dp = self.dp
        md = context.invocation_metadata() or ()
        try:
            request = _parse(raw)
            if note is not None:
                note.model = request.model_name
                note.request_id = request.id or _find(md, REQUEST_ID_HEADER) or ""
                if dp.tracing is not None:
                    self._trace(note, md)
            caller = caller_of(context) if dp.access.enforcing else OPEN_CALLER
            served = dp.admit(  # before any tensor is decoded
                request.model_name, request.model_version, caller, lambda name: _find(md, name)
            )
            if note is not None and note.span is not None:
                note.span.add_event("ADMITTED")
            try:
                sampled = None if dp.drift is None else dp.drift_sampled(served, request.model_name)  # (once)
                # (drift's samples and batch scoring's requests go the decoded way: those counted, never sampled)
                forwarded = (
                    None
                    if sampled or _find(md, OFFLINE_HEADER)
                    else dp.forward(
                        served,
                        raw,
                        request,
                        context.time_remaining(),
                        note and note.span,
                        md,
                    )
                )
                if forwarded is not None:  # a remote model's request, sent on as it came
                    return await forwarded
                headers = caller_headers(md, dp.limits)
                shm = dp.shm_view(caller) if SHM_MARK in raw else None  # the caller's own regions
                check = dp.precheck(served, len(raw), shm is not None)
                decoded = await self._decode(request, len(raw), context, headers, shm, note, check)
                if dp.weighs_calls:  # a front worker's call: the client requests it merged
                    decoded = decoded._replace(weight=weight_of(_find(md, REQUESTS_HEADER)))
                resp = await dp.infer(served, decoded, sampled)
            finally:
                dp.release(served)
            if resp.parameters:  # answered through a route: which variant answered
                context.set_trailing_metadata(((VARIANT_HEADER, str(resp.parameters.get("variant", ""))),))
            if note is not None:
                note.version = resp.model_version
                if resp.parameters:
                    note.variant = str(resp.parameters.get("variant", ""))
            return await _encoded(resp, decoded.sink.written if decoded.sink is not None else None)
        except GatewayError as e:
            if note is not None:
                note.error = e.code.value
            self.dp.count_error("grpc", e)
            if request is not None:
                rid = _request_id(request, headers) or (_find(md, REQUEST_ID_HEADER) or "")  # (refused at the head)
                self.dp.log_failure("grpc", request.model_name, rid[:128], e)
            return await _abort(context, e)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:  # (counted with the errors when it is the call's deadline)
            if cancelled_code(grpc_codec.call_deadline(context), since) is ErrorCode.DEADLINE_EXCEEDED:
                self.dp.count_error("grpc", GatewayError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded"))
            raise
        except Exception as e:  # a bug answers INTERNAL with a message, not grpc's bare UNKNOWN
            log.exception("gRPC infer to model '%s' failed", request.model_name[:128] if request else "?")
            error = GatewayError(ErrorCode.INTERNAL, f"internal error: {e}")
            if note is not None:
                note.error = error.code.value
            self.dp.count_error("grpc", error)
            return await _abort(context, error)

    async def ModelStreamInfer(self, request_iterator, context):
        """Answer each request of the stream in the order the requests came, as Triton answers a
        non-decoupled model's; a bad request gets ``error_message`` and the stream goes on.

        At most ``max_stream_inflight`` requests of one stream are read and not yet answered
        on the wire: past that the next one is not read until an answer has been written, so
        a client that sends without reading is slowed by HTTP/2 flow control instead of
        piling answers up in the server's memory."""
        out: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_stream_inflight)
        pending: set[asyncio.Task] = set()
        running: set[asyncio.Task] = set()  # the requests admitted and not yet answered
        read_error: list[BaseException] = []
        caller = self._caller(context)
        md = context.invocation_metadata() or ()
        try:
            self.dp.access.check_stream(caller)  # (a stranger holds no stream open)
            headers = caller_headers(md, self.dp.limits)
        except GatewayError as e:
            self.dp.count_error("grpc", e)
            await context.abort(GRPC_STATUS[e.code], e.message)

        # Each request of a stream is logged and traced as a unary call is (its parent: the
        # stream's traceparent, when the call carried one).
        observed = self.dp.access_log is not None or self.dp.tracing is not None
        method = "inference.GRPCInferenceService/ModelStreamInfer"
        # read once, while the call is alive: a request's line may be written after it ended
        # (gRPC's auth context read then crashes the process)
        ident = self._who(context) if self.dp.access_log is not None else ("", None)
        deadline, since = grpc_codec.call_deadline(context), _monotonic()

        def finished(note: Note, task: asyncio.Task) -> None:
            # (here, not in ``one``: a task cancelled before its first step never runs its body)
            if task.cancelled():  # the stream went away before the answer, or its deadline came
                status = note.error = cancelled_code(deadline, since).value
            else:
                status = GRPC_STATUS[ErrorCode(note.error)].name if note.error else "OK"
            self._noted(note, status, context, method, lambda: ident)

        async def admitted(msg):
            # Refused for overload while others of this stream's requests are admitted and
            # unanswered, a request waits for one of them to finish and is judged again: the
            # stream slows to what the model answers, and its client is refused only what it
            # sends with nothing of its own in flight (a refusal that became a wait is counted
            # nowhere). Only admitted ones are waited for: two waiting requests never wait on
            # each other.
            again = False
            while True:
                try:
                    served = self.dp.admit(msg.model_name, msg.model_version, caller, headers.get, not running, again)
                    running.add(asyncio.current_task())
                    return served
                except Held:  # (raised only while ``running`` holds others: counted refusals are not Held)
                    again = True
                await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)

        async def one(msg, note: Note | None, seq: int):
            try:
                served = await admitted(msg)
                if note is not None and note.span is not None:
                    note.span.add_event("ADMITTED")
                try:
                    shared = any(SHM_REGION in t.parameters for t in msg.inputs)
                    check = self.dp.precheck(served, size := msg.ByteSize(), shared)
                    decoded = await self._decode(msg, size, context, headers, self.dp.shm_view(caller), note, check)
                    resp = await self.dp.infer(served, decoded)
                finally:
                    self.dp.release(served)
                answer = await _encoded(resp, decoded.sink.written if decoded.sink is not None else None)
                if FINAL_RESPONSE_REQUESTED in msg.parameters and msg.parameters[FINAL_RESPONSE_REQUESTED].bool_param:
                    # (every model here answers a request once: that answer is the final one)
                    answer.parameters[FINAL_RESPONSE].bool_param = True
                if note is not None:
                    note.answer, note.version = answer, resp.model_version
                    if resp.parameters:
                        note.variant = str(resp.parameters.get("variant", ""))
                out.put_nowait((seq, pb.ModelStreamInferResponse(infer_response=answer)))
            except Exception as e:  # every request on the stream gets an answer, whatever went wrong
                if not isinstance(e, GatewayError):
                    log.exception("stream request to model '%s' failed", msg.model_name[:128])
                    e = GatewayError(ErrorCode.INTERNAL, f"internal error: {e}")
                if note is not None:
                    note.error = e.code.value
                rid = _request_id(msg, headers)
                self.dp.count_error("grpc", e)
                self.dp.log_failure("grpc", msg.model_name, rid, e)
                text = e.message  # (tritonclient hands it on without the response's id: it is named)
                if rid and not text.startswith("[request id: "):
                    text = f"[request id: {rid[:128]}] {text}"
                rid = grpc_codec.echoed_id(rid, self.dp.limits.max_request_id_bytes)
                head = pb.ModelInferResponse(model_name=clip(msg.model_name), id=rid)
                head.model_version = clip(msg.model_version)
                out.put_nowait((seq, pb.ModelStreamInferResponse(error_message=text, infer_response=head)))

        async def reader():
            # Each request read puts exactly one answer on ``out`` (see ``one``); the count read,
            # put last, tells the writer how many answers to wait for. Waiting on "no task
            # pending" instead loses answers queued just after the end of the stream.
            count = 0
            requests = request_iterator.__aiter__()
            try:
                while True:
                    await slots.acquire()  # released once this request's answer is written
                    try:
                        raw = await requests.__anext__()
                    except StopAsyncIteration:
                        slots.release()
                        break
                    count += 1
                    note = Note() if observed else None
                    if note is not None:
                        note.bytes_in = len(raw)
                    try:
                        msg = _parse(raw)
                    except GatewayError as e:  # framing is intact: answer this one, read on
                        self.dp.count_error("grpc", e)
                        out.put_nowait((count - 1, pb.ModelStreamInferResponse(error_message=e.message)))
                        if note is not None:
                            note.error = e.code.value
                            self._noted(note, GRPC_STATUS[e.code].name, context, method, lambda: ident)
                        continue
                    if note is not None:
                        self._observe(note, msg, headers, md)
                    t = asyncio.ensure_future(one(msg, note, count - 1))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    t.add_done_callback(running.discard)
                    if note is not None:
                        t.add_done_callback(partial(finished, note))
            except Exception as e:  # the client's side of the stream broke: answer what was read, then fail
                read_error.append(e)
            finally:
                out.put_nowait((count, None))  # the end: how many answers the stream owes

        read_task = asyncio.ensure_future(reader())
        try:
            answered, expected, done = 0, None, {}  # done: answers waiting for an earlier request's
            while expected is None or answered < expected:
                seq, item = await out.get()
                if item is None:
                    expected = seq
                    continue
                done[seq] = item
                while answered in done:
                    yield done.pop(answered)  # returns once handed to gRPC, flow control permitting
                    slots.release()
                    answered += 1
            if read_error:
                log.warning("gRPC stream ended by a read error: %s", read_error[0])
                why = f"the request stream could not be read: {read_error[0]}"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        finally:
            read_task.cancel()
            for t in list(pending):
                t.cancel()
