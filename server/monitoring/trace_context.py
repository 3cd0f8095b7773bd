"""W3C Trace Context on the wire: reading a request's ``traceparent`` and ``tracestate`` (HTTP
headers or gRPC metadata), judging them, and what a call sent on to an upstream carries of them.
No OpenTelemetry import here: a span is only asked for its context (monitoring/tracing.py starts
and ends them)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
MAX_TRACESTATE = 512  # W3C: at most 32 members; a longer header is not carried on
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

TraceHeaders = tuple[tuple[str, str], ...]  # W3C trace context as gRPC metadata: traceparent[, tracestate]


def traceparent_of(span: Any) -> str:
    """The W3C traceparent that makes a callee's spans children of ``span``."""
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def trace_headers(span: Any) -> TraceHeaders:
    """What a call made for ``span`` carries: its traceparent and, when the trace has one, the
    tracestate (W3C: a caller's vendor entries go on to every callee)."""
    state = span.get_span_context().trace_state
    parent = ("traceparent", traceparent_of(span))
    return (parent, ("tracestate", state.to_header())) if state else (parent,)


def trace_context(
    pairs, parent_key: Any = "traceparent", state_key: Any = "tracestate"
) -> tuple[str | None, str | None]:
    """A request's ``traceparent`` and ``tracestate`` from its header or metadata ``pairs``
    (bytes or text), as W3C Trace Context reads them: more than one traceparent is none (the
    trace starts afresh, as the specification's test suite expects), and several tracestate
    headers are one list, joined by commas."""
    parent = state = None
    parents = 0
    for k, v in pairs:
        if k == parent_key:
            parents += 1
            parent = v if isinstance(v, str) else v.decode("latin-1")
        elif k == state_key:
            text = v if isinstance(v, str) else v.decode("latin-1")
            state = text if state is None else f"{state},{text}"
    return (parent if parents == 1 else None), state


def passed_on(span: Any, traceparent: str | None, tracestate: str | None) -> TraceHeaders | None:
    """What a call sent on for a request carries of its trace: its span's context when it is
    traced; else the caller's own, as it came (valid only), so that an untraced request (tracing
    off, the caller's flag 00, past trace_max_per_s) neither cuts the caller's trace at the hop
    nor lets the upstream start one of its own."""
    if span is not None:
        return trace_headers(span)
    if not valid_traceparent(traceparent)[0]:
        return None
    assert traceparent is not None
    if tracestate and len(tracestate) <= MAX_TRACESTATE:
        # W3C: printable ASCII, its spaces SP or HTAB; anything else (control or non-ASCII bytes,
        # which an upstream stricter than grpcio refuses with the call) leaves it behind
        state = tracestate.replace("\t", " ")
        if _PRINTABLE.fullmatch(state):
            return (("traceparent", traceparent), ("tracestate", state))
    return (("traceparent", traceparent),)


def carried(headers: Mapping[str, str]) -> TraceHeaders | None:
    """What a call for one request the gateway does not trace carries: the caller's context as it
    came (``headers``: the request's, see ``core.types.caller_headers``), so the upstream follows
    the caller's trace and decision rather than starting a trace of its own."""
    parent = headers.get("traceparent")
    return None if parent is None else passed_on(None, parent, headers.get("tracestate"))


def valid_traceparent(value: str | None) -> tuple[bool, bool]:
    """(valid, sampled) of a W3C traceparent header: version 00 exactly; a later version read by
    its first 55 characters, as the specification asks (then a dash or the end); version ff and
    an all-zero id are invalid."""
    if not value or len(value) < 55 or (len(value) > 55 and (value[:2] == "00" or value[55] != "-")):
        return False, False
    m = _TRACEPARENT.fullmatch(value[:55])
    if m is None or m.group(1) == "ff" or m.group(2) == "0" * 32 or m.group(3) == "0" * 16:
        return False, False
    return True, bool(int(m.group(4), 16) & 1)
