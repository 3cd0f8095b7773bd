"""HTTP compression: compressed requests and responses on /infer with the sync and the aio
client, and no compression anywhere else (tritonclient.http.aio decompresses only /infer)."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
from protocol_support import Client, raw_http, simple_feeds
from tritonclient.utils import InferenceServerException

HTTP_FLAVOURS = ("http", "http.aio")
ALGORITHMS = ("gzip", "deflate")


@pytest.fixture(params=HTTP_FLAVOURS)
async def client(request, server):
    c = Client(request.param, server)
    yield c
    await c.close()


def json_infer_body(feeds: dict, outputs=("OUTPUT0", "OUTPUT1")) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "INT32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
                for n, a in feeds.items()
            ],
            "outputs": [{"name": o, "parameters": {"binary_data": False}} for o in outputs],
        }
    ).encode()


def decompress(body: bytes, encoding: str) -> bytes:
    return gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body)


@pytest.mark.parametrize("request_alg", (None, *ALGORITHMS))
@pytest.mark.parametrize("response_alg", (None, *ALGORITHMS))
async def test_compressed_infer(client, request_alg, response_alg):
    feeds = simple_feeds(4, seed=7)
    result = await client.infer(
        "simple", feeds, request_compression_algorithm=request_alg, response_compression_algorithm=response_alg
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), feeds["INPUT0"] - feeds["INPUT1"])


async def test_compressed_infer_json_tensors(client):
    feeds = simple_feeds(2, seed=8)
    result = await client.infer(
        "simple",
        feeds,
        binary=False,
        outputs=["OUTPUT0"],
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), feeds["INPUT0"] + feeds["INPUT1"])


@pytest.mark.parametrize("encoding", ALGORITHMS)
def test_response_really_is_compressed(server, encoding):
    feeds = simple_feeds(2, seed=9)
    status, headers, body = raw_http(
        server,
        "POST",
        "/v2/models/simple/infer",
        json_infer_body(feeds),
        {"Content-Type": "application/json", "Accept-Encoding": encoding},
    )
    assert status == 200, body
    assert headers.get("content-encoding") == encoding
    doc = json.loads(decompress(body, encoding))
    out = {o["name"]: o["data"] for o in doc["outputs"]}
    assert out["OUTPUT0"] == (feeds["INPUT0"] + feeds["INPUT1"]).reshape(-1).tolist()


@pytest.mark.parametrize("encoding", ALGORITHMS)
def test_compressed_request_body(server, encoding):
    feeds = simple_feeds(1, seed=10)
    plain = json_infer_body(feeds)
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    status, headers, body = raw_http(
        server,
        "POST",
        "/v2/models/simple/infer",
        packed,
        {"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert status == 200, body
    assert "content-encoding" not in headers  # nobody asked for a compressed answer
    doc = json.loads(body)
    assert {o["name"] for o in doc["outputs"]} == {"OUTPUT0", "OUTPUT1"}


@pytest.mark.parametrize(
    "accept,expected",
    [
        ("gzip;q=0.2, deflate;q=0.8", "deflate"),
        ("deflate;q=0, gzip", "gzip"),
        ("identity", None),
        ("br", None),
        ("*;q=0, gzip;q=0", None),
    ],
)
def test_accept_encoding_preferences(server, accept, expected):
    status, headers, body = raw_http(
        server,
        "POST",
        "/v2/models/simple/infer",
        json_infer_body(simple_feeds(1)),
        {"Content-Type": "application/json", "Accept-Encoding": accept},
    )
    assert status == 200
    assert headers.get("content-encoding") == expected
    if expected:
        body = decompress(body, expected)
    assert json.loads(body)["model_name"] == "simple"


BROWSER_ACCEPT = {"Accept-Encoding": "gzip, deflate, br"}


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v2"),
        ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/simple"),
        ("GET", "/v2/models/simple/versions/1"),
        ("GET", "/v2/models/simple/ready"),
        ("GET", "/v2/models/simple/config"),
        ("GET", "/v2/models/simple/stats"),
        ("GET", "/v2/models/stats"),
        ("POST", "/v2/repository/index"),
        ("GET", "/v2/models/no_such_model"),
    ],
)
def test_only_infer_responses_are_compressed(server, method, path):
    status, headers, body = raw_http(server, method, path, headers=BROWSER_ACCEPT)
    assert "content-encoding" not in headers, (path, headers)
    if body:
        json.loads(body)  # plain JSON, readable as is
    assert status in (200, 404)


async def test_aio_client_metadata_with_its_default_accept_encoding(server):
    """aiohttp offers gzip/deflate on every request; tritonclient.http.aio reads non-infer bodies raw."""
    c = Client("http.aio", server)
    try:
        assert (await c.call("get_server_metadata"))["name"] == "batchgate"
        assert (await c.call("get_model_metadata", "simple"))["name"] == "simple"
        assert (await c.call("get_model_config", "simple"))["max_batch_size"] == 8
        assert (await c.call("get_inference_statistics", "simple"))["model_stats"][0]["name"] == "simple"
        assert any(r["name"] == "simple" for r in await c.call("get_model_repository_index"))
        headers = {"Accept-Encoding": "gzip, deflate, br"}
        assert (await c.call("get_server_metadata", headers=dict(headers)))["name"] == "batchgate"
        assert (await c.call("get_model_config", "classifier", headers=dict(headers)))["name"] == "classifier"
        assert (await c.call("get_inference_statistics", headers=dict(headers)))["model_stats"]
    finally:
        await c.close()


@pytest.mark.parametrize("response_alg", ALGORITHMS)
async def test_errors_are_readable_when_compression_was_asked(client, response_alg):
    bad = {"INPUT0": np.zeros((1, 15), np.int32), "INPUT1": np.zeros((1, 15), np.int32)}
    with pytest.raises(InferenceServerException) as info:
        await client.infer("simple", bad, response_compression_algorithm=response_alg)
    assert info.value.status() == "400"
    assert "INPUT0" in info.value.message() and "16" in info.value.message()


def test_unknown_content_encoding_is_refused(server):
    status, headers, body = raw_http(
        server,
        "POST",
        "/v2/models/simple/infer",
        b"\x1b\x00junk",
        {"Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert status == 400
    msg = json.loads(body)["error"]
    assert "br" in msg and "gzip" in msg
    assert "gzip" in headers.get("accept-encoding", "")  # says what it does accept


@pytest.mark.parametrize("encoding", ALGORITHMS)
def test_corrupt_compressed_body_is_refused(server, encoding):
    status, _, body = raw_http(
        server,
        "POST",
        "/v2/models/simple/infer",
        b"definitely not compressed",
        {"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert status == 400
    assert encoding in json.loads(body)["error"]
