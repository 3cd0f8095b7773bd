"""A tiny V2 inference server with scripted timing, for testing the load-test harness itself.

A load tester is only trustworthy if it reports what a known server does. This server's
behaviour is known exactly, so the harness can be checked against it:

- *capacity knee*: with ``workers`` workers and a service time of ``service_ms``, capacity is
  ``workers / service_ms`` requests per millisecond; an open-loop sweep must show latency
  stay flat below that rate and climb without bound above it;
- *coordinated-omission stall*: one scripted pause of ``stall_s`` seconds; a harness that
  measures from the intended send time must charge the pause to every request scheduled
  during it, not just to the few that were in flight.

It speaks the real protocols tritonclient speaks, over real sockets: gRPC
(``inference.GRPCInferenceService``, grpc.aio) and HTTP/1.1 (a raw ASGI app on uvicorn),
including the binary tensor extension. It serves one model (``echo`` by default): input
``INPUT0`` FP32 ``[-1, 4]`` (batch 1 to 8), output ``OUTPUT0`` equal to the input.

Timing rules:

1. Every infer request, once parsed, takes one of ``workers`` slots (an ``asyncio.Semaphore``;
   waiters get a slot in arrival order) and holds it for ``service_ms``. ``workers=1`` serves
   requests one at a time in arrival order.
2. The stall starts ``stall_at_s`` seconds after the *first infer request arrived* (not after
   start-up, so a harness's warm-up timing cannot move it) and lasts ``stall_s`` seconds. It
   happens once. During it nothing is served: a request in service is frozen and finishes
   its remaining service time after the stall (like a GC pause), queued requests stay
   queued, new ones queue up, and no answer is sent before the stall ends.
3. ``received`` counts infer requests that arrived, ``answered`` those answered with a
   result, ``rejected`` those answered with an error; ``services`` records, per answered
   request, when it arrived, started and ended service (``time.monotonic()`` seconds).

Run it alone with ``python -m batchgate.loadtest.testserver --service-ms 10``; it prints one
line, ``testserver ready: HTTP on HOST:PORT, gRPC on HOST:PORT``, and serves until SIGTERM or
SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import signal
import socket
import sys
import time
import zlib
from typing import NamedTuple

import grpc
import numpy as np
import uvicorn
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from batchgate.app import QuietUvicorn
from batchgate.loadtest.payload import SYNTHETIC_HEADER

INPUT, OUTPUT, FEATURES, MAX_BATCH = "INPUT0", "OUTPUT0", 4, 8
F32 = np.dtype("<f4")


class Service(NamedTuple):
    arrived: float
    started: float
    ended: float


class _Error(Exception):
    """A request the server refuses: 400 / INVALID_ARGUMENT, 404 / NOT_FOUND or (HTTP only) 405."""

    def __init__(self, http_status: int, msg: str):
        super().__init__(msg)
        self.http_status = http_status

    @property
    def grpc_code(self):
        return grpc.StatusCode.NOT_FOUND if self.http_status == 404 else grpc.StatusCode.INVALID_ARGUMENT


def _bad(msg: str) -> _Error:
    return _Error(400, msg)


def _check_input(name: str, datatype: str, shape) -> int:
    """Validate the one input's name, type and shape; return its size in bytes."""
    if name != INPUT:
        raise _bad(f"unexpected input '{name}', the model has only '{INPUT}'")
    if datatype != "FP32":
        raise _bad(f"input '{INPUT}' has datatype {datatype}, expected FP32")
    shape = list(shape)
    if len(shape) != 2 or shape[1] != FEATURES or not 1 <= shape[0] <= MAX_BATCH:
        raise _bad(f"input '{INPUT}' has shape {shape}, expected [1..{MAX_BATCH}, {FEATURES}]")
    return shape[0] * FEATURES * F32.itemsize


