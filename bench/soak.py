"""Soak test: a million mixed requests, good and bad, over both protocols, against one real
``batchgate serve`` process; the server's memory and file descriptors must not grow.

The server runs as a subprocess on the demo repository (``batchgate demo-repo``), on free ports,
pinned to one core (the load generator to the other, as in the other benchmarks). One asyncio
load generator (uvloop) drives a seeded mix of request kinds through ``--concurrency`` workers:

- HTTP: pre-built HTTP/1.1 request bytes over keep-alive asyncio streams, one connection per
  worker. Good: JSON and binary-extension infers, gzip infers, metadata / config / stats /
  health / repository index. Bad: malformed JSON, wrong datatype, wrong shape, a BYTES tensor
  claiming 2^30 elements with 16 bytes, unknown model names (every one different and long, to
  catch a cache or a metric label that grows with them) for infer and for metadata, oversized V2
  ids, corrupt gzip, too many outputs; and connections closed or reset mid-request.
- gRPC: raw bytes through generic ``unary_unary`` / ``stream_stream`` calls of a grpc.aio channel
  (identity serializers, as the gateway reads ModelInfer). Good: unary infers (raw and typed
  contents), stream infers on long-lived streams (reopened every few hundred messages),
  metadata calls. Bad: unparsable protobuf, wrong datatype / shape, the BYTES claim, unknown and
  long names, oversized ids, too many outputs, bad messages on a stream (answered with
  ``error_message``, the stream goes on), calls cancelled or timed out while they run, channels
  closed with a call in flight, and raw TCP connections that send the HTTP/2 preface and close
  or reset.

Every answer is classified (HTTP status, gRPC code, stream ``ok`` / ``error_message``) and must
be one the request kind expects: good ones succeed, bad ones are refused with 4xx /
INVALID_ARGUMENT / NOT_FOUND; a 5xx or INTERNAL (or any other answer) fails the run. A good
request refused for load (RESOURCE_EXHAUSTED / 429: the admission's answer when the server's core
cannot keep up, as on a machine busy with other work) is shown in the table and counts as
unexpected only past 1% of its kind (one in 422 made `make test`'s short run fail on a busy CI box).

Memory: after a warm-up (the first 10% of the requests, so allocator and caches settle) the
traffic stops, every client connection closes, and once the server's file descriptor count has
settled its RSS (VmRSS) and fd count are the baseline. The rest of the requests run, everything
closes again, and the same readings are taken at the end. RSS and fds are also sampled every
second while the traffic runs (for the plot). The run fails when RSS grew by 5% or more, when
the fd count grew, when an unknown model name shows in /metrics, when the server logged an error
or a traceback (apart from grpc's ExecuteBatchError for a call the client had already left,
which is counted), or when the server died.

    python bench/soak.py                      # 10^6 requests, about 7 minutes on 2 cores
    python bench/soak.py --quick              # 20,000 requests, ~15 s
    python bench/soak.py --requests 200000 --concurrency 48 --seed 7 --plot-to docs/soak.png
    python bench/soak.py --kinds grpc_cancel --requests 400000    # one kind alone: what grows?

Writes bench/results/soak-<time>.json and .png (RSS and fds over requests done). Exit status 0
when every check passed, 1 otherwise (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import http.client
import json
import os
import platform
import random
import re
import socket
import string
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import BATCHGATE_READY, BenchError, Server, choose_pinning, cpu_model, finite, say

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SERVICE = "/inference.GRPCInferenceService/"
QUICK_REQUESTS = 20_000
STALL_S = 60.0  # no request finished for this long: the run is stopped and fails
SERVER_ERROR_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE", "UNIMPLEMENTED"}
SHED = {"RESOURCE_EXHAUSTED", "429"}  # a good request refused for load: unexpected only past SHED_SHARE
SHED_SHARE = 0.01
UNKNOWN_PREFIX = "soak-unknown-"  # every made-up model name starts with this
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Kind:
    name: str
    transport: str  # http | grpc | stream | tcp (a raw connection closed or reset mid-request)
    weight: float
    expect: frozenset[str]
    good: bool
    what: str


def _k(name, transport, weight, expect, good, what) -> Kind:
    return Kind(name, transport, weight, frozenset(expect), good, what)


KINDS: tuple[Kind, ...] = (
    _k("http_json_infer", "http", 12, {"200"}, True, "simple / classifier, JSON tensors"),
    _k("http_binary_infer", "http", 9, {"200"}, True, "simple / mlp / identity_bytes, binary tensor extension"),
    _k("http_gzip_infer", "http", 2, {"200"}, True, "gzip body, gzip answer"),
    _k("http_metadata", "http", 4, {"200"}, True, "server / model metadata, config, stats, health, index"),
    _k("http_malformed_json", "http", 3, {"400"}, False, "bodies that are not JSON, or JSON of the wrong shape"),
    _k("http_wrong_datatype", "http", 2, {"400"}, False, "FP32 / BYTES data for an INT32 input"),
    _k("http_wrong_shape", "http", 2, {"400"}, False, "[1, 15] for [-1, 16]; data not matching the shape"),
    _k("http_bytes_claim", "http", 2, {"400"}, False, "BYTES [1, 2^30] with 16 bytes of data"),
    _k("http_unknown_model", "http", 4, {"404"}, False, "infer on a new long made-up model name each time"),
    _k("http_unknown_metadata", "http", 2, {"404"}, False, "metadata / config / stats of made-up names"),
    _k("http_long_id", "http", 2, {"400"}, False, "V2 id of 300 to 20,000 bytes"),
    _k("http_bad_gzip", "http", 2, {"400"}, False, "Content-Encoding gzip with corrupt or truncated data"),
    _k("http_too_many_outputs", "http", 2, {"400"}, False, "70 to 100 requested outputs"),
    _k("http_abort", "tcp", 2, {"aborted"}, False, "connection closed / reset mid-head, mid-body, before the answer"),
    _k("grpc_infer", "grpc", 10, {"OK"}, True, "ModelInfer: simple raw, classifier typed contents, mlp"),
    _k("grpc_stream_infer", "stream", 14, {"ok"}, True, "ModelStreamInfer on long-lived streams"),
    _k("grpc_metadata", "grpc", 3, {"OK"}, True, "live / ready / metadata / config / statistics / index"),
    _k("grpc_bad_protobuf", "grpc", 2, {"INVALID_ARGUMENT"}, False, "bytes that are no ModelInferRequest"),
    _k("grpc_wrong_datatype", "grpc", 2, {"INVALID_ARGUMENT"}, False, "FP32 for an INT32 input; unknown datatype"),
    _k("grpc_wrong_shape", "grpc", 1, {"INVALID_ARGUMENT"}, False, "[1, 15] for [-1, 16]; raw size mismatch"),
    _k("grpc_bytes_claim", "grpc", 1, {"INVALID_ARGUMENT"}, False, "BYTES [1, 2^30] with 16 bytes of data"),
    _k("grpc_unknown_model", "grpc", 3, {"NOT_FOUND"}, False, "ModelInfer on a new long made-up name each time"),
    _k("grpc_unknown_metadata", "grpc", 1, {"NOT_FOUND"}, False, "metadata / config / statistics of made-up names"),
    _k("grpc_long_id", "grpc", 1, {"INVALID_ARGUMENT"}, False, "V2 id of 300 to 20,000 bytes"),
    _k("grpc_too_many_outputs", "grpc", 1, {"INVALID_ARGUMENT"}, False, "70 to 100 requested outputs"),
    _k("grpc_stream_bad", "stream", 3, {"error_message"}, False, "bad messages on a stream (the stream goes on)"),
    _k("grpc_cancel", "grpc", 1, {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, False, "mlp calls cancelled or timed out"),
    _k("grpc_conn_abort", "tcp", 1, {"aborted"}, False, "TCP: HTTP/2 preface then close / reset"),
    _k("grpc_conn_drop", "grpc", 0.3, {"OK", "CANCELLED"}, False, "a new channel closed with an mlp call in flight"),
)


# ============================================================================ payloads


def http_request(method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: soak"]
    if method == "POST":
        lines += [f"Content-Length: {len(body)}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Payloads:
    """Every request's bytes, built once; what varies per request (made-up names) is cheap to add."""

    def __init__(self, seed: int, http_port: int, grpc_port: int):
        from google.protobuf.message import DecodeError
        from tritonclient.grpc import service_pb2 as pb

        self.pb = pb
        self.rng = random.Random(seed)
        self.filler = "".join(self.rng.choice(string.ascii_lowercase + string.digits + "-_.") for _ in range(8192))
        a = np.arange(16, dtype=np.int32)
        b = np.full(16, 3, dtype=np.int32)
        row = np.linspace(-1, 1, 256, dtype=np.float32)
        bytes_in = struct.pack("<I", 5) + b"hello" + struct.pack("<I", 3) + b"abc"

        def jin(name, dt, shape, data):
            return {"name": name, "datatype": dt, "shape": shape, "data": data}

        def bin_in(name, dt, shape, raw):
            return {"name": name, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(raw)}}, raw

        simple_json = {
            "inputs": [jin("INPUT0", "INT32", [1, 16], a.tolist()), jin("INPUT1", "INT32", [1, 16], b.tolist())]
        }
        infer = "/v2/models/{}/infer"

        def post(model, obj, headers=(), raw=b""):
            body = _json(obj)
            if raw:
                headers = (*headers, ("Inference-Header-Content-Length", str(len(body))))
            return http_request("POST", infer.format(model), body + raw, headers)

        def post_binary(model, ins, outputs):
            obj = {
                "inputs": [d for d, _ in ins],
                "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
            }
            return post(model, obj, raw=b"".join(r for _, r in ins))

        h: dict[str, list[bytes]] = {}
        h["http_json_infer"] = [
            post("simple", simple_json),
            post("simple", {**simple_json, "id": "soak-1", "outputs": [{"name": "OUTPUT1"}]}),
            post("classifier", {"inputs": [jin("features", "FP32", [2, 4], [[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]])]}),
        ]
        h["http_binary_infer"] = [
            post_binary(
                "simple",
                [bin_in("INPUT0", "INT32", [1, 16], a.tobytes()), bin_in("INPUT1", "INT32", [1, 16], b.tobytes())],
                ["OUTPUT0", "OUTPUT1"],
            ),
            post_binary("mlp", [bin_in("input", "FP32", [1, 256], row.tobytes())], ["output"]),
            post_binary("identity_bytes", [bin_in("INPUT", "BYTES", [1, 2], bytes_in)], ["OUTPUT"]),
        ]
        gz = gzip.compress(_json(simple_json))
        h["http_gzip_infer"] = [
            http_request(
                "POST", infer.format("simple"), gz, (("Content-Encoding", "gzip"), ("Accept-Encoding", "gzip"))
            )
        ]
        paths = "/v2 /v2/health/live /v2/health/ready /v2/models/simple /v2/models/mlp/config /v2/models/stats"
        paths += " /v2/models/classifier/stats /v2/models/simple/versions/1/ready /v2/models/identity_bytes/versions/1"
        h["http_metadata"] = [http_request("GET", p) for p in paths.split()]
        h["http_metadata"].append(http_request("POST", "/v2/repository/index", b"{}"))
        h["http_malformed_json"] = [
            http_request("POST", infer.format("simple"), body)
            for body in (
                b"{bad json",
                b'{"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1, 2,',
                b"[]",
                b'{"inputs": "nope"}',
                b'{"inputs": [{"name": 5}]}',
                b"\xff\xfe\x00garbage",
                b'{"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": '
                + b"[" * 200
                + b"]}]}",
            )
        ]
        h["http_wrong_datatype"] = [
            post("simple", {"inputs": [jin("INPUT0", "FP32", [1, 16], [0.5] * 16), simple_json["inputs"][1]]}),
            post("simple", {"inputs": [jin("INPUT0", "BYTES", [1, 16], ["x"] * 16), simple_json["inputs"][1]]}),
            post("simple", {"inputs": [jin("INPUT0", "INT33", [1, 16], [1] * 16), simple_json["inputs"][1]]}),
        ]
        h["http_wrong_shape"] = [
            post("simple", {"inputs": [jin(f"INPUT{j}", "INT32", [1, 15], [1] * 15) for j in (0, 1)]}),
            post("simple", {"inputs": [jin("INPUT0", "INT32", [1, 16], [1] * 7), simple_json["inputs"][1]]}),
            post_binary(
                "simple",
                [bin_in("INPUT0", "INT32", [1, 16], a.tobytes()[:60]), bin_in("INPUT1", "INT32", [1, 16], b.tobytes())],
                ["OUTPUT0"],
            ),
        ]
        h["http_bytes_claim"] = [
            post_binary("identity_bytes", [bin_in("INPUT", "BYTES", [1, 1 << 30], bytes_in)], ["OUTPUT"]),
            post("identity_bytes", {"inputs": [jin("INPUT", "BYTES", [1, 1 << 30], ["a", "b"])]}),
        ]
        h["http_too_many_outputs"] = [
            post("simple", {**simple_json, "outputs": [{"name": f"OUT{i}"} for i in range(n)]}) for n in (70, 100)
        ]
        h["http_bad_gzip"] = [
            http_request("POST", infer.format("simple"), body, (("Content-Encoding", "gzip"),))
            for body in (gz[:-12], gz[:10] + bytes(x ^ 0x5A for x in gz[10:]), b"\x1f\x8b\x08\x00garbage", b"plain")
        ]
        self.http = h
        # made-up names: the request line (and for infers, a valid body) is added per request
        self.unknown_infer_tail = (
            f" HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(_json(simple_json))}\r\n"
            "Content-Type: application/json\r\n\r\n"
        ).encode() + _json(simple_json)
        self.long_id_parts = (b'{"id":"', b'",' + _json(simple_json)[1:])

        # ------------------------------------------------------------ gRPC
        def msg(model, ins, raws=None, **kw) -> bytes:
            m = pb.ModelInferRequest(model_name=model, **kw)
            for name, dt, shape, *contents in ins:
                t = m.inputs.add(name=name, datatype=dt, shape=shape)
                if contents:
                    t.contents.fp32_contents.extend(contents[0])
            if raws is not None:
                m.raw_input_contents.extend(raws)
            return m.SerializeToString()

        def infer_msg(*a, **kw) -> tuple[str, bytes]:
            return "ModelInfer", msg(*a, **kw)

        ins16, ins15 = ([(f"INPUT{j}", "INT32", [1, n]) for j in (0, 1)] for n in (16, 15))
        raw16 = [a.tobytes(), b.tobytes()]
        self.grpc_simple = msg("simple", ins16, raw16)
        g: dict[str, list[tuple[str, bytes]]] = {}
        g["grpc_infer"] = [
            ("ModelInfer", self.grpc_simple),
            infer_msg("simple", ins16, raw16, id="soak-2"),
            infer_msg("classifier", [("features", "FP32", [1, 4], [0.1, 0.2, 0.3, 0.4])]),
            infer_msg("mlp", [("input", "FP32", [1, 256])], [row.tobytes()]),
        ]
        g["grpc_metadata"] = [
            ("ServerLive", pb.ServerLiveRequest().SerializeToString()),
            ("ServerReady", pb.ServerReadyRequest().SerializeToString()),
            ("ServerMetadata", pb.ServerMetadataRequest().SerializeToString()),
            ("ModelReady", pb.ModelReadyRequest(name="simple").SerializeToString()),
            ("ModelMetadata", pb.ModelMetadataRequest(name="mlp").SerializeToString()),
            ("ModelConfig", pb.ModelConfigRequest(name="classifier").SerializeToString()),
            ("ModelStatistics", pb.ModelStatisticsRequest(name="simple").SerializeToString()),
            ("ModelStatistics", pb.ModelStatisticsRequest().SerializeToString()),
            ("RepositoryIndex", pb.RepositoryIndexRequest().SerializeToString()),
        ]
        bad_blobs = [
            b"\x0a\xff",  # model_name whose length runs past the end
            b"\x0a\x05sim",
            b"\x0f\x00\x00",  # wire type 7: no such thing
            b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint of 11 bytes
            self.grpc_simple[:-7],
            b"\x1a\x03\x0a\x01" + bytes(range(7, 200)),
        ]
        for blob in bad_blobs:
            try:
                pb.ModelInferRequest.FromString(blob)
            except DecodeError:
                continue
            raise BenchError(f"the 'bad protobuf' payload {blob[:16]!r} parses as a ModelInferRequest")
        g["grpc_bad_protobuf"] = [("ModelInfer", blob) for blob in bad_blobs]
        g["grpc_wrong_datatype"] = [
            infer_msg("simple", [("INPUT0", dt, [1, 16]), ins16[1]], raw16) for dt in ("FP32", "NOPE")
        ]
        g["grpc_wrong_shape"] = [
            infer_msg("simple", ins15, [a.tobytes()[:60], b.tobytes()[:60]]),
            infer_msg("simple", ins16, [a.tobytes()[:61], b.tobytes()]),
            infer_msg("simple", ins16, raw16[:1]),
        ]
        g["grpc_bytes_claim"] = [infer_msg("identity_bytes", [("INPUT", "BYTES", [1, 1 << 30])], [bytes_in])]
        g["grpc_too_many_outputs"] = []
        for n in (70, 100):
            m = pb.ModelInferRequest.FromString(self.grpc_simple)
            for i in range(n):
                m.outputs.add(name=f"OUT{i}")
            g["grpc_too_many_outputs"].append(("ModelInfer", m.SerializeToString()))
        self.grpc = g
        self.mlp = g["grpc_infer"][3][1]
        bad = ("grpc_wrong_shape", "grpc_wrong_datatype", "grpc_bytes_claim", "grpc_too_many_outputs")
        self.stream_bad = bad_blobs[:2] + [blob for k in bad for _, blob in g[k]]

        # ------------------------------------------------------------ connections cut short
        body = _json(simple_json)
        head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        mlp_http = h["http_binary_infer"][1]
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
        self.aborts = {
            "http_abort": [
                (http_port, head[:25], False),  # mid-head, closed
                (http_port, head + body[: len(body) // 2], False),  # mid-body, closed
                (http_port, head + body[: len(body) // 2], True),  # mid-body, reset
                (http_port, mlp_http, False),  # a whole request, closed before the answer
                (http_port, mlp_http, True),  # a whole request, reset before the answer
                (http_port, b"", True),  # connected, reset
            ],
            "grpc_conn_abort": [
                (grpc_port, preface, False),
                (grpc_port, preface + b"\x00\x01\x00\x01\x05", True),  # a HEADERS frame cut short, reset
                (grpc_port, b"PRI * HTTP/2.0\r\n", True),
            ],
        }

    def name(self, i: int) -> str:
        """A model name no other request uses: long, and different in its length too."""
        n = self.rng.randrange(48, 480)
        start = self.rng.randrange(0, len(self.filler) - n)
        return f"{UNKNOWN_PREFIX}{i:x}-{self.filler[start : start + n]}"

    def long_id(self) -> bytes:
        return b"i" * self.rng.choice((300, 1000, 5000, 20_000))

    def make(self, kind: Kind, i: int):
        """What to send for request ``i`` of ``kind``: HTTP bytes; (method, bytes) for gRPC;
        message bytes for a stream; (port, bytes, reset) for a connection cut short."""
        name = kind.name
        if name in self.http:
            v = self.http[name]
            return v[i % len(v)]
        if name in self.grpc:
            v = self.grpc[name]
            return v[i % len(v)]
        if name == "http_unknown_model":
            return b"POST /v2/models/" + self.name(i).encode() + b"/infer" + self.unknown_infer_tail
        if name == "http_unknown_metadata":
            return http_request("GET", f"/v2/models/{self.name(i)}" + ("", "/config", "/stats", "/versions/1")[i % 4])
        if name == "http_long_id":
            body = self.long_id_parts[0] + self.long_id() + self.long_id_parts[1]
            return http_request("POST", "/v2/models/simple/infer", body)
        if name == "grpc_unknown_model":
            return "ModelInfer", self.with_name(self.grpc_simple, self.name(i))
        if name == "grpc_unknown_metadata":
            pb = self.pb
            req = (pb.ModelMetadataRequest, pb.ModelConfigRequest, pb.ModelStatisticsRequest)[i % 3]
            return req.__name__[:-7], req(name=self.name(i)).SerializeToString()
        if name == "grpc_long_id":
            return "ModelInfer", self.grpc_simple + b"\x1a" + _varint(len(ids := self.long_id())) + ids
        if name in ("grpc_cancel", "grpc_conn_drop"):
            return "ModelInfer", self.mlp
        if name == "grpc_stream_infer":
            return self.grpc_simple
        if name == "grpc_stream_bad":
            if i % 3 == 0:
                return self.with_name(self.grpc_simple, self.name(i))
            return self.stream_bad[i % len(self.stream_bad)]
        if name in self.aborts:
            v = self.aborts[name]
            return v[i % len(v)]
        raise AssertionError(name)

    @staticmethod
    def with_name(message: bytes, model: str) -> bytes:
        """``message`` with its model_name replaced: protobuf keeps the last value of a field."""
        b = model.encode()
        return message + b"\x0a" + _varint(len(b)) + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# ============================================================================ clients


class HttpConn:
    """One keep-alive HTTP/1.1 connection; a request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.open = True

    @classmethod
    async def connect(cls, port: int) -> HttpConn:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def call(self, data: bytes) -> tuple[int, bytes]:
        self.w.write(data)
        r = self.r
        head = await r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        chunks = []
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await r.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                chunks.append(await r.readexactly(size + 2))  # the chunk and its CRLF (none for trailers)
                if size == 0:
                    break
        else:
            at = lower.find(b"\r\ncontent-length:")  # (not inference-header-content-length)
            if at >= 0:
                chunks.append(await r.readexactly(int(lower[at + 17 : lower.index(b"\r\n", at + 2)])))
        if b"connection: close" in lower:
            self.close()
        return status, b"".join(chunks)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.w.close()


async def cut_short(port: int, data: bytes, reset: bool) -> str:
    """Open a connection, send ``data`` and go away: a FIN, or a RST when ``reset``."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    if data:
        w.write(data)
        await w.drain()
    if reset:
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
    else:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
    return "aborted"


class GrpcSide:
    """The gRPC channels of one phase, their generic calls (raw bytes both ways)."""

    # each channel its own connection (grpc would otherwise share one between same-target channels)
    OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]

    def __init__(self, port: int, channels: int):
        import grpc

        self.grpc = grpc
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=self.OPTIONS) for _ in range(channels)]
        methods = ("ModelInfer", "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata")
        methods += ("ModelConfig", "ModelStatistics", "RepositoryIndex")
        self.unary = [{m: ch.unary_unary(SERVICE + m) for m in methods} for ch in self.channels]
        self.stream = [ch.stream_stream(SERVICE + "ModelStreamInfer") for ch in self.channels]

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


class Stream:
    """A ModelStreamInfer call kept open for ``budget`` messages, one in flight at a time."""

    def __init__(self, factory, budget: int):
        self.call = factory()
        self.left = budget

    async def send(self, data: bytes, parse) -> tuple[str, str]:
        self.left -= 1
        await self.call.write(data)
        raw = await self.call.read()
        if not isinstance(raw, bytes):
            return "stream_ended", ""
        resp = parse(raw)
        if not resp.error_message:
            return "ok", ""
        if "internal error" in resp.error_message:
            return "error_message:INTERNAL", resp.error_message
        return "error_message", resp.error_message

    async def close(self) -> str:
        await self.call.done_writing()
        while isinstance(await self.call.read(), bytes):
            pass
        return (await self.call.code()).name


# ============================================================================ the run


@dataclass
class Sample:
    t: float
    done: int
    rss_kib: int
    fds: int
    threads: int
    cpu_s: float  # the server's CPU time so far
    phase: str


def read_proc(pid: int) -> tuple[int, int, int, float]:
    """(VmRSS in KiB, open fds, threads, CPU seconds) of process ``pid``."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads, cpu


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)


class Soak:
    def __init__(self, args, server: Server, ports: dict[str, int], payloads: Payloads, schedule: np.ndarray):
        from tritonclient.grpc import service_pb2 as pb

        self.args, self.server, self.ports, self.p = args, server, ports, payloads
        self.pid = server.proc.pid
        self.parse_stream = pb.ModelStreamInferResponse.FromString
        self.schedule = schedule
        self.kinds = [KINDS[i] for i in sorted(set(schedule.tolist()))]
        self.tally = {k.name: Tally() for k in self.kinds}
        self.samples: list[Sample] = []
        self.done = self.next = self.end = 0
        self.t0 = time.monotonic()
        self.traffic_s = 0.0
        self.reconnects = 0
        self.stream_closes: Counter = Counter()
        self.stopped: str | None = None  # why the run was cut short
        self.metrics_warm: dict = {}
        self.metrics_end: dict = {}
        self.load_cpu_s = float("nan")

    def sample(self, phase: str) -> Sample:
        rss, fds, threads, cpu = read_proc(self.pid)
        s = Sample(round(time.monotonic() - self.t0, 3), self.done, rss, fds, threads, cpu, phase)
        self.samples.append(s)
        return s

    def record(self, kind: Kind, outcome: str, detail: str) -> None:
        t = self.tally[kind.name]
        t.outcomes[outcome] += 1
        if outcome not in kind.expect and len(t.examples) < 5:
            t.examples.append({"request": self.done, "outcome": outcome, "detail": detail[:300]})
        self.done += 1

    async def phase(self, start: int, end: int, label: str) -> None:
        self.next, self.end = start, end
        grpc_side = GrpcSide(self.ports["grpc"], self.args.grpc_channels)
        workers = [Worker(self, grpc_side, w) for w in range(self.args.concurrency)]
        watch = asyncio.ensure_future(self.watch(label))
        t = time.monotonic()
        try:
            await asyncio.gather(*(w.run() for w in workers))
        finally:
            self.traffic_s += time.monotonic() - t
            watch.cancel()
            for w in workers:
                await w.close()
            await grpc_side.close()

    async def watch(self, label: str) -> None:
        """Sample every second, say how it goes every few, stop a stalled run or a dead server."""
        last_say = last_t = time.monotonic()
        last_done = self.done
        progress_at, progress_done = last_t, self.done
        while True:
            await asyncio.sleep(self.args.sample_s)
            now = time.monotonic()
            if self.server.proc.poll() is not None:
                self.stopped = f"the server exited with status {self.server.proc.returncode}"
            elif self.done != progress_done:
                progress_at, progress_done = now, self.done
            elif now - progress_at > STALL_S:
                self.stopped = f"no request finished for {STALL_S:g} s"
            if self.stopped:
                self.end = self.next
                say(f"stopping: {self.stopped}")
                return
            s = self.sample(label)
            if now - last_say >= self.args.progress_s:
                bad = sum(self.unexpected(k) for k in self.kinds)
                say(
                    f"{label}: {self.done:,} / {self.args.requests:,} requests, "
                    f"{(self.done - last_done) / (now - last_t):,.0f} req/s, RSS {s.rss_kib / 1024:.1f} MiB, "
                    f"fds {s.fds}, threads {s.threads}, unexpected {bad}"
                )
                last_say, last_t, last_done = now, now, self.done

    async def settle(self, label: str) -> Sample:
        """With no traffic and every client connection closed: wait until the server's fd count
        has not changed for a second (at most 20 s), then read RSS and fds."""
        t_end = time.monotonic() + 20.0
        prev, since = -1, time.monotonic()
        while time.monotonic() < t_end:
            fds = read_proc(self.pid)[1]
            if fds != prev:
                prev, since = fds, time.monotonic()
            elif time.monotonic() - since >= 1.0:
                break
            await asyncio.sleep(0.1)
        return self.sample(label)

    def unexpected(self, kind: Kind) -> int:
        outcomes = self.tally[kind.name].outcomes
        wrong = {o: n for o, n in outcomes.items() if o not in kind.expect}
        shed = sum(n for o, n in wrong.items() if o in SHED)  # (forgiven up to SHED_SHARE of the kind)
        return sum(wrong.values()) - (shed if shed <= SHED_SHARE * sum(outcomes.values()) else 0)


def server_error(outcome: str) -> bool:
    code = outcome.rsplit(":", 1)[-1]
    return (code.isdigit() and int(code) >= 500) or code in SERVER_ERROR_CODES


class Worker:
    def __init__(self, soak: Soak, grpc_side: GrpcSide, n: int):
        self.s, self.g = soak, grpc_side
        self.unary = grpc_side.unary[n % len(grpc_side.unary)]
        self.stream_factory = grpc_side.stream[n % len(grpc_side.stream)]
        self.http: HttpConn | None = None
        self.stream: Stream | None = None
        self.rng = random.Random(soak.args.seed * 1000 + n)

    async def run(self) -> None:
        s, kinds, p = self.s, KINDS, self.s.p
        rpc_error = self.g.grpc.aio.AioRpcError
        while s.next < s.end:
            i = s.next
            s.next = i + 1
            kind = kinds[s.schedule[i]]
            what = p.make(kind, i)
            detail = ""
            try:
                if kind.transport == "http":
                    outcome, detail = await self.http_call(what)
                elif kind.transport == "grpc":
                    outcome = await self.grpc_call(kind, *what)
                elif kind.transport == "stream":
                    outcome, detail = await self.stream_call(what)
                else:
                    outcome = await cut_short(*what)
            except rpc_error as e:
                outcome, detail = e.code().name, e.details() or ""
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                outcome, detail = f"client_error:{type(e).__name__}", str(e)
                if self.http is not None and kind.transport == "http":
                    self.http.close()
                    self.http = None
            s.record(kind, outcome, detail)

    async def http_call(self, data: bytes) -> tuple[str, str]:
        if self.http is None or not self.http.open:
            if self.http is not None:
                self.s.reconnects += 1
            self.http = await HttpConn.connect(self.s.ports["http"])
        status, body = await self.http.call(data)
        return str(status), body.decode("utf-8", "replace") if status != 200 else ""

    async def grpc_call(self, kind: Kind, method: str, data: bytes) -> str:
        if kind.name == "grpc_conn_drop":
            return await self.conn_drop(data)
        call = self.unary[method]
        if kind.name != "grpc_cancel":
            await call(data, timeout=STALL_S)
            return "OK"
        if self.rng.random() < 0.5:
            await call(data, timeout=self.rng.choice((0.0002, 0.0005, 0.001)))
            return "OK"
        pending = call(data, timeout=STALL_S)
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)
        pending.cancel()
        try:
            await pending
        except asyncio.CancelledError:
            return "CANCELLED"
        return "OK"

    async def conn_drop(self, data: bytes) -> str:
        """A channel of its own (a new connection) closed while its call may still run."""
        grpc = self.g.grpc
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.s.ports['grpc']}", options=GrpcSide.OPTIONS)
        if self.rng.random() < 0.75:  # else closed while it connects
            try:
                await asyncio.wait_for(channel.channel_ready(), STALL_S)
            except TimeoutError:
                await channel.close()
                return "connect_timeout"
        pending = channel.unary_unary(SERVICE + "ModelInfer")(data, timeout=STALL_S)
        await asyncio.sleep(self.rng.choice((0, 0.0002, 0.0005, 0.001, 0.005)))
        await channel.close()
        try:
            await pending
        except asyncio.CancelledError:
            return "CANCELLED"
        return "OK"

    async def stream_call(self, data: bytes) -> tuple[str, str]:
        if self.stream is None:
            self.stream = Stream(self.stream_factory, self.rng.randrange(100, 2000))
        try:
            outcome = await self.stream.send(data, self.s.parse_stream)
        except self.g.grpc.aio.AioRpcError as e:
            self.stream = None
            return f"stream:{e.code().name}", e.details() or ""
        if self.stream.left <= 0 or outcome[0] == "stream_ended":
            await self.close_stream()
        return outcome

    async def close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                self.s.stream_closes[await stream.close()] += 1
            except self.g.grpc.aio.AioRpcError as e:
                self.s.stream_closes[e.code().name] += 1

    async def close(self) -> None:
        await self.close_stream()
        if self.http is not None:
            self.http.close()
            with contextlib.suppress(OSError):
                await self.http.w.wait_closed()
            self.http = None


def scrape_metrics(port: int | None) -> dict:
    """Series and bytes of /metrics, and how many lines name a made-up model."""
    if port is None:
        return {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return {"series": len(lines), "bytes": len(text), "unknown_names": sum(UNKNOWN_PREFIX in ln for ln in lines)}


def make_schedule(n: int, warmup: int, seed: int, names: set[str]) -> np.ndarray:
    """Indexes into KINDS of the kinds ``names``, drawn by weight; each phase holds every one."""
    rng = np.random.default_rng(seed)
    chosen = np.array([i for i, k in enumerate(KINDS) if k.name in names])
    w = np.array([KINDS[i].weight for i in chosen], dtype=float)
    sched = chosen[rng.choice(len(chosen), size=n, p=w / w.sum())].astype(np.uint8)
    for a, b in ((0, warmup), (warmup, n)):
        sched[rng.choice(np.arange(a, b), size=len(chosen), replace=False)] = chosen
    return sched


# grpc.aio logs this (with a traceback) when a handler answers a call the client has already
# cancelled or whose deadline has passed: the status can no longer be sent. Counted on its own
# (grpc/grpc#43360: grpc.aio also leaks the failed batch's grpc_op array then), not a failure.
CLIENT_GONE = re.compile(r"ERROR grpc\._cython\.cygrpc: ExecuteBatchError raised in core by servicer method")
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def scan_log(path: Path) -> dict:
    """The server's log records by level; its errors and tracebacks, apart from the known
    ExecuteBatchError of a call the client left (a record's traceback is the lines under it)."""
    levels: Counter = Counter()
    examples: list[str] = []
    errors = tracebacks = client_gone = 0
    known = False  # the record the lines now read belong to is a CLIENT_GONE one
    with open(path, errors="replace") as f:
        for line in f:
            m = LOG_RECORD.match(line)
            if m:
                level = m.group(1)
                levels[level] += 1
                known = CLIENT_GONE.search(line) is not None
                client_gone += known
                errors += level in ("ERROR", "CRITICAL") and not known
                if level not in ("DEBUG", "INFO") and not known and len(examples) < 10:
                    examples.append(line.rstrip()[:400])
            elif line.startswith("Traceback") and not known:
                tracebacks += 1
                if len(examples) < 10:
                    examples.append(line.rstrip())
    return {
        "lines_by_level": dict(levels),
        "errors": errors,
        "tracebacks": tracebacks,
        "grpc_execute_batch_errors": client_gone,
        "examples": examples,
    }


# ============================================================================ report


def plot(doc: dict, samples: list[Sample], paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    mem, fds = doc["memory"], doc["fds"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    live = [s for s in samples if not s.phase.startswith("settled")]
    settled = [s for s in samples if s.phase.startswith("settled")]
    ax.plot([s.done for s in live], [s.rss_kib / 1024 for s in live], color="#2f6fb3", lw=1.4, label="RSS")
    ax.scatter(
        [s.done for s in settled],
        [s.rss_kib / 1024 for s in settled],
        color="#2f6fb3",
        zorder=3,
        label="RSS, traffic stopped and connections closed",
    )
    warm = mem["rss_warm_kib"] / 1024
    limit = doc["limits"]["max_rss_growth_pct"]
    ax.axhline(warm * (1 + limit / 100), color="#b3261e", ls=":", lw=1, label=f"warm-up RSS + {limit:g}%")
    ax.axvline(doc["meta"]["warmup_requests"], color="gray", ls="--", lw=1)
    ax.set_xlabel("requests done")
    ax.set_ylabel("server RSS, MiB")
    top = max(max(s.rss_kib for s in samples) / 1024, warm * (1 + limit / 100))
    ax.set_ylim(0, top * 1.15)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax2 = ax.twinx()
    ax2.step([s.done for s in samples], [s.fds for s in samples], where="post", color="#d08a1e", lw=1, label="open fds")
    ax2.set_ylabel("server open file descriptors")
    ax2.set_ylim(0, max(s.fds for s in samples) * 1.6)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    t = doc["totals"]
    ax.set_title(
        f"batchgate soak: {t['requests']:,} requests ({t['bad']:,} bad) in {doc['duration_s']:.0f} s, "
        f"{doc['rate_rps']:,.0f} req/s; {doc['result']}\n"
        f"RSS {warm:.1f} -> {mem['rss_end_kib'] / 1024:.1f} MiB ({mem['rss_growth_pct']:+.2f}%) after warm-up; "
        f"fds {fds['warm']} -> {fds['end']}; server errors {t['server_errors']}, unexpected {t['unexpected']}",
        fontsize=9,
    )
    fig.tight_layout()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110)
    plt.close(fig)


def summary(doc: dict) -> str:
    mem, fds, t, log = doc["memory"], doc["fds"], doc["totals"], doc["server_log"]
    rows = ["| kind | requests | outcomes | unexpected |", "|---|---:|---|---:|"]
    for name, k in doc["kinds"].items():
        outs = ", ".join(f"{o} {n:,}" for o, n in sorted(k["outcomes"].items()))
        rows.append(f"| {name} | {k['count']:,} | {outs} | {k['unexpected']} |")
    rows += [
        "",
        f"- {t['requests']:,} requests ({t['good']:,} good, {t['bad']:,} bad) in {doc['duration_s']:.1f} s of "
        f"traffic: {doc['rate_rps']:,.0f} req/s; concurrency {doc['meta']['concurrency']}",
        f"- RSS: {mem['rss_start_kib'] / 1024:.1f} MiB idle at start, {mem['rss_warm_kib'] / 1024:.1f} MiB after "
        f"warm-up ({doc['meta']['warmup_requests']:,} requests), {mem['rss_end_kib'] / 1024:.1f} MiB at the end: "
        f"{mem['rss_growth_pct']:+.2f}% (limit {doc['limits']['max_rss_growth_pct']:g}%); max "
        f"{mem['rss_max_kib'] / 1024:.1f} MiB; slope {mem['rss_slope_bytes_per_request']:+.2f} bytes / request",
        f"- fds: {fds['start']} at start, {fds['warm']} after warm-up, {fds['end']} at the end (max {fds['max']} "
        f"under load); threads {doc['threads']['warm']} -> {doc['threads']['end']}",
        f"- CPU: server {doc['cpu']['server_us_per_request']:.0f} µs / request, load generator "
        f"{doc['cpu']['load_generator_us_per_request']:.0f} µs / request",
        f"- server errors (5xx / INTERNAL): {t['server_errors']}; unexpected answers: {t['unexpected']}; "
        f"made-up names in /metrics: {doc['metrics'].get('end', {}).get('unknown_names')}; server log: "
        f"{log['errors']} errors, {log['tracebacks']} tracebacks, {log['grpc_execute_batch_errors']} "
        "grpc ExecuteBatchError (a call the client had left)",
        f"- result: **{doc['result']}**" + (f": {'; '.join(doc['failures'])}" if doc["failures"] else ""),
    ]
    return "\n".join(rows)


# ============================================================================ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="batchgate soak test: RSS and fds over a million mixed requests")
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests in all (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS:,} requests: a smoke run")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the requests in the warm-up (default 0.1)")
    ap.add_argument("--grpc-channels", type=int, default=2, help="gRPC channels (connections) per phase (default 2)")
    ap.add_argument("--max-rss-growth-pct", type=float, default=5.0, help="fail at this RSS growth (default 5)")
    ap.add_argument("--sample-s", type=float, default=1.0, help="seconds between RSS / fd samples (default 1)")
    ap.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines (default 5)")
    ap.add_argument("--kinds", help="send only these request kinds (comma-separated), e.g. to find what grows")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument(
        "--grpc-engine",
        choices=("grpcio", "h2"),
        default="h2",
        help="the server's gRPC engine (default h2, batchgate's default)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and the load generator to cores")
    ap.add_argument("--output", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--plot-to", type=Path, help="also write the plot here (e.g. docs/soak.png)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = QUICK_REQUESTS
    names = {k.name for k in KINDS}
    args.kinds = set(args.kinds.split(",")) if args.kinds else names
    if args.kinds - names:
        ap.error(f"unknown kinds {', '.join(sorted(args.kinds - names))}; the kinds are {', '.join(sorted(names))}")
    if args.concurrency < 1 or not 0 < args.warmup < 1 or args.grpc_channels < 1:
        ap.error("--concurrency and --grpc-channels must be at least 1, --warmup between 0 and 1")
    if min(args.requests * args.warmup, args.requests * (1 - args.warmup)) < len(args.kinds):
        ap.error(f"--requests too small: each phase must hold each of the {len(args.kinds)} kinds")
    return args


async def drive(soak: Soak, warmup: int) -> None:
    n = soak.args.requests
    say(f"warm-up: {warmup:,} requests")
    await soak.phase(0, warmup, "warm-up")
    soak.metrics_warm = scrape_metrics(soak.ports.get("metrics"))
    warm = await soak.settle("settled:warm")
    say(f"warm-up done, connections closed: RSS {warm.rss_kib / 1024:.1f} MiB, fds {warm.fds}; main phase")
    if not soak.stopped:
        await soak.phase(warmup, n, "soak")
    soak.metrics_end = scrape_metrics(soak.ports.get("metrics"))
    end = await soak.settle("settled:end")
    say(f"done, connections closed: RSS {end.rss_kib / 1024:.1f} MiB, fds {end.fds}")


def main(argv=None) -> int:
    args = parse_args(argv)
    pin = choose_pinning(not args.no_pin)
    warmup = int(args.requests * args.warmup)
    t_start = time.monotonic()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="batchgate-soak-") as d:
        tmp = Path(d)
        import subprocess

        subprocess.run([py, "-m", "batchgate.cli", "demo-repo", str(tmp / "models")], check=True, capture_output=True)
        cmd = [
            *pin.server,
            py,
            "-m",
            "batchgate.cli",
            "serve",
            "--model-repository",
            str(tmp / "models"),
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--log-level",
            args.log_level,
            "--grpc-engine",
            args.grpc_engine,
        ]
        try:
            server = Server("batchgate", cmd, BATCHGATE_READY, tmp / "server.log")
        except BenchError as e:
            say(str(e))
            return 1
        m = server.match
        ports = {"http": int(m["http"]), "grpc": int(m["grpc"])}
        if m["metrics"]:
            ports["metrics"] = int(m["metrics"])
        if pin.cores:
            os.sched_setaffinity(0, {int(pin.cores[1])})
        say(f"server pid {server.proc.pid}, ports {ports}; pinning: {pin.note}")
        say(f"{args.requests:,} requests, {len(args.kinds)} kinds, concurrency {args.concurrency}, seed {args.seed}")
        try:
            payloads = Payloads(args.seed, ports["http"], ports["grpc"])
            soak = Soak(args, server, ports, payloads, make_schedule(args.requests, warmup, args.seed, args.kinds))
            soak.sample("settled:start")
            load_cpu0 = _own_cpu()
            import uvloop

            uvloop.run(drive(soak, warmup))
            alive = server.proc.poll() is None
            soak.load_cpu_s = _own_cpu() - load_cpu0
        finally:
            server.stop()
        log = scan_log(tmp / "server.log")
        log["tail"] = server.log_tail(5).splitlines()
    doc = report(args, pin, soak, warmup, alive, log, time.monotonic() - t_start)
    print(summary(doc))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"soak-{stamp}.json"
    out.write_text(json.dumps(finite(doc), indent=2) + "\n")
    pngs = [out.with_suffix(".png")] + ([args.plot_to] if args.plot_to else [])
    try:
        plot(doc, soak.samples, pngs)
    except Exception as e:  # a plot is a nicety; the JSON is the result
        say(f"could not draw the plot: {e}")
    say(f"wrote {out} and {', '.join(map(str, pngs))}; {doc['result']}")
    return 0 if doc["result"] == "PASS" else 1


def git_state() -> dict:
    """The commit the server ran from, and whether its code differed from it."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--", "server", "pyproject.toml").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "server_changes": [ln[3:] for ln in dirty]}


def _own_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(args, pin, soak: Soak, warmup: int, alive: bool, log: dict, wall_s: float) -> dict:
    import grpc

    by = {s.phase: s for s in soak.samples if s.phase.startswith("settled")}
    start, warm, end = by["settled:start"], by["settled:warm"], by["settled:end"]
    main_live = [s for s in soak.samples if s.phase == "soak"]
    slope = (
        float(np.polyfit([s.done for s in main_live], [s.rss_kib * 1024 for s in main_live], 1)[0])
        if len(main_live) > 2
        else float("nan")
    )
    kinds = {}
    for k in soak.kinds:
        t = soak.tally[k.name]
        kinds[k.name] = {
            "transport": k.transport,
            "good": k.good,
            "what": k.what,
            "expected": sorted(k.expect),
            "count": sum(t.outcomes.values()),
            "outcomes": dict(t.outcomes),
            "unexpected": soak.unexpected(k),
            "server_errors": sum(n for o, n in t.outcomes.items() if server_error(o)),
            "examples": t.examples,
        }
    totals = {
        "requests": soak.done,
        "good": sum(v["count"] for v in kinds.values() if v["good"]),
        "bad": sum(v["count"] for v in kinds.values() if not v["good"]),
        "unexpected": sum(v["unexpected"] for v in kinds.values()),
        "server_errors": sum(v["server_errors"] for v in kinds.values()),
    }
    growth = (end.rss_kib - warm.rss_kib) / warm.rss_kib * 100
    metrics = {"warm": soak.metrics_warm, "end": soak.metrics_end}
    failures = []
    if soak.stopped:
        failures.append(f"stopped early: {soak.stopped}")
    if not alive:
        failures.append("the server died")
    if soak.done < args.requests:
        failures.append(f"only {soak.done:,} of {args.requests:,} requests done")
    if totals["server_errors"]:
        failures.append(f"{totals['server_errors']} server errors (5xx / INTERNAL)")
    if totals["unexpected"]:
        failures.append(f"{totals['unexpected']} unexpected answers")
    if growth >= args.max_rss_growth_pct:
        failures.append(f"RSS grew {growth:.2f}% (limit {args.max_rss_growth_pct:g}%)")
    if end.fds > warm.fds:
        failures.append(f"open fds grew from {warm.fds} to {end.fds}")
    if any(m.get("unknown_names") for m in metrics.values()):
        failures.append("made-up model names in /metrics")
    if log["errors"] or log["tracebacks"]:
        failures.append(f"the server logged {log['errors']} errors and {log['tracebacks']} tracebacks")
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["bench/soak.py", *(sys.argv[1:])]),
            "requests": args.requests,
            "warmup_requests": warmup,
            "concurrency": args.concurrency,
            "grpc_channels": args.grpc_channels,
            "seed": args.seed,
            "kinds": "all" if len(soak.kinds) == len(KINDS) else sorted(args.kinds),
            "pinning": pin.note,
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "server_log_level": args.log_level,
            "git": git_state(),
            "wall_s": round(wall_s, 1),
        },
        "result": "FAIL" if failures else "PASS",
        "failures": failures,
        "limits": {"max_rss_growth_pct": args.max_rss_growth_pct, "fds": "no growth"},
        "duration_s": soak.traffic_s,
        "rate_rps": soak.done / soak.traffic_s if soak.traffic_s else 0.0,
        "memory": {
            "rss_start_kib": start.rss_kib,
            "rss_warm_kib": warm.rss_kib,
            "rss_end_kib": end.rss_kib,
            "rss_max_kib": max(s.rss_kib for s in soak.samples),
            "rss_growth_pct": growth,
            "rss_slope_bytes_per_request": slope,
        },
        "fds": {"start": start.fds, "warm": warm.fds, "end": end.fds, "max": max(s.fds for s in soak.samples)},
        "threads": {"start": start.threads, "warm": warm.threads, "end": end.threads},
        "metrics": metrics,
        "cpu": {
            "server_s": end.cpu_s - start.cpu_s,
            "server_us_per_request": (end.cpu_s - start.cpu_s) / max(1, soak.done) * 1e6,
            "load_generator_s": soak.load_cpu_s,
            "load_generator_us_per_request": soak.load_cpu_s / max(1, soak.done) * 1e6,
        },
        "http_reconnects": soak.reconnects,
        "stream_closes": dict(soak.stream_closes),
        "totals": totals,
        "kinds": kinds,
        "server_log": log,
        "samples_fields": ["t_s", "done", "rss_kib", "fds", "threads", "server_cpu_s", "phase"],
        "samples": [[s.t, s.done, s.rss_kib, s.fds, s.threads, s.cpu_s, s.phase] for s in soak.samples],
    }


if __name__ == "__main__":
    raise SystemExit(main())
