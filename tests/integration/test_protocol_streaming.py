"""gRPC bidirectional streaming (ModelStreamInfer) with the sync and the asyncio client:
a bad request on the stream gets its own error and the stream goes on."""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from protocol_support import simple_feeds
from tritonclient.grpc import service_pb2, service_pb2_grpc

BAD_INDEX = 7


def simple_inputs(mod, feeds: dict) -> list:
    out = []
    for name, arr in feeds.items():
        t = mod.InferInput(name, list(arr.shape), "INT32")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def bad_feeds() -> dict:
    """Wrong shape: 15 columns where the model wants 16."""
    return {"INPUT0": np.zeros((1, 15), np.int32), "INPUT1": np.zeros((1, 15), np.int32)}


def check_answers(results: dict, sent: dict) -> None:
    assert set(results) == set(sent), f"answered {sorted(results)}, sent {sorted(sent)}"
    for rid, feeds in sent.items():
        r = results[rid]
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"])


def test_sync_stream_bad_request_does_not_end_the_stream(server):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        sent = {}
        for i in range(20):
            if i == BAD_INDEX:
                client.async_stream_infer("simple", simple_inputs(grpcclient, bad_feeds()), request_id="bad")
                continue
            feeds = simple_feeds(1 + i % 3, seed=i)
            sent[f"r{i}"] = feeds
            client.async_stream_infer("simple", simple_inputs(grpcclient, feeds), request_id=f"r{i}")

        results, errors = {}, []
        for _ in range(20):
            result, error = answers.get(timeout=20)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result
        assert len(errors) == 1, [str(e) for e in errors]
        msg = errors[0].message()
        assert "INPUT0" in msg and "16" in msg and "15" in msg, msg
        assert "bad" in msg, f"the error should name the request it belongs to: {msg}"
        check_answers(results, sent)

        # the same stream keeps serving after the error
        feeds = simple_feeds(2, seed=99)
        client.async_stream_infer("simple", simple_inputs(grpcclient, feeds), request_id="after")
        result, error = answers.get(timeout=20)
        assert error is None, error
        check_answers({result.get_response().id: result}, {"after": feeds})

        # an unknown model on the stream: an error, then the stream still serves
        client.async_stream_infer("no_such_model", simple_inputs(grpcclient, feeds), request_id="ghost")
        result, error = answers.get(timeout=20)
        assert result is None and "no_such_model" in error.message()
        client.async_stream_infer("simple", simple_inputs(grpcclient, feeds), request_id="after2")
        result, error = answers.get(timeout=20)
        assert error is None, error
        assert result.get_response().id == "after2"
    finally:
        client.stop_stream()
        client.close()
    assert answers.empty()


async def test_aio_stream_infer_with_one_bad_request(server):
    client = grpcclient_aio.InferenceServerClient(server.grpc_url)
    sent = {}

    async def requests():
        for i in range(16):
            if i == BAD_INDEX:
                yield {
                    "model_name": "simple",
                    "inputs": simple_inputs(grpcclient_aio, bad_feeds()),
                    "request_id": "bad",
                }
                continue
            feeds = simple_feeds(1 + i % 4, seed=50 + i)
            sent[f"a{i}"] = feeds
            yield {"model_name": "simple", "inputs": simple_inputs(grpcclient_aio, feeds), "request_id": f"a{i}"}
            await asyncio.sleep(0)

    try:
        results, errors = {}, []
        stream = client.stream_infer(requests(), stream_timeout=30)
        async for result, error in stream:
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result
        assert len(errors) == 1
        assert "INPUT0" in errors[0].message()
        check_answers(results, sent)
    finally:
        await client.close()


async def test_aio_stream_mixes_models_and_versions(server, demo_repo):
    client = grpcclient_aio.InferenceServerClient(server.grpc_url)
    rng = np.random.default_rng(3)
    sent = {}

    async def requests():
        for i in range(12):
            if i % 2:
                x = rng.standard_normal((2, 4)).astype(np.float32)
                t = grpcclient_aio.InferInput("features", [2, 4], "FP32")
                t.set_data_from_numpy(x)
                sent[f"c{i}"] = x
                yield {"model_name": "classifier", "model_version": "1", "inputs": [t], "request_id": f"c{i}"}
            else:
                feeds = simple_feeds(1, seed=i)
                sent[f"s{i}"] = feeds
                yield {
                    "model_name": "simple",
                    "inputs": simple_inputs(grpcclient_aio, feeds),
                    "request_id": f"s{i}",
                    "outputs": [grpcclient_aio.InferRequestedOutput("OUTPUT1")],
                }

    try:
        seen = set()
        async for result, error in client.stream_infer(requests(), stream_timeout=30):
            assert error is None, error
            resp = result.get_response()
            seen.add(resp.id)
            if resp.id.startswith("c"):
                assert resp.model_name == "classifier"
                probs = result.as_numpy("probabilities")
                assert probs.shape == (2, 3)
                np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
            else:
                assert [o.name for o in resp.outputs] == ["OUTPUT1"]
                feeds = sent[resp.id]
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"])
        assert seen == set(sent)
    finally:
        await client.close()


async def test_aio_stream_ends_cleanly_with_no_requests(server):
    client = grpcclient_aio.InferenceServerClient(server.grpc_url)

    async def nothing():
        return
        yield  # pragma: no cover

    try:
        got = [x async for x in client.stream_infer(nothing(), stream_timeout=10)]
        assert got == []
        assert await client.is_server_live()
    finally:
        await client.close()