class TestServer:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        model: str = "echo",
        service_ms: float = 0.0,
        workers: int = 1,
        stall_at_s: float | None = None,
        stall_s: float = 0.0,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
    ):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.model, self.host = model, host
        self.service_s = max(0.0, service_ms) / 1000
        self.workers = workers
        self.stall_at_s, self.stall_s = stall_at_s, stall_s
        self.grpc_port, self.http_port = grpc_port, http_port
        self.received = self.answered = self.rejected = 0
        self.services: list[Service] = []
        self.first_request_at: float | None = None
        self.synthetic = 0  # infer requests marked x-batchgate-synthetic (header or gRPC metadata)
        self.stall_window: tuple[float, float] | None = None  # known once the first request came
        self._slots = asyncio.Semaphore(workers)
        self._grpc: grpc.aio.Server | None = None
        self._http: QuietUvicorn | None = None
        self._http_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ timing
    def _arrive(self) -> float:
        now = time.monotonic()
        self.received += 1
        if self.first_request_at is None:
            self.first_request_at = now
            if self.stall_at_s is not None and self.stall_s > 0:
                begin = now + self.stall_at_s
                self.stall_window = (begin, begin + self.stall_s)
        return now

    def _service_end(self, start: float) -> float:
        """When a service beginning at ``start`` ends: ``service_s`` of time outside the stall."""
        end = start + self.service_s
        if self.stall_window is not None:
            a, b = self.stall_window
            if a <= start < b:  # began during the stall: starts for real when it ends
                end = b + self.service_s
            elif start < a < end:  # frozen part-way through
                end += b - a
        return end

    async def _serve(self, arrived: float, raw: bytes) -> bytes:
        async with self._slots:
            started = time.monotonic()
            end = self._service_end(started)
            while (now := time.monotonic()) < end:
                await asyncio.sleep(end - now)
            if self.stall_window is not None and self.stall_window[0] <= now < self.stall_window[1]:
                await asyncio.sleep(self.stall_window[1] - now)  # overslept into the stall
            self.services.append(Service(arrived, started, time.monotonic()))
        return raw  # the model: an echo

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.model or version not in ("", "1"):
            v = f" version {version}" if version else ""
            raise _Error(404, f"unknown model '{name}'{v}; this server has only '{self.model}' version 1")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_GrpcService(self), self._grpc)
        port = self._grpc.add_insecure_port(f"{self.host}:{self.grpc_port}")
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {self.host}:{self.grpc_port}")
        self.grpc_port = port
        await self._grpc.start()

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.http_port))
        sock.listen(1024)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            http="httptools",
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,
            proxy_headers=False,
            timeout_graceful_shutdown=1,
        )
        self._http = QuietUvicorn(config)
        self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(0.5)
            self._grpc = None
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                if self._http_task is not None:  # set with _http
                    await asyncio.wait_for(self._http_task, 5)
            self._http = None

    # ------------------------------------------------------------------ metadata
    def _metadata(self) -> dict:
        tensor = {"datatype": "FP32", "shape": [-1, FEATURES]}
        return {
            "name": self.model,
            "versions": ["1"],
            "platform": "echo",
            "inputs": [{"name": INPUT, **tensor}],
            "outputs": [{"name": OUTPUT, **tensor}],
        }

    def _config(self) -> dict:
        return {
            "name": self.model,
            "backend": "echo",
            "max_batch_size": MAX_BATCH,
            "input": [{"name": INPUT, "data_type": "TYPE_FP32", "dims": [FEATURES]}],
            "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [FEATURES]}],
        }

    # ------------------------------------------------------------------ HTTP
    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            status, extra, payload = await self._route(scope["method"], scope["path"], headers, bytes(body))
        except _Error as e:
            status, extra, payload = e.http_status, [], json.dumps({"error": str(e)}).encode()
        if not extra and payload:
            extra = [(b"content-type", b"application/json")]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*extra, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _route(self, method: str, path: str, headers: dict, body: bytes):
        parts = path.strip("/").split("/")
        if parts[:1] != ["v2"]:
            raise _Error(404, f"no route for {path}")
        rest, version = parts[1:], ""
        if rest in ([], ["health", "live"], ["health", "ready"]):
            _expect(method, "GET")
            if not rest:
                return (
                    200,
                    [],
                    json.dumps(
                        {"name": "batchgate-testserver", "version": "1", "extensions": ["binary_tensor_data"]}
                    ).encode(),
                )
            return 200, [], b""
        if len(rest) < 2 or rest[0] != "models":
            raise _Error(404, f"no route for {path}")
        model, rest = rest[1], rest[2:]
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        if rest == ["infer"]:
            _expect(method, "POST")
            return await self._http_infer(model, version, headers, body)
        _expect(method, "GET")
        self._check_model(model, version)
        if rest == []:
            return 200, [], json.dumps(self._metadata()).encode()
        if rest == ["ready"]:
            return 200, [], b""
        if rest == ["config"]:
            return 200, [], json.dumps(self._config()).encode()
        raise _Error(404, f"no route for {path}")

    async def _http_infer(self, model: str, version: str, headers: dict, body: bytes):
        arrived = self._arrive()
        self.synthetic += headers.get(SYNTHETIC_HEADER) == "1"
        try:
            self._check_model(model, version)
            shape, raw, binary, request_id = _parse_http(headers, body)
        except _Error:
            self.rejected += 1
            raise
        out = await self._serve(arrived, raw)
        tensor = {"name": OUTPUT, "datatype": "FP32", "shape": shape}
        if binary:
            tensor["parameters"] = {"binary_data_size": len(out)}
        else:
            tensor["data"] = np.frombuffer(out, F32).tolist()
        answer = {"model_name": self.model, "model_version": "1", "outputs": [tensor]}
        if request_id:
            answer["id"] = request_id
        header = json.dumps(answer).encode()
        self.answered += 1
        if not binary:
            return 200, [(b"content-type", b"application/json")], header
        return (
            200,
            [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(len(header)).encode()),
            ],
            header + out,
        )


