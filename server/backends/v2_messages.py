"""V2 gRPC messages a remote model sends and reads, built without the gateway's state: a
request's inputs sent raw, a string field of a forwarded request's suffix, a config made from
an upstream's metadata alone, what an upstream serves, its answers' tensors and parameters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from ..core.batcher_config import MAX_PRIORITY_LEVELS
from ..core.errors import ErrorCode, GatewayError
from ..core.types import BY_CONFIG, DATATYPES, element_count, from_raw, heavy, is_version_text, to_raw
from ..shm import BYTE_SIZE, OFFSET, REGION
from ..transport import grpc_codec

if TYPE_CHECKING:
    from ..config import RemoteModel

# Parameters of an answer's output that say how the upstream put it on its own wire (binary after
# the JSON, or in a shared-memory region), not what it is: the gateway answers on its wire and
# sets them itself where they apply. Passed on, a client read an output answered in JSON as binary
# data (tritonclient's HTTP client failed, or sliced the next outputs' bytes), or sought it in a
# region the upstream named.
WIRE_PARAMETERS = frozenset(("binary_data_size", "binary_data", REGION, BYTE_SIZE, OFFSET))


def fill_request(
    msg: pb.ModelInferRequest, feeds: dict[str, np.ndarray], types: dict[str, str], names: tuple[str, ...]
) -> pb.ModelInferRequest:
    """``msg`` with ``feeds`` as its inputs (their V2 datatypes in ``types``), sent raw
    (``raw_input_contents``), and ``names`` as the outputs it asks for."""
    for name, arr in feeds.items():
        dt = DATATYPES[types[name]]
        msg.inputs.add(name=name, datatype=dt.v2, shape=arr.shape)
        msg.raw_input_contents.append(to_raw(arr, dt))
    for name in names:
        msg.outputs.add(name=name)
    return msg


def with_parameters(msg: pb.ModelInferRequest, params, input_params) -> pb.ModelInferRequest:
    """``msg`` with the batch's request parameters and each input's own."""
    if params:
        grpc_codec.set_parameters(msg.parameters, params)
    if input_params:
        for t in msg.inputs:
            grpc_codec.set_parameters(t.parameters, input_params.get(t.name) or {})
    return msg


def heavy_request(feeds: dict[str, np.ndarray]) -> bool:
    """Whether the upstream's request is built on a thread (BYTES inputs framed one by one, or many
    MB copied: see ``core.types.heavy``)."""
    elements = sum(a.size for a in feeds.values() if a.dtype.kind in "OSU")
    return heavy(elements, sum(a.nbytes for a in feeds.values() if a.dtype.kind not in "OSU"))


def heavy_answer(resp: pb.ModelInferResponse) -> bool:
    """Whether an upstream's answer is read on a thread: its BYTES outputs (read element by
    element), or any output sent as typed contents rather than raw, past OFF_LOOP_ELEMENTS."""
    typed = not resp.raw_output_contents
    return heavy(sum(element_count(t.shape) for t in resp.outputs if typed or t.datatype == "BYTES"), 0)


T = TypeVar("T")


async def apart(on_thread: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, on a thread when ``on_thread`` (the event loop serves on meanwhile)."""
    return await asyncio.to_thread(fn, *args) if on_thread else fn(*args)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def string_field(number: int, value: str) -> bytes:
    """One protobuf string field, encoded even when empty (which must replace one given earlier)."""
    data = value.encode("utf-8")
    return _varint(number << 3 | 2) + _varint(len(data)) + data


# A config made from metadata alone says so in this parameter: its shapes are the upstream's
# declaration, which an upstream without configs (MLServer) does not hold its answers to.
FROM_METADATA = "remote_config_from"


def config_from_metadata(meta: pb.ModelMetadataResponse, max_batch_size: int) -> mc.ModelConfig:
    """A config from V2 model metadata alone. With ``max_batch_size`` > 0 the first dimension of
    every tensor, which must be -1, is the batch dimension."""
    cfg = mc.ModelConfig(name=meta.name, platform=meta.platform)
    cfg.parameters[FROM_METADATA].string_value = "metadata"
    tensors = list(meta.inputs) + list(meta.outputs)
    batched = max_batch_size > 0 and all(t.shape and t.shape[0] == -1 for t in tensors)
    cfg.max_batch_size = max_batch_size if batched else 0
    for src, dst in ((meta.inputs, cfg.input), (meta.outputs, cfg.output)):
        for t in src:
            dt = DATATYPES.get(t.datatype)
            if dt is None:
                raise GatewayError(
                    ErrorCode.UNAVAILABLE, f"tensor '{t.name}' has datatype {t.datatype}, which batchgate cannot serve"
                )
            dims = list(t.shape[1:]) if batched else list(t.shape)
            dst.add(name=t.name, data_type=mc.DataType.Value(dt.config), dims=dims)
    return cfg


