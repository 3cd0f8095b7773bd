"""A closed connection leaves nothing for the cyclic garbage collector: its objects are freed
when it goes, not found later by a collection (which runs more often, and pauses the event
loop longer, the more a churn of connections leaves behind).

Before: every HTTP connection left its protocol, transport and buffers in a cycle (the
protocol held its batched-writes transport, which held a method of the protocol; ~20 objects),
and every gRPC connection on the h2 engine its connection and Http2 state (each held the
other; ~60 objects)."""

from __future__ import annotations

import gc
import json
import socket
import time
from collections.abc import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc


def left_by(run: Callable[[], None], times: int) -> list[str]:
    """Types of batchgate's own objects the collector finds after ``run()`` ``times`` times."""
    run()  # (warm: whatever is made once and kept is made now)
    time.sleep(0.3)
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
    try:
        for _ in range(times):
            run()
        time.sleep(0.5)  # (the server sees each close)
        gc.collect()
        return sorted(
            {
                f"{type(o).__module__}.{type(o).__name__}"
                for o in gc.garbage
                # (asyncio's own socket transport keeps a method of its own, a cycle of its own
                # on Python 3.11; uvloop's, which batchgate serves with, does not)
                if (type(o).__module__ or "").startswith(("server.", "batchgate."))
            }
        )
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_http_connections_leave_no_cycles(demo_repo, serve):
    running = serve(demo_repo)
    port = running.gateway.http_port
    row = [0.1] * 256
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 256], "data": row}]}).encode()
    close = b"host: t\r\nconnection: close\r\n"
    requests = [
        b"POST /v2/models/mlp/infer HTTP/1.1\r\n" + close + b"content-length: %d\r\n\r\n" % len(body) + body,
        b"GET /v2/models/mlp HTTP/1.1\r\n" + close + b"\r\n",
        b"POST /v2/models/nope/infer HTTP/1.1\r\n" + close + b"content-length: 2\r\n\r\n{}",
    ]

    def run() -> None:
        answers = [_raw(port, r).split(b"\r\n", 1)[0] for r in requests]
        assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"], answers

    assert left_by(run, 10) == []


def test_grpc_connections_leave_no_cycles(demo_repo, serve):
    running = serve(demo_repo)
    target = f"127.0.0.1:{running.gateway.grpc_port}"
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(np.zeros(256, "<f4").tobytes())

    def run() -> None:
        # A subchannel of its own: grpcio shares one between channels to the same target, and
        # the test needs a connection a call.
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
            assert stub.ModelInfer(request).raw_output_contents
            try:
                stub.ModelInfer(service_pb2.ModelInferRequest(model_name="nope"))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
            else:
                raise AssertionError("an unknown model was answered")

    assert left_by(run, 10) == []


def test_grpc_streaming_calls_leave_no_cycles(demo_repo, serve):
    """A streaming call's request iterator held the call and the call the iterator: each
    ModelStreamInfer left both (and what they held) for the collector."""
    running = serve(demo_repo)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(np.zeros(256, "<f4").tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{running.gateway.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def run() -> None:
            answers = list(stub.ModelStreamInfer(iter([request] * 3)))
            assert len(answers) == 3 and not any(a.error_message for a in answers)

        assert left_by(run, 10) == []


def test_grpcio_engine_error_answers_leave_no_cycles(demo_repo, serve):
    """On the grpcio engine a call answered with an error went through grpc.aio's ``abort``,
    raised inside the handler's ``except``: the error's traceback, chained to ours, kept the
    handler's frames, the error and its access-log note in a cycle, for each such call."""
    running = serve(demo_repo, grpc_engine="grpcio")
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def run() -> None:
            try:
                stub.ModelInfer(service_pb2.ModelInferRequest(model_name="nope"))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in (e.details() or "")
            else:
                raise AssertionError("an unknown model was answered")

        assert left_by(run, 10) == []
