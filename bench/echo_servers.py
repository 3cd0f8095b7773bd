"""The two baselines of ``bench/serving.py``: the least a Python server can do per request.

- ``grpc``: a grpc.aio server for ``inference.GRPCInferenceService/ModelInfer``. It
  deserializes the same ``ModelInferRequest`` protobuf batchgate gets and answers a
  ``ModelInferResponse`` whose outputs are the inputs (raw bytes copied over). No model,
  no validation, no thread hop. Same server options and event loop (uvloop) as batchgate.
- ``http``: a bare ASGI callable under uvicorn (httptools, uvloop, one process). It reads
  the JSON body, parses it with orjson and answers the inputs as outputs, again with orjson.

Both count the inference calls they answered and report the count in the V2 statistics
shape (gRPC ``ModelStatistics``, HTTP ``GET /v2/models/<m>/stats``), so the benchmark can
check the load tool's success count against the server's, exactly as it does for batchgate.

Each prints ``listening on HOST:PORT`` on stderr once it accepts connections.

    python bench/echo_servers.py grpc [--port 0]
    python bench/echo_servers.py http [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

# Same limit batchgate applies by default (max_request_bytes = 64 MiB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _ready(host: str, port: int) -> None:
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- gRPC


async def serve_grpc(host: str, port: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        def __init__(self):
            self.answered = 0

        async def ModelInfer(self, request, context):
            resp = pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version or "1", id=request.id
            )
            for t in request.inputs:
                resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            resp.raw_output_contents.extend(request.raw_input_contents)
            self.answered += 1
            return resp

        async def ModelStatistics(self, request, context):
            resp = pb.ModelStatisticsResponse()
            s = resp.model_stats.add(
                name=request.name or "echo", version="1", inference_count=self.answered, execution_count=self.answered
            )
            s.inference_stats.success.count = self.answered
            return resp

        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    _ready(host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


# ----------------------------------------------------------------------------- HTTP


def make_asgi_echo():
    import orjson

    answered = 0
    json_headers = [(b"content-type", b"application/json")]

    async def app(scope, receive, send):
        nonlocal answered
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "POST" and path.endswith("/infer"):
            parts = []
            while True:
                msg = await receive()
                parts.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
            req = orjson.loads(parts[0] if len(parts) == 1 else b"".join(parts))
            body = orjson.dumps({"model_name": path.split("/")[3], "model_version": "1", "outputs": req["inputs"]})
            answered += 1
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": body})
            return
        if path.endswith("/stats"):
            stats = {
                "model_stats": [
                    {
                        "name": "echo",
                        "version": "1",
                        "inference_count": answered,
                        "inference_stats": {"success": {"count": answered, "ns": 0}, "fail": {"count": 0, "ns": 0}},
                    }
                ]
            }
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": orjson.dumps(stats)})
            return
        await send({"type": "http.response.start", "status": 404, "headers": json_headers})
        await send({"type": "http.response.body", "body": b'{"error":"not found"}'})

    return app


async def serve_http(host: str, port: int) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    config = uvicorn.Config(
        make_asgi_echo(),
        http="httptools",
        loop="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        log_config=None,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    _ready(host, sock.getsockname()[1])
    await task  # uvicorn handles SIGINT/SIGTERM itself


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("grpc", "http"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    import uvloop  # the loop batchgate runs on; the baselines get the same

    uvloop.install()
    asyncio.run(serve_grpc(args.host, args.port) if args.kind == "grpc" else serve_http(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