def answer_parameters(resp: pb.ModelInferResponse, into: dict | None) -> None:
    """The parameters of an upstream's answer, into ``into`` ("": the answer's, else by output)."""
    if into is not None:
        if resp.parameters:
            into[""] = grpc_codec.parameters_of(resp.parameters)
        for t in resp.outputs:
            if t.parameters:
                kept = {k: v for k, v in grpc_codec.parameters_of(t.parameters).items() if k not in WIRE_PARAMETERS}
                if kept:
                    into[t.name] = kept


def what_is_served(meta: pb.ModelMetadataResponse, pinned: str = "") -> tuple:
    """What an upstream serves, to tell a change: its highest version, and the tensors. With a
    ``pinned`` version, that version: Triton lists every version it has ready whichever was asked
    for, and another one appearing or going changes nothing for a model pinned to one."""
    numeric = [int(v) for v in meta.versions if is_version_text(v)]  # (not "²", nor past what a request names)
    tensors = tuple((t.name, t.datatype, tuple(t.shape)) for t in [*meta.inputs, *meta.outputs])
    return (pinned or (str(max(numeric)) if numeric else ""), len(meta.inputs), tensors)


def answer_tensors(address: str, resp: pb.ModelInferResponse) -> dict[str, tuple[str, np.ndarray]]:
    """Every output of the upstream ``address``'s answer, by name: (V2 datatype, array). A
    malformed answer is the upstream's fault, not the caller's: INTERNAL."""
    got = {}
    raw = resp.raw_output_contents  # (or none: each output's typed contents, as the protocol allows)
    if raw and len(raw) != len(resp.outputs):
        raise GatewayError(ErrorCode.INTERNAL, f"upstream {address} answered raw contents for some outputs only")
    for i, t in enumerate(resp.outputs):
        dt = DATATYPES.get(t.datatype)
        if dt is None:
            raise GatewayError(
                ErrorCode.INTERNAL, f"upstream {address} answered output '{t.name}' with unknown datatype {t.datatype}"
            )
        what = f"upstream {address} output '{t.name}'"
        if t.name in got:  # which of the two the caller would get is anyone's guess
            raise GatewayError(ErrorCode.INTERNAL, f"{what} is answered twice")
        shape = tuple(t.shape)
        if shape and min(shape) < 0:  # (-1 would be read as "whatever fits", and a count below 0 fails numpy)
            raise GatewayError(ErrorCode.INTERNAL, f"{what} has shape {list(shape)[:8]}: a dimension below 0")
        try:
            got[t.name] = (
                dt.v2,
                (from_raw(raw[i], dt, shape, what) if raw else grpc_codec.from_contents(t, dt, shape, what)),
            )
        except GatewayError as e:
            raise GatewayError(ErrorCode.INTERNAL, e.message) from None
    return got


def answer_outputs(
    address: str,
    resp: pb.ModelInferResponse,
    names: tuple[str, ...],
    declared: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
) -> list[np.ndarray]:
    """The outputs ``names`` of an answer, in order; one missing, in another datatype than
    ``declared`` (output name -> V2 datatype: it would be cast to that silently), or in a shape
    that ``shapes`` (output name -> dims, -1 for any) does not allow, is INTERNAL."""
    got = answer_tensors(address, resp)
    missing = [n for n in names if n not in got]
    if missing:
        raise GatewayError(ErrorCode.INTERNAL, f"upstream {address} did not answer output(s) {missing}")
    for n in names:
        want = declared.get(n)
        if want is not None and got[n][0] != want:
            raise GatewayError(
                ErrorCode.INTERNAL,
                f"upstream {address} answered output '{n}' as {got[n][0]}; its signature says {want}",
            )
        dims, shape = shapes.get(n), got[n][1].shape
        if dims is not None and (len(shape) != len(dims) or any(-1 != d != s for s, d in zip(shape, dims))):
            raise GatewayError(
                ErrorCode.INTERNAL,
                f"upstream {address} answered output '{n}' in shape {list(shape)}; its signature says {list(dims)}",
            )
    return [got[n][1] for n in names]


