"""The load test reads a stream error's status from its words (a V2 stream answer has no code, and
tritonclient's exception for one has no status either): batchgate's and Triton's messages."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from batchgate.core.scheduler import deadline_error
from batchgate.core.types import RequestLimits, Tensor, new_request
from batchgate.loadtest.stream_errors import stream_status


@pytest.mark.parametrize(
    "message, code",
    [
        (
            "the server is at its limit of 64 requests in flight; retry later or on another replica "
            "(max_inflight_requests)",
            "RESOURCE_EXHAUSTED",
        ),
        ("[request id: w0-7] model 'mlp' queue is full: 8 requests waiting (max_queue_size)", "RESOURCE_EXHAUSTED"),
        (
            "model 'mlp' has about 120 ms of work queued, more than the 50 ms a request may be made to wait "
            "(max_queue_wait_ms)",
            "RESOURCE_EXHAUSTED",
        ),
        ("API key 'k1' is over its rate of 5 requests/s (burst 5); retry later", "RESOURCE_EXHAUSTED"),
        (
            "[request id: a] deadline cannot be met: model 'm' has about 9.0 ms of work queued ahead, and "
            "1.0 ms remain; refused at once",
            "DEADLINE_EXCEEDED",
        ),
        ("[request id: a] queue timeout of model 'm' expired; the request was not executed", "DEADLINE_EXCEEDED"),
        ("model 'm' is not ready: unloading", "UNAVAILABLE"),
        ("batchgate is shutting down; send the request to another replica", "UNAVAILABLE"),
        ("[request id: <id_unknown>] Exceeds maximum queue size", "UNAVAILABLE"),  # Triton's full queue
        ("Request timeout expired", "UNAVAILABLE"),  # Triton's queue timeout (REJECT)
        ("unknown model 'nope'", "NOT_FOUND"),
        ("model 'm' has no version 3 loaded; loaded versions: 1", "NOT_FOUND"),
        ("API key 'k1' may not use model 'm' (its models: other)", "PERMISSION_DENIED"),
        # the words of a bad request are too many to read: no code rather than a wrong one
        ("input 'INPUT0' has shape [1, 5], expected [1..64, 4]", "UNKNOWN"),
        ("[request id: x] the request has 70 parameters; at most 64 are accepted (max_request_parameters)", "UNKNOWN"),
        ("[request id: odd] name] unknown model 'm'", "UNKNOWN"),  # (the prefix ends at the first "] ")
    ],
)
def test_a_stream_error_is_read_as_the_code_its_words_say(message, code):
    assert stream_status(message) == code


def test_batchgate_s_own_deadline_refusal_reads_as_deadline_exceeded():
    x = np.ones((1, 4), np.float32)
    req = new_request("m", "", [Tensor("x", "FP32", x.shape, x)], None, "r-1", None, {}, 0.0, "grpc", RequestLimits())
    assert stream_status(deadline_error(req).message) == "DEADLINE_EXCEEDED"


def test_tritonclient_gives_a_stream_error_no_status(server):
    """Why the words are read: tritonclient makes the exception of a stream's error answer from
    its message alone, so its status() has nothing to offer (a real stream to a real gateway)."""
    import queue

    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(lambda result, error: got.put(error))
    try:
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        c.async_stream_infer("no_such_model", [x])
        error = got.get(timeout=20)
    finally:
        c.stop_stream()
    assert isinstance(error, InferenceServerException) and error.status() is None
    assert stream_status(error.message()) == "NOT_FOUND", error.message()