def _expect(method: str, wanted: str) -> None:
    if method != wanted:
        raise _Error(405, f"method {method} not allowed here, use {wanted}")


def _parse_http(headers: dict, body: bytes):
    """A V2 JSON infer request, with or without binary tensors -> (shape, raw input, binary out, id)."""
    encoding = headers.get("content-encoding", "identity")
    try:
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding != "identity":
            raise _bad(f"unsupported content-encoding {encoding}")
        size = headers.get("inference-header-content-length")
        n = len(body) if size is None else int(size)
        if not 0 < n <= len(body):
            raise _bad(f"bad Inference-Header-Content-Length {size} for a {len(body)}-byte body")
        request = json.loads(body[:n])
        tail = body[n:]
        inputs = request["inputs"]
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise _bad(f"expected exactly one input, '{INPUT}'")
        inp = inputs[0]
        shape = list(inp["shape"])
        nbytes = _check_input(inp["name"], inp["datatype"], shape)
        params = inp.get("parameters") or {}
        if "binary_data_size" in params:
            raw = tail[: int(params["binary_data_size"])]
            if "data" in inp or len(raw) != int(params["binary_data_size"]) or len(tail) != len(raw):
                raise _bad(f"binary data of input '{INPUT}' does not match the body")
        elif "data" in inp:
            raw = np.asarray(inp["data"], dtype=F32).reshape(-1).tobytes()
        else:
            raise _bad(f"input '{INPUT}' has neither data nor binary_data_size")
        if len(raw) != nbytes:
            raise _bad(f"input '{INPUT}' holds {len(raw)} bytes, its shape {shape} needs {nbytes}")
        binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
        for output in request.get("outputs") or []:
            if output["name"] != OUTPUT:
                raise _bad(f"unknown output '{output['name']}', the model has only '{OUTPUT}'")
            binary = bool((output.get("parameters") or {}).get("binary_data", binary))
        return shape, raw, binary, str(request.get("id", ""))
    except _Error:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError, zlib.error) as e:
        raise _bad(f"malformed infer request: {e!r}") from None