@dataclass
class ServedConfig:
    """A remote model's config as batchgate serves it, and what its calls need of it."""

    config: mc.ModelConfig
    one_by_one: bool = False  # sequences or shape tensors upstream: each request goes as it came
    why: str = ""  # (which of the two, for the log)
    in_types: dict[str, str] = field(default_factory=dict)  # V2 datatypes by tensor name
    out_types: dict[str, str] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # (-1: any size; the batch first)


def served_config(spec: RemoteModel, upstream: mc.ModelConfig) -> ServedConfig:
    """The upstream's config under our name and our scheduling; UNAVAILABLE for a tensor of a
    datatype batchgate cannot serve, or a decoupled model."""
    if upstream.model_transaction_policy.decoupled:
        # Triton serves it on streams only: its ModelInfer, the one call made here, fails UNIMPLEMENTED
        raise GatewayError(
            ErrorCode.UNAVAILABLE,
            f"model '{spec.target}' is decoupled there (model_transaction_policy): Triton answers it "
            "on streams only, and a remote model calls ModelInfer",
        )
    cfg = mc.ModelConfig()
    cfg.CopyFrom(upstream)
    cfg.name = spec.name
    if spec.max_batch_size and upstream.max_batch_size:
        cfg.max_batch_size = min(spec.max_batch_size, upstream.max_batch_size)
    # A sequence model keeps each request apart: its upstream's sequence batcher needs every
    # step of a sequence as the caller sent it, sequence_id and start/end parameters with it.
    sequences = upstream.HasField("sequence_batching")
    # A shape tensor (TensorRT) holds values that describe the batch, one copy for all its
    # rows: requests merged by rows would hand the upstream a tensor it cannot read.
    shapes = [t.name for t in (*upstream.input, *upstream.output) if t.is_shape_tensor]
    out = ServedConfig(cfg, one_by_one=sequences or bool(shapes))
    out.why = "batches sequences" if sequences else f"has shape tensor(s) {', '.join(shapes[:4])}"
    for name in ("dynamic_batching", "sequence_batching", "ensemble_scheduling", "instance_group", "version_policy"):
        cfg.ClearField(name)
    if spec.batching == "gateway" and cfg.max_batch_size > 0 and not out.one_by_one:
        cfg.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
        # Requests wait in this queue before the upstream's: they wait in the upstream's priority
        # order here too (a request's `priority` reaches the upstream with it), or a priority-1
        # request queued here behind every request of a lower level that came first.
        levels, default = upstream.dynamic_batching.priority_levels, upstream.dynamic_batching.default_priority_level
        if 1 <= default <= levels <= MAX_PRIORITY_LEVELS:
            cfg.dynamic_batching.priority_levels = levels
            cfg.dynamic_batching.default_priority_level = default
    cfg.instance_group.add(count=spec.inflight, kind=mc.ModelInstanceGroup.KIND_MODEL)
    cfg.parameters["remote_upstreams"].string_value = ",".join(spec.upstreams)
    cfg.parameters["remote_batching"].string_value = spec.batching
    cfg.parameters["remote_model"].string_value = spec.target
    for tensors, types in ((cfg.input, out.in_types), (cfg.output, out.out_types)):
        for t in tensors:
            dt = BY_CONFIG.get(mc.DataType.Name(t.data_type))
            if dt is None:
                raise GatewayError(
                    ErrorCode.UNAVAILABLE,
                    f"tensor '{t.name}' has datatype {mc.DataType.Name(t.data_type)}, which batchgate cannot serve",
                )
            types[t.name] = dt.v2
    batch = (-1,) if cfg.max_batch_size > 0 else ()
    # (a shape tensor's values describe the batch, its own shape need not carry it: not checked)
    out.out_shapes = {t.name: batch + tuple(t.dims) for t in cfg.output if not t.is_shape_tensor}
    if FROM_METADATA in upstream.parameters and upstream.parameters[FROM_METADATA].string_value == "metadata":
        # MLServer declares an output [-1] and answers it [N, 1], as its own clients then get it:
        # served as it came (a batch's answer is still cut by its rows, and a datatype checked).
        out.out_shapes = {}
    return out
