"""What the fuzz harness found in the server: one test per finding, its inputs as explicit
examples, checked with no tolerance (``strict=True``); xfail-strict while the finding is open,
a plain regression test once it is fixed.

While a finding is open its test xfails, and the properties tolerate that one failure (listed
in ``fuzz_support.FINDINGS``) so they keep hunting for others. Once the server is fixed the
test passes, strict xfail turns that into a failure: delete the xfail mark here (the test stays
as a regression) and the entry in FINDINGS.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import warnings

import pytest
from fuzz_support import FINDINGS, refused_or_ok, server_recursion_limit
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from batchgate.config import load_settings
from batchgate.core.errors import ConfigError, ErrorCode, GatewayError
from batchgate.core.types import EMPTY, RequestLimits, new_request
from batchgate.transport import http_codec

LIMITS = RequestLimits()
EXPLICIT = settings(phases=[Phase.explicit], database=None, deadline=None)
SUMMARY = {f.key: f.summary for f in FINDINGS}


def open_finding(key: str):
    return pytest.mark.xfail(strict=True, reason=f"open finding {key}: {SUMMARY[key]}")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def simple_body(extra: bytes = b"") -> bytes:
    inputs = [{"name": n, "datatype": "INT32", "shape": [1, 16], "data": [0] * 16} for n in ("INPUT0", "INPUT1")]
    return b'{"inputs":' + json.dumps(inputs).encode() + extra + b"}"


def decode_http(body: bytes, header_length: str | None):
    return refused_or_ok(http_codec.decode_request, body, header_length, "m", "", 1.0, LIMITS, strict=True)


# ------------------------------------------------------------------ codecs


@EXPLICIT
@given(header_length=st.just(""))
@example(header_length="x" * 60_000)
@example(header_length="9 " * 30_000)
def test_header_length_message_is_bounded(header_length):
    decode_http(b"{}", header_length)


@EXPLICIT
@given(header_length=st.just(""))
@example(header_length="9" * 2000)  # found by make fuzz (1,934 digits and a 70-byte body: 2,000 characters)
@example(header_length="9" * 4300)  # the most int() reads: 4,365 characters
@example(header_length="-" + "9" * 3000)
def test_header_length_number_is_not_echoed_whole(header_length):
    decode_http(b"{}", header_length)


@EXPLICIT
@given(body=st.just(b""))
@example(body=simple_body(b',"parameters":{"priority":' + nested(1000) + b"}"))
@example(body=simple_body(b',"parameters":{"timeout":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}"))
@example(body=b'{"inputs":[{"name":"a","datatype":"FP32","shape":' + nested(1010) + b',"data":[1]}]}')
def test_deeply_nested_values_are_refused(body):
    decode_http(body, None)


@EXPLICIT
@given(depth=st.just(0))
@example(depth=1010)
def test_deeply_nested_parameter_is_refused(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    refused_or_ok(new_request, "m", "", [], None, "", {"priority": value}, EMPTY, 0.0, "http", LIMITS, strict=True)


@EXPLICIT
@given(dtname=st.just("FP32"), value=st.just(1.0))
@example(dtname="FP32", value=1e300)
@example(dtname="FP32", value=-3.5e38)
@example(dtname="FP16", value=70000.0)
def test_out_of_range_floats_are_refused(dtname, value):
    """The codec refuses what a cast would change (its own rule for integers and bools); a float
    past the datatype's range became inf, with numpy's RuntimeWarning."""
    body = json.dumps({"inputs": [{"name": "a", "datatype": dtname, "shape": [1], "data": [value]}]}).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(GatewayError) as info:
            http_codec.decode_request(body, None, "m", "", 1.0, LIMITS)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ over the wire


def post(server, path: str, body: bytes) -> tuple[int, str]:
    conn = http.client.HTTPConnection(server.http_url, timeout=30)
    try:
        with server_recursion_limit():
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_deeply_nested_parameter_over_http(server):
    status, text = post(
        server, "/v2/models/simple/infer", simple_body(b',"parameters":{"priority":' + nested(1000) + b"}")
    )
    assert status == 400, (status, text[:300])


def test_out_of_range_float_over_http(server):
    """Was served: the model saw inf and answered NaN (JSON null) where a 400 was due."""
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1e300, 0, 0, 0]}]}
    status, text = post(server, "/v2/models/classifier/infer", json.dumps(body).encode())
    assert status == 400, (status, text[:300])


# ------------------------------------------------------------------ settings


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("findings_repo"))


def load(tmp_path_factory, content: bytes | None, flags=None, environ=None):
    """load_settings must return Settings or raise ConfigError; anything else fails the test."""
    path = None
    if content is not None:
        path = tmp_path_factory.mktemp("cfg") / "config.yaml"
        path.write_bytes(content)
    with contextlib.suppress(ConfigError), server_recursion_limit():
        load_settings(None if path is None else str(path), flags, environ or {})


@EXPLICIT
@given(content=st.just(b""))
@example(content=b"server:\n  http_port: " + b"9" * 5000 + b"\n")  # ValueError: int() of 5,000 digits
@example(content=b"remote_models:\n  - name: " + b"9" * 5000 + b"\n    upstreams: h:1\n")
@example(content=b"server: " + nested(3000) + b"\n")  # RecursionError
@example(content=b'server:\n  host: "\\U80092014"\n')  # OverflowError from chr(); found by make fuzz
@example(content=b'server:\n  host: "\\U00110000"\n')  # ValueError from chr()
@example(content=b"server:\n  host: 2001-13-45\n")  # ValueError from datetime.date
@example(content=b"\x1f")  # ReaderError from the loader's constructor; found by make fuzz (after the fix)
@example(content=b"server:\n  host: !!bool maybe\n")  # KeyError
@example(content=b'server:\n  host: !!int ""\n')  # IndexError
@example(content=b"server:\n  host: !!timestamp x\n")  # AttributeError
@example(content=b"server:\n  http_port: 0x" + b"f" * 4000 + b"\n")  # 4,817 digits: str() of it fails
@example(content=b"server:\n  http_port: 1" + b":59" * 3000 + b"\n")  # base 60: 5,335 digits
@example(content=b"limits:\n  max_queue_wait_ms: " + b"9" * 400 + b"\n")  # float() of it: OverflowError
def test_yaml_loader_errors_are_config_errors(tmp_path_factory, content):
    load(tmp_path_factory, content)


@EXPLICIT
@given(content=st.just(b""))
@example(content=b"server:\n  host: \xff\xfe\n")
@example(content=b"\x80")
def test_config_file_not_utf8_is_a_config_error(tmp_path_factory, content):
    load(tmp_path_factory, content)


@EXPLICIT
@given(environ=st.just({}))
@example(environ={"BATCHGATE_HTTP_PORT": "9" * 400})
@example(environ={"BATCHGATE_MAX_QUEUE_SIZE": "-" + "9" * 400})
def test_huge_integer_setting_is_a_config_error(tmp_path_factory, repo, environ):
    load(tmp_path_factory, None, {"model_repository": repo}, environ)


def test_huge_integer_setting_in_a_file_is_a_config_error(tmp_path_factory, repo):
    load(tmp_path_factory, f"repository: {{model_repository: {repo}}}\nserver:\n  http_port: {'9' * 400}\n".encode())


@EXPLICIT
@given(content=st.just(b""), environ=st.just({}))
@example(content=b"remote_models:\n  - name: m\n    upstreams: 5\n", environ={})  # TypeError
@example(content=b"remote_models:\n  - name: m\n    upstreams: true\n", environ={})
@example(content=b"remote_models:\n  - name: m\n    upstreams: 1.5\n", environ={})
@example(content=None, environ={"BATCHGATE_REMOTE_MODELS": "name=m upstreams=h:\u00b2"})  # ValueError
@example(content=b"remote_models:\n  - name: m\n    upstreams: {h: 1}\n", environ={})
@example(content=b"remote_models:\n  - name: m\n    upstreams: [h:1, [h:2]]\n", environ={})
@example(content=b"remote_models:\n  - name: m\n    upstreams: h:1\n    timeout_s: " + b"9" * 400 + b"\n", environ={})
@example(content=b"remote_models:\n  - name: m\n    upstreams: h:1\n    retries: " + b"9" * 400 + b"\n", environ={})
def test_bad_upstreams_are_config_errors(tmp_path_factory, content, environ):
    load(tmp_path_factory, content, None, environ)
