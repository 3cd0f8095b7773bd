"""Pure conversions between V2 HTTP bodies (JSON, and the binary tensor data
extension) and the gateway's core types."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

import numpy as np
import orjson

from ..core.errors import ErrorCode, GatewayError, invalid
from ..core.types import (
    DATATYPES,
    EMPTY,
    DataType,
    InferRequest,
    InferResponse,
    RequestLimits,
    Tensor,
    brief,
    check_output,
    check_shape,
    check_tensors,
    clip,
    datatype,
    element_count,
    from_raw,
    heavy,
    new_request,
    printable,
    shaped,
    tensor_parameters,
    to_raw,
)
from ..shm import REGION as SHM_REGION
from ..shm import OutputWriter, Place, RegionView, fixed_bytes

_EMPTY = memoryview(b"")
# A value as orjson reads it from a body: None, bool, int, float, str, or a list or dict of them.
JSONValue = Any
_NARROW_FLOATS = ("FP16", "FP32")  # float datatypes a JSON number (a float64) can overflow
# The smallest magnitude that a cast rounds to infinity (half an ulp past the largest finite
# value; the tie rounds to even, which is the infinity).
_OVERFLOW_AT = {"FP32": (2 - 2**-24) * 2.0**127, "FP16": 65520.0}
_NUMPY_JSON = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"}


class OutputOptions(NamedTuple):
    """How the HTTP caller wants its outputs written: binary or JSON (HTTP only; gRPC
    outputs are always raw)."""

    binary_default: bool = False  # the request's binary_data_output parameter
    binary: Mapping[str, bool] = EMPTY  # per output, where its binary_data parameter is given
    shared: Mapping[str, tuple[str, int]] = EMPTY  # outputs written to shared memory: (region, bytes)


JSON_OUTPUTS = OutputOptions()


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Split a request body into its JSON part and its binary part."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        if not header_length.isascii() or not header_length.isdigit():  # (int() also reads "+1", "1_0", " 1")
            raise ValueError
        n = int(header_length)
    except ValueError:
        raise invalid(f"Inference-Header-Content-Length must be an integer, not {brief(header_length)}") from None
    if n < 0 or n > len(body):
        # int() reads up to 4,300 digits: the number is quoted cut, like any client value.
        raise invalid(f"Inference-Header-Content-Length is {clip(str(n), 40)} but the body has only {len(body)} bytes")
    mv = memoryview(body)
    return bytes(mv[:n]), mv[n:]


def parse_json(data: bytes, what: str = "request body") -> JSONValue:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise invalid(f"{what} is not valid JSON: {e}") from None


def decode_request(
    body: bytes,
    header_length: str | None,
    model: str,
    version: str,
    arrival: float,
    limits: RequestLimits,
    headers: Mapping[str, str] = EMPTY,
    shm: RegionView | None = None,
    note: Any = None,
    precheck: Callable[[str, str, tuple[int, ...]], None] | None = None,
) -> tuple[InferRequest, OutputOptions]:
    """The request in ``body`` and how its caller wants the outputs written; ``shm``: the
    registered shared-memory regions an input or output may name; ``precheck(name, datatype,
    shape)``: raises for an input the model refuses, before its values are read."""
    if header_length == "0":
        raise invalid(
            "raw binary requests (Inference-Header-Content-Length: 0) are not supported; "
            "send a JSON header describing the inputs"
        )
    if header_length is None:  # all JSON: the common case for curl and web apps
        head, binary = body, _EMPTY
    else:
        head, binary = split_body(body, header_length)
    try:
        obj = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        obj = _with_non_finite(head)  # NaN / Infinity, as Triton reads them and tritonclient writes them
        if obj is None:
            raise invalid(f"request body is not valid JSON: {e}") from None
    if type(obj) is not dict:
        raise invalid("request body must be a JSON object with an 'inputs' list")
    raw_inputs = obj.get("inputs")
    if type(raw_inputs) is not list:  # (an empty one is the model's to refuse, naming what it needs, as on gRPC)
        raise invalid("request must have an 'inputs' list")
    raw_outputs = obj.get("outputs")
    check_tensors(len(raw_inputs), len(raw_outputs) if type(raw_outputs) is list else 0, limits)
    offset = strings = 0
    inputs = []
    dt: DataType | None
    maybe_bools = b"true" in head or b"false" in head
    for j in raw_inputs:
        try:
            name, dtname, shape = j["name"], j["datatype"], j["shape"]
            dt = DATATYPES[dtname]
        except (KeyError, TypeError):
            name = dt = shape = None
        if (
            dt is None
            or type(name) is not str
            or type(shape) is not list
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            _explain_bad_input(j)
        shape = tuple(shape)
        strings = check_shape(name, shape, limits, dtname, strings)
        if precheck is not None:
            precheck(name, dt.v2, shape)
        params = j.get("parameters")
        size = None
        if params is not None:
            if type(params) is not dict:
                raise invalid(f"input '{clip(name)}': 'parameters' must be an object")
            params = _given(params)
            size = params.get("binary_data_size")
            if SHM_REGION in params:
                what = f"input '{clip(name)}'"
                if size is not None or "data" in j:
                    raise invalid(
                        f"{what} must set exactly one of 'data', parameters.binary_data_size or "
                        "parameters.shared_memory_region"
                    )
                if shm is None:
                    raise invalid(f"{what}: shared memory is not served here")
                place = shm.place_input(params, what, fixed_bytes(dt, shape))
                data = from_raw(shm.read(place, what), dt, shape, what)
                inputs.append(Tensor(name, dt.v2, shape, data))
                continue
        if (size is not None) == ("data" in j):
            raise invalid(f"input '{clip(name)}' must set exactly one of 'data' or parameters.binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise invalid(f"input '{clip(name)}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise invalid(
                    f"input '{clip(name)}': binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} binary bytes remain)"
                )
            data = from_raw(binary[offset : offset + size], dt, shape, f"input '{clip(name)}'")
            offset += size
        else:
            data = _from_json(j["data"], dt, shape, name, maybe_bools)
        own = None
        if params is not None and (len(params) > 1 or size is None):  # (beyond binary_data_size)
            own = tensor_parameters(
                {k: v for k, v in params.items() if k != "binary_data_size"}, f"input '{clip(name)}'"
            )
        inputs.append(Tensor(name, dt.v2, shape, data, own))
    if offset != len(binary):
        raise invalid(f"the body has {len(binary) - offset} binary bytes that no input claims")
    req_params = obj.get("parameters")
    if req_params is None:  # (absent or null; a falsy "" / [] / false is no object either)
        req_params = {}
    elif type(req_params) is not dict:
        raise invalid("request 'parameters' must be an object")
    req_params = _given(req_params)
    outputs = None
    binary_outputs: dict[str, bool] = {}  # output name -> its binary_data parameter
    shared: dict[str, Place] = {}  # output name -> where in shared memory it goes
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise invalid("'outputs' must be a list")
    if raw_outputs:  # ([] names no output: every output, as Triton, MLServer and an empty gRPC list read it)
        outputs = []
        for o in raw_outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise invalid("each entry of 'outputs' must be an object with a 'name'")
            op = o.get("parameters")
            if op is None:
                op = {}
            elif not isinstance(op, dict):
                raise invalid(f"output '{clip(o['name'])}': 'parameters' must be an object")
            op = _given(op)
            check_output(o["name"], op, bool(op.get("classification")))
            b = op.get("binary_data")
            if b is not None:
                if type(b) is not bool:  # ("false" is true to bool())
                    raise invalid(f"output '{clip(o['name'])}': parameter 'binary_data' must be true or false")
                binary_outputs[o["name"]] = b
            if SHM_REGION in op:
                what = f"output '{clip(o['name'])}'"
                if shm is None:
                    raise invalid(f"{what}: shared memory is not served here")
                shared[o["name"]] = shm.place(op, what)
            outputs.append(o["name"])
    rid = obj.get("id")
    if rid is None:  # absent, or null as pydantic-built bodies (MLServer's types) write an unset id
        rid = ""
    elif type(rid) is not str:
        raise invalid("request 'id' must be a string")
    # binary_data_output says how this wire writes the outputs: an HTTP option, not a request
    # parameter (gRPC has no such thing), so it is neither kept on the request nor counted.
    binary_default = False
    if "binary_data_output" in req_params:
        req_params = dict(req_params)
        binary_default = req_params.pop("binary_data_output")
        if type(binary_default) is not bool:
            raise invalid("parameter 'binary_data_output' must be true or false")
    req = new_request(model, version, inputs, outputs, rid, req_params, headers, arrival, "http", limits, None, note)
    if not binary_outputs and not binary_default and not shared:
        return req, JSON_OUTPUTS
    written: Mapping[str, tuple[str, int]] = EMPTY
    if shared and shm is not None:  # outputs to shared memory: written as the request's last step
        writer = OutputWriter(shared, shm)
        req = req._replace(sink=writer)
        written = writer.written  # (filled in when the answer comes)
    return req, OutputOptions(binary_default, MappingProxyType(binary_outputs), written)


def _given(params: dict[str, JSONValue]) -> dict[str, JSONValue]:
    """The parameters that have a value: a JSON null reads as not given. MLServer's own request
    types write every unset field so (``"headers": null`` in each ``parameters`` of a body built
    with its codecs and sent as ``.dict()``), and MLServer reads it as absent; gRPC cannot carry it."""
    if None not in params.values():
        return params
    return {k: v for k, v in params.items() if v is not None}


def _explain_bad_input(j: object) -> NoReturn:
    """Raise the precise error for an input entry that failed the quick checks."""
    if not isinstance(j, dict) or not isinstance(j.get("name"), str):
        raise invalid("each entry of 'inputs' must be an object with a 'name'")
    what = f"input '{printable(clip(j['name']))}'"
    if not isinstance(j.get("datatype"), str):
        raise invalid(f"{what} needs a 'datatype' string")
    datatype(j["datatype"], what)
    raise invalid(f"{what}: 'shape' must be a list of non-negative integers, not {brief(j.get('shape'))}")


def _from_json(
    data: JSONValue, dt: DataType, shape: tuple[int, ...], name: str, maybe_bools: bool = True
) -> np.ndarray:
    what = f"input '{clip(name)}'"
    count = element_count(shape)
    try:
        if dt.v2 == "BYTES":
            flat = _flatten(data, max(1, len(shape)))
            arr = np.empty(len(flat), dtype=object)
            arr[:] = [v.encode() if isinstance(v, str) else _bytes_elem(v, what) for v in flat]
        else:
            arr = _json_numbers(data, dt, maybe_bools).reshape(-1)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise invalid(f"{what}: 'data' does not hold {dt.v2} values: {e}") from None
    if arr.size != count:
        raise invalid(f"{what}: shape {list(shape)} needs {count} elements but 'data' has {arr.size}")
    return shaped(arr, shape, what)


def _json_numbers(data: JSONValue, dt: DataType, maybe_bools: bool = True) -> np.ndarray:
    """JSON values as ``dt``, refusing what a cast would silently change: a plain
    ``np.asarray(data, dtype)`` turns 1.5 into 1, true into 1 and "7" into 7."""
    arr = np.asarray(data)  # numpy's own reading first: its kind says what the JSON held
    kind = arr.dtype.kind
    if (
        maybe_bools
        and arr.size
        and dt.v2 != "BOOL"
        and kind in "iuf"
        and any(v is True or v is False for v in _flatten(data))
    ):
        kind = "b"  # numpy reads [1, true] as [1, 1]
    if arr.size:
        if dt.v2 == "BOOL":
            if kind != "b":
                raise ValueError("BOOL data must be true or false")
        elif dt.np_dtype.kind in "iu":
            info = np.iinfo(dt.np_dtype)
            if kind in "iu":
                low, high = int(arr.min()), int(arr.max())
            else:
                # numpy reads ints past int64 (e.g. UINT64 near 2**64 beside small ones) as
                # float64, losing digits: check and convert those from the JSON values themselves.
                flat = _flatten(data)
                if not all(type(v) is int for v in flat):
                    # orjson reads an integer past 64 bits as a float: out of range, not "not an integer"
                    # (-2**63 - 1 so read rounds to -2**63, which orjson would have kept an int)
                    low_end = info.min + (info.min == -(2**63))
                    others = [v for v in flat if type(v) is not int]
                    if all(type(v) is float and v.is_integer() and not low_end <= v <= info.max for v in others):
                        raise ValueError(f"a value is out of range for {dt.v2} [{info.min}, {info.max}]")
                    raise ValueError(f"{dt.v2} data must be integers")
                low, high = min(flat), max(flat)
                if low >= info.min and high <= info.max:
                    return np.array(flat, dtype=dt.np_dtype).reshape(arr.shape)
            if low < info.min or high > info.max:
                raise ValueError(f"a value is out of range for {dt.v2} [{info.min}, {info.max}]")
        elif kind not in "iuf":
            raise ValueError(f"{dt.v2} data must be numbers")
        elif dt.v2 in _NARROW_FLOATS and (kind == "f" or dt.v2 == "FP16"):
            # A JSON number past FP16 / FP32's range would be cast to inf (with numpy's
            # RuntimeWarning): refuse any whose magnitude rounds to inf. Integers (at most
            # 2**64) always fit FP32, so only FP16 checks them. Small arrays are checked in
            # Python (two numpy reductions cost more than the whole check there). NaN and
            # Infinity (the JSON extension Triton reads, and our own answers write) are values
            # of every float type: only the finite values are judged (a NaN made max() and
            # min() say nothing, an Infinity was refused as out of range).
            top: float
            bottom: float
            if arr.size <= 16:
                values: list[float] = arr.ravel().tolist()
                top, bottom = max(values), min(values)
                if not (math.isfinite(top) and math.isfinite(bottom)):
                    values = [v for v in values if math.isfinite(v)]
                    top, bottom = max(values, default=0.0), min(values, default=0.0)
            else:
                top, bottom = arr.max(), arr.min()
                if not (np.isfinite(top) and np.isfinite(bottom)):
                    finite = arr[np.isfinite(arr)]
                    top, bottom = (finite.max(), finite.min()) if finite.size else (0.0, 0.0)
            overflow = _OVERFLOW_AT[dt.v2]
            if top >= overflow or bottom <= -overflow:
                limit = float(np.finfo(dt.np_dtype).max)
                raise ValueError(f"a value is outside the range of {dt.v2} [{-limit:.8g}, {limit:.8g}]")
    return arr.astype(dt.np_dtype)


def _bytes_elem(v: object, what: str) -> NoReturn:
    raise invalid(f"{what}: BYTES data must be strings, not {type(v).__name__}")


def _flatten(x: JSONValue, max_depth: int = 64) -> list[JSONValue]:
    """The values of nested lists, in order; refuses nesting deeper than ``max_depth`` (a
    loop, not recursion: a body nested thousands deep must be a 400, not a crash)."""
    if not isinstance(x, list):
        return [x]
    out: list[JSONValue] = []
    stack = [iter(x)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) >= max_depth:
                    raise ValueError(f"'data' is nested more than {max_depth} lists deep")
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def heavy_answer(resp: InferResponse, options: OutputOptions) -> bool:
    """Whether an answer is written on a thread (``core.types.heavy``): its values written one by
    one (JSON values, BYTES elements), or its binary data copied, past the bounds. On the event
    loop a 1,000,000-value JSON answer took ~50 ms, 1,000,000 BYTES elements ~600 ms."""
    elements = nbytes = 0
    for t in resp.outputs:
        if options.shared and t.name in options.shared:
            continue
        if t.datatype == "BYTES" or not options.binary.get(t.name, options.binary_default):
            elements += t.data.size
        else:
            nbytes += t.data.nbytes
    return heavy(elements, nbytes)


def encode_response(resp: InferResponse, options: OutputOptions = JSON_OUTPUTS) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when every output is JSON). An output in
    ``options.shared`` (written to shared memory by the request's ``shm.OutputWriter``) is
    answered with its region and size, without data."""
    binaries: list[bytes] = []
    outs = []
    wanted = options.binary
    default = options.binary_default
    shared = options.shared
    any_binary = False  # an output written in binary (even of 0 bytes): the answer needs its header length
    for t in resp.outputs:
        b = wanted.get(t.name)
        binary = default if b is None else b
        entry: dict[str, object] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        place = shared.get(t.name) if shared else None
        if place is not None:
            entry["parameters"] = {SHM_REGION: place[0], "shared_memory_byte_size": place[1]}
        elif binary:
            any_binary = True
            raw = to_raw(t.data, DATATYPES[t.datatype])
            entry["parameters"] = {"binary_data_size": len(raw)}
            if raw:
                binaries.append(raw)
        else:
            entry["data"] = _to_json(t)
        if t.parameters:  # (an upstream's, passed on: MLServer's content_type)
            entry["parameters"] = {**t.parameters, **entry.get("parameters", {})}  # type: ignore[dict-item]
        outs.append(entry)
    obj: dict[str, object] = {"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outs}
    if resp.id:
        obj["id"] = resp.id
    if resp.parameters:  # a route's answer: parameter "variant"
        obj["parameters"] = dict(resp.parameters)
    head = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" in head:  # (orjson writes NaN and infinities as null: rarely, and then written again)
        for entry, t in zip(outs, resp.outputs):
            if "data" in entry and t.datatype in _FLOAT_JSON:
                entry["data"] = _non_finite_json(t)
        head = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    if not any_binary:
        return head, None
    return head + b"".join(binaries), len(head)


_FLOAT_JSON = frozenset(("FP16", "FP32", "FP64"))


class BodyRefused(GatewayError):
    """A request refused before its whole body was read (too large): answered, then the
    connection is closed, so the rest of the body is never taken for the next request."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT, retry_after_s: float | None = None):
        super().__init__(code, message, retry_after_s)


def error_body(message: str) -> bytes:
    """An error answer's JSON body (a message that is not Unicode, quoting what a client sent,
    is written with backslash escapes rather than failing)."""
    try:
        return orjson.dumps({"error": message})
    except TypeError:
        return orjson.dumps({"error": message.encode("utf-8", "backslashreplace").decode()})


def _with_non_finite(head: bytes) -> object | None:
    """A JSON body with the tokens NaN, Infinity and -Infinity (not JSON, but what Triton reads and
    Python's json writes for a float tensor holding them), or None when it is not that."""
    if b"NaN" not in head and b"Infinity" not in head:
        return None
    try:
        obj: object = json.loads(head, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None
    if b"\\u" in head:
        # Python's reader keeps a lone UTF-16 surrogate escape (orjson refuses one): a string
        # that is not Unicode would fail every later encode (the answer, the access log) as a 500
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise invalid("request body is not valid JSON: a \\uD800-\\uDFFF escape without its pair") from None
    return obj


def _finite_float(text: str) -> float:
    """A JSON number as Python's json reads it, but refused, as orjson refuses it, when it is too
    large for a double: Python's reader makes 1e400 infinity, which must not pass as a value."""
    value = float(text)
    if math.isinf(value):
        raise invalid(f"request body is not valid JSON: the number {clip(text, 40)} is past the range of a double")
    return value


def _non_finite_json(t: Tensor) -> object:
    """A float tensor's JSON list with NaN and infinities as the tokens NaN, Infinity, -Infinity:
    JSON has no such numbers (orjson writes null), and Triton writes these (tritonclient reads
    them back as floats)."""
    arr = t.data.reshape(-1)
    if np.isfinite(arr).all():
        return _to_json(t)
    return orjson.Fragment(json.dumps(arr.astype(np.float64).tolist()).encode())


def _to_json(t: Tensor) -> object:  # what orjson writes as the JSON list
    arr = t.data.reshape(-1)
    if t.datatype in _NUMPY_JSON and arr.dtype == DATATYPES[t.datatype].np_dtype.newbyteorder("="):
        return np.ascontiguousarray(arr)
    if t.datatype == "BYTES":
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr]
        except UnicodeDecodeError:  # (a remote model's answer, say): never altered, as "replace" had
            raise invalid(
                f"output '{clip(t.name)}' holds bytes that are not UTF-8 text, which JSON cannot carry "
                "unchanged; ask for it with binary_data"
            ) from None
    return arr.tolist()


# ------------------------------------------------------------------ compression (infer only)
DECOMPRESS_CHUNK = 64 * 1024  # input fed to zlib at a time: what is copied per member stays small
MAX_GZIP_MEMBERS = 64


def decompress(body: bytes, encoding: str | None, limit: int, max_members: int = MAX_GZIP_MEMBERS) -> bytes:
    """Undo gzip or deflate on a request body, never producing more than ``limit`` bytes nor
    reading more than ``max_members`` gzip members. Linear in the body: the input is fed in
    chunks, so a body of many tiny members costs no more than one of a few large ones."""
    enc = (encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise invalid(f"unsupported Content-Encoding '{clip(encoding or '')}'; use gzip or deflate")
    wbits = 16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS
    mv = memoryview(body)
    end = len(mv)
    parts: list[bytes] = []
    size = pos = members = 0
    while True:  # gzip allows several members one after another
        members += 1
        if members > max_members:
            raise invalid(f"the gzip request body has more than {max_members} members (max_gzip_members)")
        d = zlib.decompressobj(wbits)
        while not d.eof:
            if pos >= end:
                raise invalid(f"the {enc} request body is truncated")
            chunk = mv[pos : pos + DECOMPRESS_CHUNK]
            pos += len(chunk)
            try:
                out = d.decompress(chunk, limit - size + 1)
            except zlib.error as e:
                raise invalid(f"the {enc} request body is corrupt: {e}") from None
            size += len(out)
            if size > limit:
                raise invalid(f"request body exceeds the limit of {limit} bytes once decompressed")
            parts.append(out)
        pos -= len(d.unused_data)  # the next member starts in what this chunk left over
        if pos >= end:
            break
        if enc != "gzip":
            raise invalid(f"the {enc} request body has {end - pos} bytes after its end")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def pick_encoding(accept: str | None) -> str | None:
    """gzip or deflate per Accept-Encoding (highest q, first on a tie); None for identity."""
    if not accept:
        return None
    best, best_q = None, 0.0
    for part in accept.split(","):
        bits = part.strip().split(";")
        name = bits[0].strip().lower()
        q = 1.0
        for b in bits[1:]:
            b = b.strip()
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 0.0
        if name in ("gzip", "deflate", "identity") and q > best_q:
            best, best_q = name, q
    return None if best in (None, "identity") else best


# On a thread: answers compressed past the first, bodies decoded past the second (64 KiB of one-byte
# BYTES elements is ~13,000 of them, a few ms to read; 330 KB took ~30 ms). grpc_wire.py inflates.
COMPRESS_ON_LOOP_MAX_BYTES = 256 * 1024
DECODE_ON_LOOP_MAX_BYTES = 64 * 1024


def compress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(body) + c.flush()
    return zlib.compress(body)