# ---------------------------------------------------------------------- gRPC
class _GrpcService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: TestServer):
        self.s = server

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        try:
            self.s._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)
        except _Error:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="batchgate-testserver", version="1", extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request, context):
        await self._check(request.name, request.version, context)
        meta = self.s._metadata()
        tensors = {k: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[k]] for k in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"], **tensors
        )

    async def ModelConfig(self, request, context):
        await self._check(request.name, request.version, context)
        config = mc.ModelConfig(
            name=self.s.model,
            backend="echo",
            max_batch_size=MAX_BATCH,
            input=[mc.ModelInput(name=INPUT, data_type=mc.TYPE_FP32, dims=[FEATURES])],
            output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[FEATURES])],
        )
        return pb.ModelConfigResponse(config=config)

    async def _check(self, name: str, version: str, context) -> None:
        try:
            self.s._check_model(name, version)
        except _Error as e:
            await context.abort(e.grpc_code, str(e))

    async def ModelInfer(self, request, context):
        self.s.synthetic += (SYNTHETIC_HEADER, "1") in tuple(context.invocation_metadata() or ())
        try:
            return await self._infer(request)
        except _Error as e:
            await context.abort(e.grpc_code, str(e))

    async def ModelStreamInfer(self, request_iterator, context):
        # Requests on one stream are served concurrently (each takes its own worker slot, so
        # a stream can keep several in flight) and answered in the order they came.
        pending: asyncio.Queue = asyncio.Queue()
        marked = (SYNTHETIC_HEADER, "1") in tuple(context.invocation_metadata() or ())

        async def read():
            try:
                async for request in request_iterator:
                    self.s.synthetic += marked
                    pending.put_nowait(asyncio.ensure_future(self._stream_one(request)))
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
        finally:
            reader.cancel()
            while not pending.empty():
                if (task := pending.get_nowait()) is not None:
                    task.cancel()

    async def _stream_one(self, request):
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request))
        except _Error as e:
            return pb.ModelStreamInferResponse(error_message=str(e))

    async def _infer(self, request):
        s = self.s
        arrived = s._arrive()
        try:
            s._check_model(request.model_name, request.model_version)
            shape, raw = _parse_grpc(request)
        except _Error:
            s.rejected += 1
            raise
        out = await s._serve(arrived, raw)
        answer = pb.ModelInferResponse(
            model_name=s.model,
            model_version="1",
            id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="FP32", shape=shape)],
            raw_output_contents=[out],
        )
        s.answered += 1
        return answer


def _parse_grpc(request) -> tuple[list[int], bytes]:
    if len(request.inputs) != 1:
        raise _bad(f"expected exactly one input, '{INPUT}'")
    inp = request.inputs[0]
    shape = list(inp.shape)
    nbytes = _check_input(inp.name, inp.datatype, shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or inp.HasField("contents"):
            raise _bad(f"input '{INPUT}' must come either raw or typed, once")
        raw = request.raw_input_contents[0]
    elif inp.HasField("contents"):
        raw = np.asarray(inp.contents.fp32_contents, dtype=F32).tobytes()
    else:
        raise _bad(f"input '{INPUT}' has no data")
    if len(raw) != nbytes:
        raise _bad(f"input '{INPUT}' holds {len(raw)} bytes, its shape {shape} needs {nbytes}")
    for output in request.outputs:
        if output.name != OUTPUT:
            raise _bad(f"unknown output '{output.name}', the model has only '{OUTPUT}'")
    return shape, raw


# ---------------------------------------------------------------------- CLI
async def _run(server: TestServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(
        f"testserver ready: HTTP on {server.host}:{server.http_port}, gRPC on {server.host}:{server.grpc_port}",
        flush=True,
    )
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m batchgate.loadtest.testserver",
        description="A V2 echo server with scripted service time and one stall.",
    )
    p.add_argument("--service-ms", type=float, default=0.0, help="service time per request (ms)")
    p.add_argument("--workers", type=int, default=1, help="requests served at once")
    p.add_argument(
        "--stall-at",
        type=float,
        default=None,
        metavar="S",
        help="stall this many seconds after the first infer request",
    )
    p.add_argument("--stall-s", type=float, default=0.0, help="how long the stall lasts (s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--model", default="echo")
    a = p.parse_args(argv)
    server = TestServer(
        model=a.model,
        service_ms=a.service_ms,
        workers=a.workers,
        stall_at_s=a.stall_at,
        stall_s=a.stall_s,
        host=a.host,
        grpc_port=a.grpc_port,
        http_port=a.http_port,
    )
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_run(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
