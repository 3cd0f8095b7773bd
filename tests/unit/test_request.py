"""The frozen request (``core.types.new_request``) and its tickets, without a server.

``new_request`` is what both transports build a request with: it makes the input arrays
read-only and the collections immutable, picks the id (V2 id, else ``x-request-id``) and
the deadline (earliest of the V2 ``timeout`` and the transport's own), marks synthetic
traffic and bounds what the caller attaches. The same request object may be submitted
twice; each submission has its own ``Ticket``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from batchgate.core.batcher_config import BatcherConfig
from batchgate.core.batching import DynamicBatcher
from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.scheduler import Ticket
from batchgate.core.signature import Checked
from batchgate.core.types import (
    EMPTY,
    MAX_WEIGHT,
    InferRequest,
    InferResponse,
    RequestLimits,
    Tensor,
    caller_headers,
    new_request,
    weight_of,
)
from batchgate.monitoring.trace_context import carried

LIMITS = RequestLimits()
ARRIVAL = 100.0


def tensor(name: str = "x", rows: int = 1) -> Tensor:
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return Tensor(name, "FP32", (rows, 4), data)


def build(
    request_id: str = "",
    parameters=None,
    headers=None,
    transport_deadline=None,
    outputs=None,
    limits: RequestLimits = LIMITS,
    inputs=None,
) -> InferRequest:
    hdrs = caller_headers(list((headers or {}).items()), limits)
    return new_request(
        "m",
        "",
        inputs if inputs is not None else [tensor()],
        outputs,
        request_id,
        parameters,
        hdrs,
        ARRIVAL,
        "grpc",
        limits,
        transport_deadline,
    )


def refused(fn, *args, **kwargs) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        fn(*args, **kwargs)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value


# ------------------------------------------------------------------ frozen
def test_input_arrays_become_read_only():
    t = tensor(rows=2)
    assert t.data.flags.writeable
    req = build(inputs=[t])
    data = req.inputs[0].data
    assert data.flags.writeable is False
    assert t.data.flags.writeable is False  # the caller's array itself: no copy that could drift
    with pytest.raises(ValueError):
        data[0, 0] = 42.0
    with pytest.raises(ValueError):
        data += 1
    np.testing.assert_array_equal(data, np.arange(8, dtype=np.float32).reshape(2, 4))


def test_collections_are_immutable_and_inputs_outputs_tuples():
    params = {"a": 1, "b": "two"}
    req = build(parameters=params, headers={"x-team": "search"}, outputs=["y", "z"])
    assert isinstance(req.inputs, tuple) and len(req.inputs) == 1
    assert req.outputs == ("y", "z") and isinstance(req.outputs, tuple)
    with pytest.raises(TypeError):
        req.parameters["a"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        req.headers["x-team"] = "ads"  # type: ignore[index]
    with pytest.raises(AttributeError):
        req.id = "changed"  # type: ignore[misc]
    params["late"] = 3  # the request holds its own copy
    assert dict(req.parameters) == {"a": 1, "b": "two"}
    assert dict(req.headers) == {"x-team": "search"}


def test_no_outputs_stays_none_and_no_parameters_is_the_shared_empty_mapping():
    req = build()
    assert req.outputs is None
    assert req.parameters is EMPTY and req.headers is EMPTY
    assert (req.priority, req.timeout_us, req.deadline, req.synthetic) == (0, 0, None, False)


# ------------------------------------------------------------------ id
@pytest.mark.parametrize(
    "v2_id, headers, want",
    [
        ("", {}, ""),
        ("v2-id", {}, "v2-id"),
        ("", {"x-request-id": "from-header"}, "from-header"),
        ("v2-id", {"x-request-id": "from-header"}, "v2-id"),
    ],
)
def test_the_id_is_the_v2_id_else_x_request_id(v2_id, headers, want):
    assert build(request_id=v2_id, headers=headers).id == want


# ------------------------------------------------------------------ deadline
@pytest.mark.parametrize(
    "timeout_us, transport, want",
    [
        (2_000_000, None, ARRIVAL + 2.0),  # V2 timeout alone
        (0, ARRIVAL + 3.0, ARRIVAL + 3.0),  # transport deadline alone
        (2_000_000, ARRIVAL + 1.0, ARRIVAL + 1.0),  # the transport's is earlier
        (2_000_000, ARRIVAL + 5.0, ARRIVAL + 2.0),  # the V2 timeout is earlier
        (0, None, None),  # timeout 0 = none
    ],
)
def test_the_deadline_is_the_earliest_of_v2_timeout_and_transport(timeout_us, transport, want):
    req = build(parameters={"timeout": timeout_us}, transport_deadline=transport)
    assert req.timeout_us == timeout_us
    if want is None:
        assert req.deadline is None
    else:
        assert req.deadline == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("timeout", -1, "parameter 'timeout' must be a non-negative integer of microseconds, not -1"),
        ("timeout", 1.5, "parameter 'timeout' must be a non-negative integer of microseconds, not 1.5"),
        ("timeout", True, "parameter 'timeout' must be a non-negative integer of microseconds, not True"),
        ("priority", -2, "parameter 'priority' must be a non-negative integer, not -2"),
        ("priority", "high", "parameter 'priority' must be a non-negative integer, not 'high'"),
        ("priority", False, "parameter 'priority' must be a non-negative integer, not False"),
    ],
)
def test_priority_and_timeout_must_be_non_negative_integers(name, value, fragment):
    assert refused(build, parameters={name: value}).message == fragment


def test_a_huge_invalid_parameter_value_is_quoted_short():
    e = refused(build, parameters={"priority": "p" * 100_000})
    assert e.message.startswith("parameter 'priority' must be a non-negative integer, not 'ppp")
    assert "..." in e.message and len(e.message) < 200


def test_priority_is_taken_from_the_parameters():
    assert build(parameters={"priority": 3}).priority == 3


# ------------------------------------------------------------------ synthetic
@pytest.mark.parametrize(
    "value, want",
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        (" Yes ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("", False),
        ("2", False),
        ("on", False),
        (None, False),
    ],
)
def test_synthetic_marker(value, want):
    headers = {} if value is None else {"x-batchgate-synthetic": value}
    assert build(headers=headers).synthetic is want


# ------------------------------------------------------------------ caller headers
def test_caller_headers_keep_only_x_headers_and_the_first_value_of_a_name():
    pairs = [
        ("content-type", "application/json"),
        ("x-a", "first"),
        ("authorization", "secret"),
        ("x-b", "b"),
        ("x-a", "second"),
        ("user-agent", "grpc-python"),
    ]
    got = caller_headers(pairs, LIMITS)
    assert list(got.items()) == [("x-a", "first"), ("x-b", "b")]
    with pytest.raises(TypeError):
        got["x-c"] = "c"  # type: ignore[index]
    assert caller_headers([("content-type", "text/plain")], LIMITS) is EMPTY
    assert caller_headers([], LIMITS) is EMPTY


def test_caller_headers_keep_the_trace_context_as_w3c_reads_it_outside_the_x_header_limits():
    """A remote model's call carries an untraced request's context from here, so it must be
    read as the tracer reads it: a repeated traceparent is none, tracestates are one list."""
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    full = [(f"x-h{i}", "v") for i in range(32)]  # (at max_caller_headers: the context is not counted)
    got = caller_headers([*full, ("traceparent", parent), ("tracestate", "a=1"), ("tracestate", "b=2")], LIMITS)
    assert (got["traceparent"], got["tracestate"], len(got)) == (parent, "a=1,b=2", 34)
    assert caller_headers([("traceparent", parent), ("traceparent", parent)], LIMITS)["traceparent"] == ""
    assert carried(caller_headers([("traceparent", parent), ("traceparent", parent)], LIMITS)) is None
    assert carried(caller_headers([("traceparent", parent), ("tracestate", "a=1")], LIMITS)) == (
        ("traceparent", parent),
        ("tracestate", "a=1"),
    )
    # a tracestate past its bound is held cut (not whole) and not sent on; a huge traceparent is none
    long = caller_headers([("traceparent", parent), *[("tracestate", "k=" + "v" * 300)] * 1000], LIMITS)
    assert len(long["tracestate"]) == 513 and carried(long) == (("traceparent", parent),)
    assert caller_headers([("traceparent", parent + "x" * 600)], LIMITS)["traceparent"] == ""
    assert carried(caller_headers([("x-a", "1")], LIMITS)) is None


def test_the_number_of_x_headers_is_bounded():
    at_limit = [(f"x-h{i}", "v") for i in range(32)]
    assert len(caller_headers(at_limit, LIMITS)) == 32
    # other headers and repeats of a name already kept do not count
    assert len(caller_headers(at_limit + [("x-h0", "again")] + [(f"other-{i}", "v") for i in range(100)], LIMITS)) == 32
    e = refused(caller_headers, at_limit + [("x-h32", "v")], LIMITS)
    assert e.message == "the request carries more than 32 x-* headers (max_caller_headers)"
    small = RequestLimits(max_caller_headers=2)
    assert (
        refused(caller_headers, [("x-a", "1"), ("x-b", "2"), ("x-c", "3")], small).message
        == "the request carries more than 2 x-* headers (max_caller_headers)"
    )
    none = RequestLimits(max_caller_headers=0)
    assert caller_headers([("content-type", "x")], none) is EMPTY
    assert "max_caller_headers" in refused(caller_headers, [("x-a", "1")], none).message


def test_the_size_of_one_x_header_is_bounded():
    name = "x-big"
    fits = "v" * (4096 - len(name))
    assert caller_headers([(name, fits)], LIMITS)[name] == fits
    e = refused(caller_headers, [(name, fits + "v")], LIMITS)
    assert e.message == "header 'x-big' is 4097 bytes; at most 4096 are accepted (max_caller_header_bytes)"
    # a big header that is not an x-* header is not the gateway's business
    assert caller_headers([("authorization", "t" * 100_000)], LIMITS) is EMPTY
    tiny = RequestLimits(max_caller_header_bytes=4)
    assert (
        refused(caller_headers, [("x-a", "12")], tiny).message
        == "header 'x-a' is 5 bytes; at most 4 are accepted (max_caller_header_bytes)"
    )


def test_the_error_for_a_huge_header_name_is_bounded():
    name = "x-" + "n" * 100_000
    e = refused(caller_headers, [(name, "v")], LIMITS)
    assert len(e.message) < 300, len(e.message)  # the name is cut to 128 characters
    assert e.message.startswith("header 'x-nnnn") and "...' is 100003 bytes" in e.message
    assert e.message.endswith("(max_caller_header_bytes)")


def test_header_limits_apply_through_new_request_callers():
    # what both transports do: bound the headers, then build the request with them
    with pytest.raises(GatewayError) as info:
        build(headers={f"x-h{i}": "v" for i in range(33)})
    assert "(max_caller_headers)" in info.value.message


# ------------------------------------------------------------------ parameters
def test_the_number_of_parameters_is_bounded():
    at_limit = {f"p{i}": i for i in range(64)}
    assert len(build(parameters=at_limit).parameters) == 64
    e = refused(build, parameters={**at_limit, "one_more": 1})
    assert e.message == "the request has 65 parameters; at most 64 are accepted (max_request_parameters)"
    e = refused(build, parameters={"a": 1}, limits=RequestLimits(max_request_parameters=0))
    assert e.message == "the request has 1 parameters; at most 0 are accepted (max_request_parameters)"


# ------------------------------------------------------------------ one request, two tickets
class Clock:
    def __init__(self):
        self.now = ARRIVAL

    def __call__(self):
        return self.now


class Recorder:
    """A backend that keeps each batch until the test finishes it."""

    def __init__(self):
        self.batches: list[list[Ticket]] = []
        self._pending: list = []

    def __call__(self, batch, done):
        self.batches.append(batch)
        self._pending.append((batch, done))

    def finish(self):
        batch, done = self._pending.pop(0)
        done(
            [
                InferResponse(
                    "m",
                    "1",
                    [Tensor("y", "FP32", t.request.inputs[0].shape, t.request.inputs[0].data * 2)],
                    id=t.request.id,
                )
                for t in batch
            ]
        )


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


def ticket_of(req: InferRequest) -> Ticket:
    return Ticket(req, Checked({"x": req.inputs[0].data}, ("y",), req.inputs[0].shape[0]))


async def test_the_same_request_submitted_twice_gets_two_answers_and_independent_tickets():
    clock, rec = Clock(), Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_size=1, instances=1), clock=clock, name="m")
    req = build(request_id="twice")
    first, second = ticket_of(req), ticket_of(req)
    assert first is not second and first.request is second.request
    a = asyncio.ensure_future(batcher.submit(first))
    b = asyncio.ensure_future(batcher.submit(second))
    await settle()
    assert rec.batches == [[first]]  # one instance, one row a batch: the second waits
    assert first.dispatched == ARRIVAL and second.dispatched == 0.0
    clock.now = ARRIVAL + 0.25
    rec.finish()
    await settle()
    assert rec.batches == [[first], [second]]
    assert first.dispatched == ARRIVAL and second.dispatched == ARRIVAL + 0.25  # each its own
    rec.finish()
    ra, rb = await asyncio.gather(a, b)
    assert ra is not rb and ra.id == rb.id == "twice"
    np.testing.assert_array_equal(ra.outputs[0].data, rb.outputs[0].data)
    np.testing.assert_array_equal(ra.outputs[0].data, req.inputs[0].data * 2)
    assert batcher.queue_depth == 0 and batcher.executing == 0


async def test_the_same_request_twice_in_one_batch_is_two_entries():
    clock, rec = Clock(), Recorder()
    batcher = DynamicBatcher(rec, BatcherConfig(max_batch_size=4, max_queue_delay_s=0.010), clock=clock, name="m")
    req = build(request_id="pair")
    first, second = ticket_of(req), ticket_of(req)
    a = asyncio.ensure_future(batcher.submit(first))
    b = asyncio.ensure_future(batcher.submit(second))
    await settle()
    assert batcher.queue_depth == 2 and rec.batches == []
    clock.now = ARRIVAL + 0.010
    batcher.tick()
    assert rec.batches == [[first, second]]
    assert first.dispatched == second.dispatched == ARRIVAL + 0.010
    first.dispatched = 1.0  # what one submission notes is not seen by the other
    assert second.dispatched == ARRIVAL + 0.010
    rec.finish()
    ra, rb = await asyncio.gather(a, b)
    assert ra is not rb and ra.id == rb.id == "pair"
    np.testing.assert_array_equal(ra.outputs[0].data, rb.outputs[0].data)


def test_batch_scorings_header_marks_a_request_offline():
    import numpy as np

    from batchgate.core.types import RequestLimits, Tensor, new_request

    x = np.zeros((1, 4), np.float32)

    def made(headers):
        return new_request("m", "", [Tensor("x", "FP32", (1, 4), x.copy())], None, "", None, headers, 0.0, "grpc",
                           RequestLimits())  # fmt: skip

    assert made({"x-batchgate-offline": "1"}).offline and made({"x-batchgate-offline": "true"}).offline
    assert not made({}).offline and not made({"x-batchgate-offline": "0"}).offline
    assert not made({"x-batchgate-offline": "1"}).synthetic


@pytest.mark.parametrize(
    "value, want",
    [(None, 1), ("", 1), ("7", 7), ("0", 1), ("-3", 1), ("x", 1), ("٣", 1), ("9999999", 1), ("999999", MAX_WEIGHT)],
)
def test_a_front_workers_request_count_is_a_bounded_whole_number(value, want):
    assert weight_of(value) == want
