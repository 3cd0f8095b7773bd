"""A small V2 gRPC upstream that behaves as a test needs: where a real one cannot be made to
answer a status on request (Triton's UNAVAILABLE for a full queue), to tell what arrived (the
parameters of each request, the authorization metadata of each call), or to declare a scheduler
batchgate does not run (sequence batching).

Models: ``fk`` (x FP32 [-1, 2] -> y = 2x, max_batch_size 8), ``seq`` (the same with
``sequence_batching``), ``shape`` (the same, x a TensorRT shape tensor), ``typed`` (the same,
answered in typed ``contents``, not raw) and ``dec`` (the same, decoupled: its ModelInfer fails
UNIMPLEMENTED as Triton's does for such a model, which it serves on streams only). A request
parameter ``code`` (int) makes the call fail with that gRPC status (its message ends with the
parameter ``say``, when given); the answer carries the parameter ``seen`` (the request's parameter
names, sorted), its output ``content_type`` "np"; a parameter ``lie`` makes the answer wrong:
"rows" (one row too many), "datatype" (y as INT32), "width" (one column too many), "twice" (y
answered twice), "negative" (an output z of shape [-1]), "wire" (y's parameters name a binary size
and a shared-memory region) or "garbage" (bytes that are no ModelInferResponse); the fake's
``lie``, every request's. ``version`` and ``width`` (of x and y) may be changed while it serves,
as a Triton that loaded another version; ``also`` lists more versions in its metadata, as a Triton
that serves several; ``hang`` makes its inference never answer while its probes do, as a wedged
server's.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

MODELS = ("fk", "seq", "shape", "typed", "dec")


class _Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, owner: FakeUpstream):
        self.owner = owner

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        self.owner.probe_authorization = dict(context.invocation_metadata() or ()).get("authorization")
        await asyncio.sleep(self.owner.ready_delay_s)
        if self.owner.ready_code:  # (as MLServer answers for a model it unloaded: UNKNOWN, ModelNotFound)
            code = next(c for c in grpc.StatusCode if c.value[0] == self.owner.ready_code)
            await context.abort(code, f"the fake upstream's ModelReady fails with {code.name} as asked")
        if self.owner.silent_readies > 0:  # (no answer in time: a busy server's, its loop held up)
            self.owner.silent_readies -= 1
            await asyncio.sleep(30)
        self.owner.ready_answers += 1
        return pb.ModelReadyResponse(ready=request.name in MODELS)

    async def ModelMetadata(self, request, context):
        if request.name not in MODELS:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        self.owner.metadata_calls += 1
        if self.owner.metadata_code:
            code = next(c for c in grpc.StatusCode if c.value[0] == self.owner.metadata_code)
            await context.abort(code, f"the fake upstream's metadata fails with {code.name} as asked")
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[self.owner.version, *self.owner.also],
            platform="fake",
            inputs=[meta(name="x", datatype="FP32", shape=[-1, self.owner.width])],
            outputs=[meta(name="y", datatype="FP32", shape=[-1, self.owner.width])],
        )

    async def ModelConfig(self, request, context):
        if self.owner.config_code:
            code = next(c for c in grpc.StatusCode if c.value[0] == self.owner.config_code)
            await context.abort(code, f"the fake upstream's config fails with {code.name} as asked")
        cfg = mc.ModelConfig(name=request.name, platform="fake", max_batch_size=self.owner.max_batch_size)
        if request.name == "seq":
            cfg.sequence_batching.max_sequence_idle_microseconds = 5_000_000
        cfg.model_transaction_policy.decoupled = request.name == "dec"
        cfg.input.add(
            name="x", data_type=mc.TYPE_FP32, dims=[self.owner.width], is_shape_tensor=request.name == "shape"
        )
        cfg.output.add(name="y", data_type=mc.TYPE_FP32, dims=[self.owner.width])
        return pb.ModelConfigResponse(config=cfg)

    async def ModelInfer(self, request, context):
        params = dict(request.parameters)
        self.owner.authorization.append(dict(context.invocation_metadata() or ()).get("authorization"))
        self.owner.seen.append((request.model_name, params, [list(t.shape) for t in request.inputs]))
        if request.model_name == "dec":  # (Triton's words)
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "ModelInfer RPC doesn't support models with decoupled transaction policy",
            )
        if self.owner.hang:
            await asyncio.sleep(3600)  # (until the caller's deadline cancels it)
        if "code" in params:
            code = next(c for c in grpc.StatusCode if c.value[0] == params["code"].int64_param)
            say = params["say"].string_param if "say" in params else ""
            await context.abort(code, f"the fake upstream fails with {code.name} as asked{say}")
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(request.inputs[0].shape))
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version=self.owner.version, id=request.id)
        y, datatype = (x * 2).astype(np.float32), "FP32"
        lie = params["lie"].string_param if "lie" in params else self.owner.lie
        if lie == "rows":  # one row more than it was sent
            y = np.concatenate([y, y[:1]])
        elif lie == "datatype":  # INT32, where its signature says FP32 (as many bytes)
            y, datatype = y.astype(np.int32), "INT32"
        elif lie == "width":  # one column more than its signature's
            y = np.concatenate([y, y[:, :1]], axis=1)
        elif lie == "rank":  # a trailing dimension of 1 its signature does not have (as MLServer's sklearn answers)
            y = y[..., None]
        elif lie == "garbage":  # bytes that are no ModelInferResponse
            return b"\xff\xff\xff\xff"
        resp.outputs.add(name="y", datatype=datatype, shape=list(y.shape))
        if request.model_name == "typed":
            resp.outputs[0].contents.fp32_contents.extend(y.ravel().tolist())
        else:
            resp.raw_output_contents.append(y.tobytes())
        if lie == "negative":  # another output, BYTES, its shape [-1]
            resp.outputs.add(name="z", datatype="BYTES", shape=[-1])
            resp.raw_output_contents.append(b"")
        if lie == "wire":  # y's parameters say how it went on a wire of its own (HTTP binary, shared memory)
            resp.outputs[0].parameters["binary_data_size"].int64_param = 3
            resp.outputs[0].parameters["shared_memory_region"].string_param = "theirs"
        if lie == "twice":  # the output again, with other values
            resp.outputs.add(name="y", datatype=datatype, shape=list(y.shape))
            resp.raw_output_contents.append((y + 1).tobytes())
        resp.parameters["seen"].string_param = ",".join(sorted(params))
        resp.outputs[0].parameters["content_type"].string_param = "np"
        return resp


class _Handlers:
    """Takes the method handlers tritonclient's helper registers, to change one."""

    handlers: dict

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def _register(server: grpc.aio.Server, service: _Service) -> None:
    """The V2 service, but ModelInfer may answer bytes as they are (an answer that is no message)."""
    got = _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, got)
    handlers = dict(got.handlers)
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        service.ModelInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
    )
    name = "inference.GRPCInferenceService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class FakeUpstream:
    """Serves on 127.0.0.1 (``address``) from a thread of its own until ``stop``."""

    def __init__(self):
        self.seen: list[tuple[str, dict, list]] = []  # (model, parameters, input shapes) of each infer
        self.version, self.width = "1", 2
        self.also: list[str] = []  # versions listed beside ``version`` (as Triton lists all it has ready)
        self.metadata_calls = 0
        self.metadata_code = 0  # a gRPC status code its ModelMetadata fails with (0: it answers)
        self.lie = ""  # the ``lie`` of every request that gives none
        self.hang = False  # its inference never answers (its probes still do), as a wedged server's
        self.ready_delay_s = 0.0  # how long its ModelReady takes to answer
        self.silent_readies = 0  # its next ModelReady calls that get no answer (for 30 s)
        self.ready_code = 0  # a gRPC status code its ModelReady fails with (0: it answers)
        self.ready_answers = 0  # ModelReady calls it answered
        self.max_batch_size = 8  # its ModelConfig's
        self.config_code = 0  # a gRPC status code its ModelConfig fails with (0: it answers)
        self.authorization: list[str | None] = []  # the authorization metadata of each infer call
        self.probe_authorization: str | None = None  # that of the last ModelReady
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(20):
            raise RuntimeError("the fake upstream did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = grpc.aio.server()
        _register(self._server, _Service(self))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._loop.run_until_complete(self._server.start())
        self._started.set()
        self._loop.run_forever()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
