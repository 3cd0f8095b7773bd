"""Shared pieces of the fuzz harness: the budget, the checks, the known findings, the strategies.

Every property says the same thing in its own place: bad input is refused with
INVALID_ARGUMENT and a bounded message (``refused_or_ok``), never with another exception or
another code. An input that breaks that is a finding: while the server bug behind it is open
it is listed in ``FINDINGS`` (so the properties keep hunting for other bugs instead of finding
the same one again) and pinned by an xfail-strict regression test in ``test_fuzz_findings.py``
that checks it with no tolerance; the fix turns that test's XPASS into a failure, which says
to delete the entry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from tritonclient.grpc import service_pb2 as pb

from batchgate.core.errors import ErrorCode, GatewayError
from batchgate.core.types import DATATYPES, RequestLimits

MAX_MESSAGE = 2000  # an error message longer than this is a finding, whatever the input's size
ACTIVE = settings.get_profile("batchgate-fuzz")  # registered by this folder's conftest.py


def budget(weight: float = 1.0, **overrides: Any) -> settings:
    """The active profile with ``weight`` of its examples (at least 10)."""
    return settings(ACTIVE, max_examples=max(10, int(ACTIVE.max_examples * weight)), **overrides)


# ------------------------------------------------------------------ findings (open server bugs)


def _frames(exc: BaseException) -> list[tuple[str, str]]:
    """(module, function) of every frame the exception passed through, outermost first."""
    out = []
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame
        out.append((str(f.f_globals.get("__name__", "")), f.f_code.co_name))
        tb = tb.tb_next
    return out


def _raised_in(exc: BaseException, functions: set[str], module: str = "batchgate") -> bool:
    """Was ``exc`` raised (innermost batchgate frame) in one of ``functions``?"""
    ours = [fn for mod, fn in _frames(exc) if mod.startswith(module)]
    return bool(ours) and ours[-1] in functions


def _passed_through(exc: BaseException, module_prefix: str) -> bool:
    return any(mod.startswith(module_prefix) for mod, _ in _frames(exc))


@dataclass(frozen=True)
class Finding:
    key: str
    summary: str
    matches: Callable[[BaseException], bool]  # the exception a codec or config call raised
    markers: tuple[str, ...] = ()  # text of the 500 / INTERNAL answer the bug gives over the wire


def _is_refusal(e: BaseException) -> bool:
    return isinstance(e, GatewayError) and e.code is ErrorCode.INVALID_ARGUMENT


# None open. Fixed (each kept as a regression test in test_fuzz_findings.py): header-length-echo,
# float-overflow-cast, yaml-loader-errors, config-not-utf8, int-setting-overflow, remote-model-upstreams.
# A new entry: Finding(key, summary, matcher of the raised exception (e.g. _raised_in(e, {"fn"})),
# markers of its 500 / INTERNAL answer over the wire).
FINDINGS: tuple[Finding, ...] = ()


def known_finding(exc: BaseException) -> Finding | None:
    for f in FINDINGS:
        if f.matches(exc):
            return f
    return None


def known_marker(text: str) -> Finding | None:
    """The open finding whose 500 / INTERNAL answer reads like ``text``."""
    for f in FINDINGS:
        if any(m in text for m in f.markers):
            return f
    return None


SERVER_RECURSION_LIMIT = 1000  # CPython's default, which the gateway keeps


@contextlib.contextmanager
def server_recursion_limit() -> Iterator[None]:
    """Run the body under the recursion limit the gateway runs with. Hypothesis raises the limit
    while a test runs (by 2,000 frames), which would hide a RecursionError the gateway meets;
    the limit is global, so this also holds for a gateway's own thread meanwhile."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(SERVER_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def outcome(label: str) -> None:
    """Count ``label`` in hypothesis' statistics (--hypothesis-show-statistics); nothing outside a test."""
    if currently_in_test_context():
        event(label)


