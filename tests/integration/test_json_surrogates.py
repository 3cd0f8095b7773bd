"""A lone UTF-16 surrogate escape in a JSON body that also holds NaN (read by Python's json,
which keeps such an escape, where orjson refuses it) is a 400 naming it. Before, it became a 500
wherever the string was encoded again: the answer's id, an error quoting a name, the access log
(whose line was dropped)."""

from __future__ import annotations

import http.client
import json

import pytest

NAN_ROW = "[NaN" + ",0" * 255 + "]"
INPUT = '{"name":"input","datatype":"FP32","shape":[1,256],"data":%s}'
CASES = {
    "id": '{"inputs":[' + INPUT + '],"id":"\\ud800"}',
    "input name": '{"inputs":[{"name":"\\ud800","datatype":"FP32","shape":[1,256],"data":%s}]}',
    "output name": '{"inputs":[' + INPUT + '],"outputs":[{"name":"\\udfff"}]}',
    "datatype": '{"inputs":[{"name":"input","datatype":"\\ud800","shape":[1,256],"data":%s}]}',
    "parameter": '{"inputs":[' + INPUT + '],"parameters":{"k":"\\ud800"}}',
}


def post(port: int, body: bytes) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", "/v2/models/mlp/infer", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


@pytest.mark.parametrize("where", sorted(CASES))
def test_a_lone_surrogate_is_a_400(server, where):
    status, answer = post(server.gateway.http_port, (CASES[where] % NAN_ROW).encode())
    assert status == 400 and "\\uD800-\\uDFFF" in answer["error"], (status, answer)


def test_a_surrogate_pair_beside_nan_is_read(server):
    body = '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,256],"data":%s}],"id":"\\ud83d\\ude00"}'
    status, answer = post(server.gateway.http_port, (body % NAN_ROW).encode())
    assert status == 200 and answer["id"] == "\U0001f600", (status, answer)