async def test_aio_short_streams_answer_every_request(server):
    """The last answers of a stream must not be lost when the client closes its side right
    after sending (an answer that lands after the end-of-requests mark still goes out)."""
    client = grpcclient_aio.InferenceServerClient(server.grpc_url)
    try:
        short = []
        for rep in range(40):
            n = 1 + rep % 5

            async def requests(n=n, rep=rep):
                for i in range(n):
                    yield {
                        "model_name": "simple",
                        "inputs": simple_inputs(grpcclient_aio, simple_feeds(1, seed=i)),
                        "request_id": f"{rep}-{i}",
                    }

            got = [r async for r in client.stream_infer(requests(), stream_timeout=20)]
            assert all(e is None for _, e in got)
            if len(got) != n:
                short.append((rep, n, len(got)))
        assert not short, f"streams that lost answers (rep, sent, answered): {short}"
    finally:
        await client.close()


def test_stream_with_an_unparsable_message(server):
    """A message that is not a ModelInferRequest is answered with an error; the requests
    around it are answered, the stream goes on, and the server serves on."""
    import grpc
    from tritonclient.grpc import service_pb2

    def good(i: int) -> bytes:
        req = service_pb2.ModelInferRequest(model_name="simple", id=f"g{i}")
        for name, arr in simple_feeds(1, seed=i).items():
            req.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
            req.raw_input_contents.append(arr.tobytes())
        return req.SerializeToString()

    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        ids, errors = [], []
        for resp in call(iter([good(0), good(1), b"\xff" * 10, good(2)]), timeout=20):
            if resp.error_message:
                errors.append(resp.error_message)
            else:
                ids.append(resp.infer_response.id)
    assert sorted(ids) == ["g0", "g1", "g2"]
    assert len(errors) == 1 and "not a valid inference.ModelInferRequest" in errors[0]

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.infer("simple", simple_inputs(grpcclient, simple_feeds(1))).as_numpy("OUTPUT0") is not None
    finally:
        client.close()


def test_enable_empty_final_response_marks_each_answer_final(server):
    """tritonclient's ``enable_empty_final_response=True`` (pytriton and streaming clients loop until
    an answer says ``triton_final_response``): every model here answers a request once, so that one
    answer is marked final, as Triton marks a non-decoupled model's answer. Without the option no
    such parameter is sent."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        feeds = simple_feeds(1, seed=3)
        client.async_stream_infer("simple", simple_inputs(grpcclient, feeds), enable_empty_final_response=True)
        result, error = answers.get(timeout=20)
        assert error is None, error
        params = result.get_response().parameters
        assert params["triton_final_response"].bool_param is True
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
        client.async_stream_infer("simple", simple_inputs(grpcclient, feeds))
        result, error = answers.get(timeout=20)
        assert error is None and "triton_final_response" not in result.get_response().parameters
    finally:
        client.stop_stream()
        client.close()


def test_a_final_response_flag_that_is_no_boolean_is_refused_on_the_stream(server):
    """Triton takes ``triton_enable_empty_final_response`` as a bool_param only ("invalid value
    type ... expected bool_param."); a string "true" was taken and read as false, so the answer
    came without the ``triton_final_response`` the caller waits for. The stream goes on."""
    req = service_pb2.ModelInferRequest(model_name="simple", id="flag")
    for name, array in simple_feeds(1, seed=5).items():
        req.inputs.add(name=name, datatype="INT32", shape=list(array.shape))
        req.raw_input_contents.append(array.tobytes())
    bad = service_pb2.ModelInferRequest()
    bad.CopyFrom(req)
    bad.parameters["triton_enable_empty_final_response"].string_param = "true"
    good = service_pb2.ModelInferRequest()
    good.CopyFrom(req)
    good.parameters["triton_enable_empty_final_response"].bool_param = True
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([bad, good]), timeout=20))
    assert len(answers) == 2
    assert "'triton_enable_empty_final_response' must be a boolean, not 'true'" in answers[0].error_message
    assert answers[1].error_message == ""
    assert answers[1].infer_response.parameters["triton_final_response"].bool_param is True


def test_stream_answers_come_back_in_request_order(server):
    """Triton writes a non-decoupled model's answers on a stream in the order the requests came
    (its stream handler queues each request for its response, errors included): a later request
    that finishes first, or fails at once, waits for the ones before it."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    heavy = grpcclient.InferInput("input", [64, 256], "FP32")
    heavy.set_data_from_numpy(np.ones((64, 256), np.float32))
    sent = ["slow0", "slow1", "ghost", "quick", "bad", "slow2", "quick2"]
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for rid in sent:
            if rid.startswith("slow"):
                client.async_stream_infer("mlp", [heavy], request_id=rid)
            elif rid == "ghost":  # refused before anything runs
                client.async_stream_infer("no_such_model", simple_inputs(grpcclient, simple_feeds(1)), request_id=rid)
            else:
                feeds = bad_feeds() if rid == "bad" else simple_feeds(1)
                client.async_stream_infer("simple", simple_inputs(grpcclient, feeds), request_id=rid)
        got = []
        for _ in sent:
            result, error = answers.get(timeout=20)
            # (an error names its request: "[request id: bad] ...")
            got.append(result.get_response().id if error is None else error.message()[13:].split("]")[0])
        assert got == sent
    finally:
        client.stop_stream()
        client.close()
