"""The V2 gRPC service (``inference.GRPCInferenceService``) on grpc.aio.

Wire types come from tritonclient's generated modules. Errors are mapped to a
gRPC status in exactly one table, :data:`GRPC_STATUS`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..core.errors import ErrorCode, GatewayError
from . import grpc_codec

log = logging.getLogger("batchgate.grpc")

GRPC_STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

_monotonic = time.monotonic


async def _abort(context, e: GatewayError):
    md = ()
    if e.retry_after_s is not None:
        md = (("retry-after", str(max(1, round(e.retry_after_s)))),)
        context.set_trailing_metadata(md)
    await context.abort(GRPC_STATUS[e.code], e.message)


def _request_id(msg, context) -> str:
    if msg.id:
        return msg.id
    for k, v in context.invocation_metadata() or ():
        if k == "x-request-id":
            return v
    return ""


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway):
        self.gw = gateway

    # ------------------------------------------------------------ health and metadata
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.gw.ready)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.gw.repository.ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        m = self.gw.server_metadata()
        return pb.ServerMetadataResponse(name=m["name"], version=m["version"], extensions=m["extensions"])

    async def ModelMetadata(self, request, context):
        try:
            m = self.gw.model_metadata(request.name, request.version)
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"])
        for key in ("inputs", "outputs"):
            for t in m[key]:
                getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelConfig(self, request, context):
        try:
            served = self.gw.repository.resolve(request.name, request.version)
        except GatewayError as e:
            return await _abort(context, e)
        return pb.ModelConfigResponse(config=served.config)

    async def ModelStatistics(self, request, context):
        try:
            stats = self.gw.statistics(request.name, request.version)
        except GatewayError as e:
            return await _abort(context, e)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    # ------------------------------------------------------------ repository
    async def RepositoryIndex(self, request, context):
        try:
            rows = self.gw.repository.index(ready_only=request.ready)
        except GatewayError as e:
            return await _abort(context, e)
        resp = pb.RepositoryIndexResponse()
        for r in rows:
            resp.models.add(**r)
        return resp

    async def RepositoryModelLoad(self, request, context):
        config = None
        files = {}
        for k, p in request.parameters.items():
            v = p.WhichOneof("parameter_choice")
            if k == "config":
                config = p.string_param
            elif k.startswith("file:"):
                files[k[5:]] = p.bytes_param
            elif v is None:
                pass
        try:
            await self.gw.repository.load(request.model_name, config, files or None)
        except GatewayError as e:
            return await _abort(context, e)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.gw.repository.unload(request.model_name)
        except GatewayError as e:
            return await _abort(context, e)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------ inference
    def _decode(self, msg, context) -> "grpc_codec.InferRequest":
        req = grpc_codec.decode_request(msg, _monotonic())
        remaining = context.time_remaining()
        if remaining is not None:
            dl = req.arrival + remaining
            req.deadline = dl if req.deadline is None else min(req.deadline, dl)
        if not req.id:
            req.id = _request_id(msg, context)
        return req

    async def ModelInfer(self, request, context):
        try:
            req = self._decode(request, context)
            resp = await self.gw.infer(req)
        except GatewayError as e:
            self.gw.log_failure("grpc", request.model_name, _request_id(request, context), e)
            return await _abort(context, e)
        return grpc_codec.encode_response(resp)

    async def ModelStreamInfer(self, request_iterator, context):
        """Answer each request of the stream as soon as it is done (not necessarily in order);
        a bad request gets ``error_message`` and the stream goes on."""
        out: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        done_reading = False

        async def one(msg):
            try:
                req = self._decode(msg, context)
                resp = await self.gw.infer(req)
                await out.put(pb.ModelStreamInferResponse(infer_response=grpc_codec.encode_response(resp)))
            except GatewayError as e:
                self.gw.log_failure("grpc", msg.model_name, _request_id(msg, context), e)
                await out.put(pb.ModelStreamInferResponse(
                    error_message=e.message,
                    infer_response=pb.ModelInferResponse(model_name=msg.model_name,
                                                         model_version=msg.model_version, id=msg.id)))

        async def reader():
            nonlocal done_reading
            try:
                async for msg in request_iterator:
                    t = asyncio.ensure_future(one(msg))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
            finally:
                done_reading = True
                await out.put(None)

        read_task = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    if pending:
                        await asyncio.gather(*list(pending), return_exceptions=True)
                        while not out.empty():
                            nxt = out.get_nowait()
                            if nxt is not None:
                                yield nxt
                    break
                yield item
        finally:
            read_task.cancel()
            for t in list(pending):
                t.cancel()