def refused_or_ok(fn: Callable[..., Any], *args: Any, strict: bool = False, **kwargs: Any) -> Any:
    """``fn(*args)``'s result, or None when it refused the input properly: a GatewayError with
    INVALID_ARGUMENT and a message under MAX_MESSAGE characters. Anything else fails, unless it
    is an open finding (and ``strict`` is off)."""
    try:
        with server_recursion_limit():
            out = fn(*args, **kwargs)
    except GatewayError as e:
        if e.code is ErrorCode.INVALID_ARGUMENT and len(e.message) < MAX_MESSAGE:
            outcome("refused")
            return None
        found = None if strict else known_finding(e)
        if found is None:
            raise AssertionError(
                f"refused with {e.code.value} and a message of {len(e.message)} characters: {e.message[:300]!r}"
            ) from e
        outcome(f"known finding: {found.key}")
        return None
    except Exception as e:
        found = None if strict else known_finding(e)
        if found is None:
            raise
        outcome(f"known finding: {found.key}")
        return None
    outcome("accepted")
    return out


# ------------------------------------------------------------------ drawing helpers
# Strategies are built once (module constants, or cached per argument): hypothesis validates a
# strategy on its first draw, which costs more than the draw itself.


@functools.cache
def ints(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


@functools.cache
def _uniform(k: int) -> st.SearchStrategy[int]:
    return st.sampled_from(range(k))


def one_in(draw: Any, k: int) -> bool:
    """True about once in ``k`` draws (``integers(0, k - 1)`` draws 0 far more often than that)."""
    return bool(draw(_uniform(k)) == 0)


FAULT_COUNTS = st.sampled_from([0, 1, 1, 2, 3])  # faults put in one request


@functools.cache
def repeated(alphabet: st.SearchStrategy[str], low: int, high: int) -> st.SearchStrategy[str]:
    """A long text made cheaply: one drawn piece repeated up to ``high`` characters."""
    return st.builds(lambda piece, n: (piece * (n // max(1, len(piece)) + 1))[:n], alphabet, st.integers(low, high))


# ------------------------------------------------------------------ generic values


class Raw(str):
    """Text written into a JSON document as it is (deep nesting, huge numbers, bad tokens)."""


def dump_json(obj: Any) -> str:
    """JSON text for ``obj``, ``Raw`` parts written as they are; ints of any size; floats as
    Python writes them (NaN / Infinity are not JSON: a body that holds one must be refused)."""
    if isinstance(obj, Raw):
        return str(obj)
    if obj is None or isinstance(obj, bool):
        return "null" if obj is None else ("true" if obj else "false")
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return json.dumps(obj)
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict):
        return "{" + ",".join(f"{dump_json(str(k))}:{dump_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(dump_json(v) for v in obj) + "]"
    raise TypeError(type(obj))


CHARS = st.characters(codec="utf-8")  # no lone surrogates: no wire delivers one (JSON and protobuf refuse them)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
json_ints = st.one_of(st.integers(-3, 300), INT64, UINT64, st.sampled_from([2**31, -(2**31) - 1, 2**32, 2**53 + 1]))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    json_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
_DEPTHS = st.one_of(st.integers(1, 40), st.integers(200, 1100))
_RAW_KINDS = st.sampled_from(["list", "list", "list", "dict", "dict", "bigint", "bignum", "token"])
_LIST_CORES = st.sampled_from(["1", "", "true", '"a"'])
_SIGNS = st.sampled_from(["", "-"])
_BIGNUMS = st.sampled_from(["1e400", "-1e400", "1e-400", "1.5e308", "0.1e1", "-0", "1E2"])
_TOKENS = st.sampled_from(["NaN", "Infinity", "-Infinity", "tru", "nul", "'a'", "0x10", "01", "+1", ""])


@st.composite
def raw_json_tokens(draw) -> Raw:
    """Hand-written JSON that no Python value dumps to: deep nesting, huge numbers, bad tokens."""
    kind = draw(_RAW_KINDS)
    if kind == "list":
        depth = draw(_DEPTHS)
        return Raw("[" * depth + draw(_LIST_CORES) + "]" * depth)
    if kind == "dict":
        depth = draw(_DEPTHS)
        return Raw('{"a":' * depth + "1" + "}" * depth)
    if kind == "bigint":
        return Raw(draw(_SIGNS) + "9" * draw(ints(20, 400)))
    if kind == "bignum":
        return Raw(draw(_BIGNUMS))
    return Raw(draw(_TOKENS))


wild_json = st.one_of(json_values, json_values, raw_json_tokens())
# Nested about as deep as orjson reads (1,024): where a message quotes a value, repr() recurses.
deep_json = st.builds(
    lambda d, dict_: Raw(('{"a":' * d + "1" + "}" * d) if dict_ else ("[" * d + "1" + "]" * d)),
    st.integers(900, 1100),
    st.booleans(),
)

# Names: usual ones, unicode, control characters, huge ones (the message must stay bounded).
plain_names = st.one_of(
    st.sampled_from(["INPUT0", "x", "a.b", "é", "名前", "\x00", " "]), st.text(min_size=1, max_size=12)
)
huge_text = repeated(st.text(min_size=1, max_size=3), 200, 200_000)
names = st.one_of(plain_names, st.just(""), huge_text)
DATATYPE_NAMES = list(DATATYPES)
valid_datatypes = st.sampled_from(DATATYPE_NAMES)
datatype_names = st.one_of(
    valid_datatypes,
    st.sampled_from(["", "fp32", "FP8", "BF16", "INT128", "STRING", "TYPE_FP32", "BYTES ", "\x00", "ＦＰ３２"]),
    st.text(max_size=10),
    repeated(CHARS, 100, 100_000),
)


# ------------------------------------------------------------------ tensor contents


@functools.cache
def scalar_values(dtname: str) -> st.SearchStrategy[Any]:
    """Python values a correct request holds for one element of ``dtname``."""
    dt = DATATYPES.get(dtname)
    if dt is None:
        return json_scalars
    if dtname == "BOOL":
        return st.booleans()
    if dtname == "BYTES":
        return st.text(max_size=8)
    if dt.np_dtype.kind in "iu":
        info = np.iinfo(dt.np_dtype)
        return st.integers(int(info.min), int(info.max))
    width = {"FP16": 16, "FP32": 32, "FP64": 64}[dtname]
    return st.floats(width=width, allow_nan=False, allow_infinity=False)


@functools.cache
def _few(strategy: st.SearchStrategy[Any], most: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(strategy, min_size=1, max_size=most)


def draw_values(draw: Any, strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` values: a few drawn, repeated to length (cheap for large tensors)."""
    if n == 0:
        return []
    few = draw(_few(strategy, min(n, 8)))
    return (few * (n // len(few) + 1))[:n]


@st.composite
def element_values(draw, dtname: str, n: int) -> list[Any]:
    return draw_values(draw, scalar_values(dtname), n)


MAX_RIGHT = 4096  # elements up to which a generated request holds data that fits its shape


def count_of(shape: Any) -> int | None:
    """Elements of ``shape`` when it is a list of small non-negative ints, else None."""
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= 1 << 20 for d in shape):
        return None
    return math.prod(shape)


def nest(flat: list[Any], shape: list[int]) -> Any:
    arr = np.empty(len(flat), dtype=object)
    arr[:] = flat
    return arr.reshape(shape).tolist()


def raw_bytes_for(dtname: str, values: list[Any]) -> bytes:
    """The binary (raw) form of ``values`` as ``dtname``, as a correct client writes it."""
    if dtname == "BYTES":
        parts = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.asarray(values, dtype=DATATYPES[dtname].np_dtype).tobytes()


small_shapes = st.lists(st.integers(0, 4), max_size=4)
odd_dims = st.sampled_from([0, -1, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1])
json_shapes = st.one_of(
    st.lists(st.one_of(st.integers(-3, 8), UINT64, INT64), max_size=40),
    st.lists(st.one_of(st.integers(0, 3), odd_dims), min_size=1, max_size=6),
    st.lists(st.integers(0, 2), min_size=30, max_size=70),
    wild_json,
    deep_json,
)
odd_elements = st.one_of(json_scalars, st.sampled_from([1e300, -1e300, 70000.0, 2**64, -1, True, 1.5, "7"]), wild_json)


@dataclass(frozen=True)
class Signature:
    """A model's inputs, for requests that get past decoding to the data plane."""

    model: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # name, datatype, dims after the batch dim (-1: any)
    outputs: tuple[str, ...]
    max_batch: int


@functools.cache
def _batches(most: int) -> st.SearchStrategy[int]:
    return st.sampled_from(range(1, most + 1))


_FREE_DIMS = st.sampled_from(range(5))


def sig_specs(draw: Any, sig: Signature) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of each input of a correct request to ``sig``'s model."""
    batch = draw(_batches(min(sig.max_batch, 10)))
    return [(n, dt, [batch] + [draw(_FREE_DIMS) if d < 0 else d for d in dims]) for n, dt, dims in sig.inputs]


DEMO = (
    Signature("simple", (("INPUT0", "INT32", (16,)), ("INPUT1", "INT32", (16,))), ("OUTPUT0", "OUTPUT1"), 8),
    Signature("classifier", (("features", "FP32", (4,)),), ("probabilities",), 4),
    Signature("identity_bytes", (("INPUT", "BYTES", (-1,)),), ("OUTPUT",), 8),
    Signature("mlp", (("input", "FP32", (256,)),), ("output",), 64),
)


# ------------------------------------------------------------------ V2 HTTP bodies
# A body is drawn correct first, then broken by up to a few faults, each at one place; a
# quarter or so stay correct, so the properties also go through everything past the checks.


@dataclass
class HttpDraft:
    obj: Any  # the JSON object
    binaries: list[bytes]  # binary data of each input, in order (b"" for JSON data)
    header_length: str | int | None = None  # the header; an int: the right length plus that
    right_header: bool = True  # the right length where binary data is sent (else the above)
    tail: bytes = b""


@st.composite
def http_input(draw, spec: tuple[str, str, Any]) -> tuple[dict[str, Any], bytes]:
    """A correct entry of 'inputs' for (name, datatype, shape), and its binary data."""
    name, dtname, shape = spec
    entry: dict[str, Any] = {"name": name, "datatype": dtname, "shape": shape}
    values = draw(element_values(dtname, math.prod(shape)))
    if draw(st.booleans()):
        binary = raw_bytes_for(dtname, values)
        entry["parameters"] = {"binary_data_size": len(binary)}
        return entry, binary
    entry["data"] = values if draw(st.booleans()) else nest(values, shape)
    return entry, b""


_INPUT_FAULTS = st.sampled_from(
    [
        "datatype",
        "shape",
        "grow",
        "grow",
        "name",
        "element",
        "data",
        "binary_bytes",
        "binary_size",
        "both",
        "neither",
        "parameters",
        "drop",
        "extra",
        "entry",
    ]
)
_TOP_FAULTS = st.sampled_from(
    ["input", "input", "input", "inputs", "many", "outputs", "id", "parameters", "header", "tail", "object"]
)
_KEYS = st.sampled_from(["name", "datatype", "shape", "data", "parameters"])
_HEADER_LENGTHS = st.one_of(
    st.none(),
    st.sampled_from(["", " ", "0", "-0", "00", "+5", " 12 ", "1e3", "0x10", "1_0", "\u0663", "²", "-1"]),
    st.text(max_size=8),
    repeated(st.sampled_from(["9", "x", "1 "]), 100, 100_000),
)
_OUTPUT_PARAMS = st.one_of(
    st.fixed_dictionaries({"binary_data": json_scalars}), st.just({"classification": 3}), wild_json
)
_IDS = st.one_of(st.text(max_size=20), repeated(CHARS, 60, 3000), wild_json)
_PARAM_KEYS = st.one_of(st.sampled_from(["priority", "timeout", "binary_data_output", "sequence_id"]), st.text())
_PARAM_VALUES = st.one_of(json_scalars, st.integers(-5, 10**6), wild_json, deep_json)
_GOOD_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.integers(0, 5),
        "timeout": st.one_of(st.just(0), st.integers(10**6, 10**8)),
        "binary_data_output": st.booleans(),
        "custom": json_scalars,
    },
)
_BODY_BYTES = st.binary(max_size=16)


def _break_input(draw: Any, d: HttpDraft, i: int) -> None:
    entry = d.obj["inputs"][i]
    d.binaries.extend([b""] * (i + 1 - len(d.binaries)))
    fault = draw(_INPUT_FAULTS)
    if fault == "datatype":
        entry["datatype"] = draw(datatype_names)
    elif fault == "shape":
        entry["shape"] = draw(json_shapes)
    elif fault == "grow" and isinstance(entry.get("shape"), list):  # large dimensions, maybe no element
        shape = list(entry["shape"])
        for _ in range(draw(ints(1, 3))):
            shape.insert(draw(ints(0, len(shape))), draw(odd_dims))
        if draw(st.booleans()):
            shape.insert(draw(ints(0, len(shape))), 0)
            if "data" in entry:
                entry["data"] = []
            else:
                entry["parameters"] = {"binary_data_size": 0}
                d.binaries[i] = b""
        entry["shape"] = shape
    elif fault == "name":
        entry["name"] = draw(st.one_of(names, wild_json))
    elif fault == "element" and _flatten_lists(entry.get("data")):
        flat = _flatten_lists(entry["data"])
        flat[draw(ints(0, len(flat) - 1))] = draw(odd_elements)
        entry["data"] = flat
    elif fault == "data":
        entry["data"] = draw(st.one_of(st.lists(json_scalars, max_size=8), wild_json))
        entry.pop("parameters", None)
        d.binaries[i] = b""
    elif fault == "binary_bytes" and d.binaries[i]:
        d.binaries[i] = draw(mutated(d.binaries[i]))
    elif fault == "binary_size" and "parameters" in entry:
        entry["parameters"] = {"binary_data_size": draw(st.one_of(json_ints, wild_json))}
    elif fault == "both":
        entry["data"] = draw(json_values)
        entry["parameters"] = {"binary_data_size": 0}
    elif fault == "neither":
        entry.pop("data", None)
        entry.pop("parameters", None)
        d.binaries[i] = b""
    elif fault == "parameters":
        entry["parameters"] = draw(wild_json)
    elif fault == "drop":
        entry.pop(draw(_KEYS), None)
    elif fault == "extra":
        entry[draw(st.text(max_size=6))] = draw(wild_json)
    else:
        d.obj["inputs"][i] = draw(wild_json)
        d.binaries[i] = b""


def _flatten_lists(x: Any) -> list[Any]:
    """The values of nested lists (none when ``x`` is not a list)."""
    if not isinstance(x, list):
        return []
    out: list[Any] = []
    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            out.append(v)
    return out


def _break_body(draw: Any, d: HttpDraft, huge: bool) -> None:
    fault = draw(_TOP_FAULTS)
    if not isinstance(d.obj, dict):
        return
    inputs = d.obj.get("inputs")
    entries = [i for i, e in enumerate(inputs) if isinstance(e, dict)] if isinstance(inputs, list) else []
    if fault == "input" and entries:
        _break_input(draw, d, entries[draw(ints(0, len(entries) - 1))])
    elif fault == "inputs":
        d.obj["inputs"] = draw(wild_json)
        d.binaries = []
    elif fault == "many" and huge and isinstance(inputs, list) and inputs:
        k = draw(ints(60, 200))
        d.obj["inputs"] = inputs[:1] * k
        d.binaries = d.binaries[:1] * k
    elif fault == "outputs":
        d.obj["outputs"] = draw(
            st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.one_of(plain_names, huge_text)}, optional={"parameters": _OUTPUT_PARAMS}
                    ),
                    max_size=4,
                ),
                st.lists(st.fixed_dictionaries({"name": st.just("o")}), min_size=2, max_size=80),
                wild_json,
            )
        )
    elif fault == "id":
        d.obj["id"] = draw(_IDS)
    elif fault == "parameters":
        d.obj["parameters"] = draw(
            st.one_of(
                st.dictionaries(_PARAM_KEYS, _PARAM_VALUES, max_size=5),
                st.dictionaries(st.text(max_size=6), st.integers(), min_size=60, max_size=80),
                wild_json,
            )
        )
    elif fault == "header":
        d.header_length = draw(st.one_of(_HEADER_LENGTHS, st.integers(-5, 5)))
        d.right_header = False
    elif fault == "tail":
        d.tail = draw(st.binary(min_size=1, max_size=16))
    elif fault == "object":
        d.obj = draw(wild_json)
        d.binaries = []


@st.composite
def http_bodies(draw, sig: Signature | None = None, huge: bool = True, clean: bool = False) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) of a V2 infer request: correct, or broken in a few places."""
    if sig is not None:
        specs = sig_specs(draw, sig)
    else:
        specs = draw(st.lists(st.tuples(plain_names, valid_datatypes, small_shapes), min_size=1, max_size=3))
    drawn = [draw(http_input(s)) for s in specs]
    obj: dict[str, Any] = {"inputs": [e for e, _ in drawn]}
    outs = sig.outputs if sig is not None else ("OUTPUT0", "y")
    if one_in(draw, 3):
        obj["outputs"] = [{"name": o} for o in draw(st.lists(st.sampled_from(outs), min_size=1, unique=True))]
    if one_in(draw, 3):
        obj["id"] = draw(st.text(max_size=20))
    if one_in(draw, 3):
        obj["parameters"] = draw(_GOOD_PARAMS)
    d = HttpDraft(obj, [b for _, b in drawn])
    for _ in range(0 if clean else draw(FAULT_COUNTS)):
        _break_body(draw, d, huge)
    head = dump_json(d.obj).encode()
    binary = b"".join(d.binaries)
    hl = d.header_length
    if d.right_header:
        header_length = str(len(head)) if binary or one_in(draw, 4) else None
    elif isinstance(hl, int):
        header_length = str(len(head) + hl)  # off by a few
    else:
        header_length = hl
    body = head + binary + d.tail
    if not clean and one_in(draw, 12):  # byte-level damage
        body = draw(mutated(body))
    return body, header_length


_OPS = st.sampled_from(["insert", "flip", "delete", "truncate", "duplicate"])
_BITS = st.sampled_from(range(8))
_POSITIONS = st.integers(0, 1 << 20)  # taken modulo the length: integers(0, n) draws 0 too often
_INSERTS = st.binary(min_size=1, max_size=8)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a few random byte-level edits."""
    buf = bytearray(data)
    for _ in range(draw(ints(1, 4))):
        op = draw(_OPS)
        pos = len(buf) - draw(_POSITIONS) % (len(buf) + 1)  # the simplest edit: at the end
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << draw(_BITS)
        elif op == "insert":
            buf[pos:pos] = draw(_INSERTS)
        elif op == "delete":
            del buf[pos : pos + draw(ints(1, 8))]
        elif op == "truncate":
            del buf[pos:]
        else:
            buf[pos:pos] = buf[pos : pos + draw(ints(1, 32))]
    return bytes(buf)


# ------------------------------------------------------------------ compressed bodies

_ENCODINGS = st.sampled_from(["gzip", "deflate", "GZIP", " gzip ", "identity", "", None, "br", "x-gzip", "gzip, br"])
_PLAIN = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(1000, 300_000)),
)


@st.composite
def compressed_bodies(draw) -> tuple[bytes, str | None]:
    """(body, Content-Encoding): correct gzip / deflate (several members, bombs), damaged, random."""
    enc = draw(_ENCODINGS)
    plain = draw(_PLAIN)
    wbits = 31 if (enc or "").strip().lower() == "gzip" else 15
    members = draw(ints(1, 3)) if wbits == 31 else 1
    if wbits == 31 and one_in(draw, 10):
        members = draw(ints(60, 80))  # past max_gzip_members
    out = b""
    for _ in range(members):
        c = zlib.compressobj(draw(ints(0, 9)), zlib.DEFLATED, wbits)
        out += c.compress(plain) + c.flush()
    kind = draw(ints(0, 5))
    if kind == 0:
        out = draw(st.binary(max_size=128))
    elif kind == 1:
        out = draw(mutated(out))
    elif kind == 2:
        out = out + draw(st.binary(min_size=1, max_size=16))
    return out, enc


# ------------------------------------------------------------------ gRPC messages

CONTENT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": UINT64,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}
CONTENTS_FOR = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONTENT_FIELDS = st.sampled_from(sorted(CONTENT_VALUES))
grpc_shapes = st.one_of(
    st.lists(st.one_of(st.integers(-3, 8), INT64), max_size=40),
    st.lists(
        st.one_of(st.integers(0, 3), st.sampled_from([0, -1, 2**31, 2**32, 2**62, 2**63 - 1])), min_size=1, max_size=6
    ),
    st.lists(st.integers(0, 2), min_size=30, max_size=70),
)
proto_text = st.one_of(st.text(max_size=16), repeated(CHARS, 100, 50_000))
parameter_values = st.one_of(
    st.tuples(st.just("bool_param"), st.booleans()),
    st.tuples(st.just("int64_param"), st.one_of(st.integers(-5, 10**7), INT64)),
    st.tuples(st.just("uint64_param"), UINT64),
    st.tuples(st.just("double_param"), st.floats()),
    st.tuples(st.just("string_param"), proto_text),
    st.tuples(st.just("none"), st.none()),
)
_GRPC_PARAM_KEYS = st.one_of(st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output"]), proto_text)
_VERSIONS = st.one_of(st.just(""), st.sampled_from(["1", "2", "0", "-1", "x"]), proto_text)
_GRPC_FAULTS = st.sampled_from(
    [
        "datatype",
        "shape",
        "name",
        "raw_bytes",
        "raw_count",
        "contents",
        "both",
        "tensor_parameters",
        "many_inputs",
        "outputs",
        "many_outputs",
        "parameters",
        "many_parameters",
        "id",
        "version",
        "model",
    ]
)


def set_parameter(p: pb.InferParameter, kind: str, value: Any) -> None:
    if kind == "none":
        p.Clear()
    else:
        setattr(p, kind, value)


def _fill_contents(draw: Any, t: pb.InferInputTensor, field: str, n: int) -> None:
    getattr(t.contents, field).extend(draw_values(draw, CONTENT_VALUES[field], n))


@st.composite
def infer_messages(draw, sig: Signature | None = None, clean: bool = False) -> pb.ModelInferRequest:
    """A ModelInferRequest as a client builds it: correct, or broken in a few places."""
    m = pb.ModelInferRequest(model_name=sig.model if sig is not None else draw(plain_names))
    if sig is not None:
        specs = sig_specs(draw, sig)
    else:
        specs = draw(st.lists(st.tuples(plain_names, valid_datatypes, small_shapes), min_size=1, max_size=3))
    use_raw = draw(st.booleans()) or any(dt == "FP16" for _, dt, _ in specs)
    for name, dtname, shape in specs:
        t = m.inputs.add(name=name, datatype=dtname, shape=shape)
        n = math.prod(shape)
        if use_raw:
            m.raw_input_contents.append(raw_bytes_for(dtname, draw(element_values(dtname, n))))
        else:
            _fill_contents(draw, t, CONTENTS_FOR[dtname], n)
    outs = sig.outputs if sig is not None else ("y",)
    if one_in(draw, 3):
        for o in draw(st.lists(st.sampled_from(outs), min_size=1, unique=True)):
            m.outputs.add(name=o)
    if one_in(draw, 3):
        m.id = draw(st.text(max_size=20))
    if one_in(draw, 3):
        m.parameters["priority"].int64_param = draw(ints(0, 5))
    for _ in range(0 if clean else draw(FAULT_COUNTS)):
        _break_message(draw, m)
    return m


def _break_message(draw: Any, m: pb.ModelInferRequest) -> None:
    fault = draw(_GRPC_FAULTS)
    n = len(m.inputs)
    t = m.inputs[draw(ints(0, n - 1))] if n else None
    if fault == "datatype" and t is not None:
        t.datatype = draw(datatype_names)
    elif fault == "shape" and t is not None:
        del t.shape[:]
        t.shape.extend(draw(grpc_shapes))
    elif fault == "name" and t is not None:
        t.name = draw(names)
    elif fault == "raw_bytes" and len(m.raw_input_contents):
        i = draw(ints(0, len(m.raw_input_contents) - 1))
        m.raw_input_contents[i] = draw(st.one_of(mutated(m.raw_input_contents[i]), st.binary(max_size=64)))
    elif fault == "raw_count":
        if len(m.raw_input_contents) and draw(st.booleans()):
            del m.raw_input_contents[-1]
        else:
            m.raw_input_contents.append(draw(st.binary(max_size=8)))
    elif fault == "contents" and t is not None:
        t.ClearField("contents")
        field = draw(_CONTENT_FIELDS)
        getattr(t.contents, field).extend(draw(st.lists(CONTENT_VALUES[field], max_size=8)))
    elif fault == "both" and t is not None:
        field = draw(_CONTENT_FIELDS)
        getattr(t.contents, field).extend(draw(st.lists(CONTENT_VALUES[field], min_size=1, max_size=3)))
        if not len(m.raw_input_contents):
            m.raw_input_contents.extend([b""] * n)
    elif fault == "tensor_parameters" and t is not None:
        kind, value = draw(parameter_values)
        set_parameter(t.parameters[draw(st.text(max_size=6))], kind, value)
    elif fault == "many_inputs" and t is not None:
        for _ in range(draw(ints(60, 80))):
            m.inputs.add().CopyFrom(t)
    elif fault == "outputs":
        for _ in range(draw(ints(1, 3))):
            o = m.outputs.add(name=draw(st.one_of(plain_names, names)))
            if one_in(draw, 3):
                kind, value = draw(parameter_values)
                set_parameter(o.parameters[draw(st.sampled_from(["binary_data", "classification", "x"]))], kind, value)
    elif fault == "many_outputs":
        for _ in range(draw(ints(60, 80))):
            m.outputs.add(name="o")
    elif fault in ("parameters", "many_parameters"):
        for _ in range(draw(ints(1, 3)) if fault == "parameters" else draw(ints(60, 80))):
            kind, value = draw(parameter_values)
            set_parameter(m.parameters[draw(_GRPC_PARAM_KEYS)], kind, value)
    elif fault == "id":
        m.id = draw(proto_text)
    elif fault == "version":
        m.model_version = draw(_VERSIONS)
    elif fault == "model":
        m.model_name = draw(proto_text)


@st.composite
def wire_messages(draw, sig: Signature | None = None, clean: bool = False) -> bytes:
    """Bytes sent as a ModelInferRequest: a serialized message, damaged or not, or random bytes."""
    kind = 2 if clean else draw(_uniform(6))
    if kind == 0:
        return draw(st.binary(max_size=512))
    data = draw(infer_messages(sig, clean)).SerializeToString()
    if kind == 1:
        return draw(mutated(data))
    return data


# ------------------------------------------------------------------ limits

small_limits = st.builds(
    RequestLimits,
    max_caller_headers=st.integers(0, 40),
    max_caller_header_bytes=st.integers(1, 5000),
    max_request_parameters=st.integers(0, 70),
    max_inputs=st.integers(1, 70),
    max_outputs=st.integers(1, 70),
    max_tensor_dims=st.integers(1, 32),
    max_request_id_bytes=st.integers(1, 300),
)
limits = st.one_of(st.just(RequestLimits()), st.just(RequestLimits()), small_limits)
