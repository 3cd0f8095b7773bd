"""The settings' ``limits`` section: bounds on every size, count, rate and wait a client controls
(split from settings_sections.py, which re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass

from .settings_field import setting as _setting


@dataclass(frozen=True)
class LimitSettings:
    """Section ``limits``: bounds on what callers may send and queue."""

    max_queue_size: int = _setting(
        4096,
        "requests that may wait per model version, unless its config sets one; a full queue "
        "answers RESOURCE_EXHAUSTED / 429 at once",
        minimum=1,
        why="every queue is bounded: 0 no longer means unbounded",
    )
    max_request_bytes: int = _setting(
        64 * 1024 * 1024, "largest HTTP body (also after decompression) and gRPC message", minimum=1
    )
    max_caller_headers: int = _setting(
        32, "caller x-* headers (HTTP) or metadata entries (gRPC) kept on a request; more = INVALID_ARGUMENT", minimum=0
    )
    max_caller_header_bytes: int = _setting(
        4096, "bytes of name + value of one such header; longer = INVALID_ARGUMENT", minimum=1
    )
    max_request_parameters: int = _setting(64, "V2 parameters on one request; more = INVALID_ARGUMENT", minimum=0)
    max_request_id_bytes: int = _setting(
        256, "the V2 id (or x-request-id) a request is answered with; longer = INVALID_ARGUMENT", minimum=1
    )
    max_buffered_request_bytes: int = _setting(
        1 << 30,
        "h2 gRPC engine: bytes of request messages read and not yet whole, all connections together (each "
        "connection holds at most 4 x max_request_bytes); a call past it = RESOURCE_EXHAUSTED. HTTP bounds the "
        "bytes of request bodies still arriving by it too, apart (429)",
        minimum=1,
    )
    max_unsent_answer_bytes: int = _setting(
        1 << 30,
        "bytes of answers written for clients that do not take them, all connections and both protocols "
        "together: HTTP connections with more than 64 KiB left to write and, on the h2 gRPC engine, answers "
        "waiting for a client's flow-control window; past it the connections holding the most are aborted "
        "(counted unsent_answers / grpc_unsent_answers), so no answer larger than this can be sent. Not applied "
        "on the grpcio engine",
        minimum=1,
    )
    max_header_bytes: int = _setting(
        64 * 1024,
        "bytes of an HTTP request head (URL and headers); more = 431 and the connection closed (on the h2 gRPC "
        "engine: a call's headers and metadata, decoded; more refuses that call RESOURCE_EXHAUSTED, and past "
        "twice it closes the connection; on the grpcio engine gRPC core refuses the call RESOURCE_EXHAUSTED)",
        minimum=1,
    )
    max_header_fields: int = _setting(
        128,
        "header fields of an HTTP/1.1 request head and its chunked trailers together; more = 431 and the "
        "connection closed (on the h2 gRPC engine: fields of one header block; more closes the connection; "
        "on the grpcio engine not applied: gRPC core reads them in C, bounded by max_header_bytes alone)",
        minimum=16,
        why="a tritonclient gRPC call with a deadline sends 9, and room is left for a key and a few caller headers",
    )
    grpc_max_resets_per_s: int = _setting(
        1000,
        "streams one HTTP/2 connection's client may reset in a second on the h2 gRPC engine, beyond the calls "
        "it had answered in that second; past it the connection is closed (the 'rapid reset' attack: each "
        "reset call costs the server, not the client); a call reset once it has lived half its timeout is not "
        "counted (a client giving up on a late answer)",
        minimum=1,
    )
    grpc_max_concurrent_streams: int = _setting(
        1024,
        "gRPC calls one HTTP/2 connection may have open at once on the h2 engine (HTTP/2 "
        "MAX_CONCURRENT_STREAMS: a client past it waits for a slot)",
        minimum=1,
    )
    grpc_max_streaming_calls: int = _setting(
        8192,
        "streaming gRPC calls (ModelStreamInfer, Health.Watch) open at once on the h2 engine, all connections "
        "together, each streaming method apart (a stream may stay open and idle as long as its client likes); "
        "one more is refused RESOURCE_EXHAUSTED",
        minimum=1,
    )
    max_connections: int = _setting(
        8192,
        "connections open at once, HTTP and gRPC each (with TLS counted from the accept, the handshake "
        "included); one more HTTP connection is answered 503 and closed (with TLS closed before its handshake), "
        "one more gRPC connection is closed (grpcio engine: refused by gRPC core)",
        minimum=1,
    )
    max_pipelined_requests: int = _setting(
        128,
        "HTTP/1.1 requests one connection may have read and queued behind the one being answered "
        "(pipelining); one more closes the connection",
        minimum=1,
    )
    ops_max_connections: int = _setting(
        64,
        "connections open at once on each operations listener: the metrics port (a thread each; its request "
        "head bounded by max_header_bytes, every read and write by http_header_timeout_s), the plaintext "
        "health_port and the admin ports; one more is closed at once",
        minimum=1,
    )
    ops_max_connections_per_peer: int = _setting(
        8,
        "of those on the metrics port and the health_port, what one peer (an IPv4 address, an IPv6 /64) may "
        "hold at once; one more is closed at once, so one client cannot keep the scrapers or kubelet's probes out",
        minimum=1,
    )
    max_stream_inflight: int = _setting(
        64,
        "requests of one gRPC stream read and not yet answered; the stream is not read further until one is answered",
        minimum=1,
    )
    max_gzip_members: int = _setting(64, "gzip members in one compressed HTTP body; more = INVALID_ARGUMENT", minimum=1)
    max_inputs: int = _setting(64, "input tensors on one request; more = INVALID_ARGUMENT", minimum=1)
    max_outputs: int = _setting(64, "outputs one request may name; more = INVALID_ARGUMENT", minimum=1)
    max_inflight_requests: int = _setting(
        4096,
        "requests admitted and not yet answered in this process, all models together; one more is "
        "refused at once with RESOURCE_EXHAUSTED / 429",
        minimum=1,
    )
    max_queue_wait_ms: float = _setting(
        500.0,
        "refuse a request at once when the wait its model's queue is expected to impose (judged from "
        "the measured drain rate) exceeds this; 0 = no bound on the expected wait",
        minimum=0,
    )
    queue_target_ms: float = _setting(
        20.0,
        "sustained overload: once a model's expected queue wait has stayed above this for "
        "queue_interval_ms, requests are admitted only while it is within this (never less than one "
        "round of executions: full batches on every instance; nor, while shedding, than what lately kept the model "
        "from running dry between the event loop's reads), so answers keep a short wait and the excess is refused "
        "at once; bursts still queue up to max_queue_wait_ms; 0 = off",
        minimum=0,
    )
    queue_interval_ms: float = _setting(
        50.0,
        "how long a queue must stay above queue_target_ms to count as overload (a shorter excursion is a burst), "
        "and within it to count as recovered",
        minimum=1,
    )
    overload_refusals_per_s: int = _setting(
        8000,
        "HTTP overload refusals (429) a second the server answers as they come; past it, a connection "
        "just refused (still answered at once) is not read until its turn, turns coming at this rate one "
        "after another (TCP backpressure): clients that retry at once wait in their own sockets, for about "
        "the held connections over this rate, instead of taking the core from admitted work",
        minimum=1,
    )
    overload_retries_per_s: int = _setting(
        1000,
        "overload refusals a second of retries (a request read within two writing turns of the event loop and "
        "0.25 s of its connection's last refusal or hold, as a closed loop retries; on gRPC a connection that "
        "never carried two calls at once), on each protocol: a retry takes a turn at this rate as well, and "
        "thousands of clients retrying at once cost the core this many refusals a second",
        minimum=1,
    )
    grpc_overload_refusals_per_s: int = _setting(
        32000,
        "overload_refusals_per_s for the h2 gRPC engine, whose refusals cost about a tenth of an answer "
        "(answered before the request is parsed)",
        minimum=1,
    )
    max_tensor_dims: int = _setting(
        32,
        "dimensions of one input's shape (JSON data nested as deep at most); more = INVALID_ARGUMENT",
        minimum=1,
        maximum=64,
    )
    max_bytes_elements: int = _setting(
        65536,
        "BYTES (string) elements of one request, all its inputs together; more = INVALID_ARGUMENT (each costs "
        "some 450 bytes of Python objects and ~2 µs of the event loop, far more than its bytes on the wire)",
        minimum=1,
    )
