"""Model configs: Triton's ``config.pbtxt``, parsed, completed and checked.

Parsing uses ``model_config_pb2`` from tritonclient and protobuf's text format,
so any config Triton accepts parses the same way here. What the file leaves out
is completed from the model's own signature, as Triton's auto-complete does.
"""

from __future__ import annotations

import os
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

from ..backends.base import IOInfo
from ..core.batcher_config import MAX_QUEUE_DELAY_US, BatcherConfig, QueuePolicy
from ..core.errors import ModelConfigError, invalid
from ..core.signature import ModelSignature, TensorSpec
from ..core.types import BY_CONFIG, DATATYPES, clip, printable

CONFIG_FILE = "config.pbtxt"
# The ``backend`` name Triton gives each platform batchgate serves (filled in when a config has none).
BACKEND_NAMES = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}


MAX_INSTANCES = 256  # instances of one model version, all groups together


def read_config(model_dir: str, name: str) -> mc.ModelConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    cfg = mc.ModelConfig()
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:  # (a directory, no permission: said without the server's path)
            raise ModelConfigError(f"model '{name}': {CONFIG_FILE} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ModelConfigError(
                f"model '{name}': {CONFIG_FILE} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                f"{e.start}); save it as UTF-8"
            ) from None
        try:
            text_format.Parse(text, cfg)
        except text_format.ParseError as e:
            raise ModelConfigError(f"model '{name}': {CONFIG_FILE}: {e}") from None
    if cfg.name and cfg.name != name:
        raise ModelConfigError(
            f"model '{name}': {CONFIG_FILE}: name '{printable(clip(cfg.name))}' does not match the directory name"
        )
    cfg.name = name
    return cfg


def config_from_json(text: str, name: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    try:
        json_format.Parse(text, cfg)
    except json_format.ParseError as e:
        # (the parser quotes the caller's field names and values: cut, and on one line)
        raise invalid(
            f"model '{name}': the config given with the load request is not valid: {printable(clip(str(e), 256))}"
        ) from None
    # protobuf's parser walks any JSON it is given as if it were an object: an empty list or
    # string reads as an empty config. Parsed, the text is valid JSON; an object starts with '{'.
    if not text.lstrip(" \t\r\n").startswith("{"):
        raise invalid(f"model '{name}': the config given with the load request must be a JSON object")
    if cfg.name and cfg.name != name:  # refused, as Triton does: never served under another name
        raise invalid(
            f"model '{name}': the config given with the load request names model "
            f"'{printable(clip(cfg.name))}'; its name must be '{name}' or left out"
        )
    cfg.name = name
    return cfg


def versions_to_serve(cfg: mc.ModelConfig, available: list[int]) -> list[int]:
    available = sorted(available)
    policy = cfg.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return available
    if policy == "specific":
        wanted = set(cfg.version_policy.specific.versions)
        return [v for v in available if v in wanted]
    n = cfg.version_policy.latest.num_versions if policy == "latest" else 1
    return available[-max(n, 1) :] if available else []


def _dims_from(info: IOInfo, batched: bool) -> list[int]:
    return list(info.shape[1:] if batched else info.shape)


def complete_config(
    cfg: mc.ModelConfig,
    platform: str,
    inputs: list[IOInfo],
    outputs: list[IOInfo],
    default_max_batch_size: int,
    overridable: list[IOInfo] | tuple[IOInfo, ...] = (),
) -> mc.ModelConfig:
    """Fill what ``cfg`` leaves out from the engine's signature; check what it gives.
    ``overridable``: tensors the engine takes when given but does not need (ONNX initializers
    that are graph inputs too), served only where the config lists them, optional."""
    cfg = _copy(cfg)
    _refuse_what_triton_refuses_first(cfg)
    given_names = {e.name for e in cfg.input}
    real_names = {t.name for t in inputs}
    listed = [t for t in overridable if t.name in given_names and t.name not in real_names]
    # As Triton completes them: the platform served and its backend name, each when missing
    # (a config naming only the backend, "pytorch", gets platform pytorch_libtorch too).
    if not cfg.platform and (not cfg.backend or cfg.backend == BACKEND_NAMES.get(platform)):
        cfg.platform = platform
    if not cfg.backend:
        cfg.backend = BACKEND_NAMES.get(platform, cfg.backend)
    not_batch, _ = batch_doubts(inputs, outputs)
    if not cfg.input and not cfg.output and cfg.max_batch_size == 0:
        # Batch along the first dimension when every tensor's first dimension is dynamic and
        # none is known to be another dimension (the outputs of a transpose, a sum over rows).
        tensors = inputs + outputs
        dynamic = tensors and all(t.shape and t.shape[0] == -1 for t in tensors)
        if default_max_batch_size > 0 and dynamic and not not_batch:
            cfg.max_batch_size = default_max_batch_size
            # and, as Triton's ONNX and TorchScript backends complete it, the dynamic batcher with
            # its defaults when the config chose no scheduler
            if default_max_batch_size > 1 and cfg.WhichOneof("scheduling_choice") is None:
                cfg.dynamic_batching.SetInParent()
    if not cfg.HasField("version_policy"):  # (Triton's completed config says the default)
        cfg.version_policy.latest.num_versions = 1
    if not cfg.instance_group:
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    for g in cfg.instance_group:
        if g.count < 1:
            g.count = 1
    if sum(g.count for g in cfg.instance_group) > MAX_INSTANCES:
        raise ModelConfigError(
            f"model '{cfg.name}': instance_group asks for {sum(g.count for g in cfg.instance_group)} instances; "
            f"at most {MAX_INSTANCES} (each is an execution that may run at once)"
        )
    batched = cfg.max_batch_size > 0
    if batched:  # (as Triton refuses it: requests merged into a batch would not fit the model)
        fixed = [t.name for t in inputs + listed + outputs if t.shape and t.shape[0] > 0]
        if fixed:
            raise ModelConfigError(
                f"model '{cfg.name}': max_batch_size is {cfg.max_batch_size} but the model's first dimension of "
                f"{', '.join(repr(n) for n in fixed[:4])} is fixed, not a batch dimension; set max_batch_size: 0 "
                "and give the full dims"
            )
        # and, beyond Triton: requests merged into one batch would be given each other's rows
        outs = {t.name for t in outputs}
        for tensor, why in not_batch.items():
            if tensor in outs:
                raise ModelConfigError(
                    f"model '{cfg.name}': max_batch_size is {cfg.max_batch_size} but {why}, not the batch; "
                    "callers whose requests shared a batch would be given each other's rows. "
                    "Set max_batch_size: 0 and give the full dims"
                )
    given_inputs = bool(cfg.input)
    for kind, given, engine in (("input", cfg.input, inputs + listed), ("output", cfg.output, outputs)):
        by_name = {t.name: t for t in engine}
        if not given:
            for t in engine:
                entry = given.add()
                entry.name = t.name
                entry.data_type = mc.DataType.Value(DATATYPES[t.v2_datatype].config)
                entry.dims.extend(_dims_from(t, batched))
            continue
        for entry in given:
            info = by_name.get(entry.name)
            if info is None:
                raise ModelConfigError(
                    f"model '{cfg.name}': config {kind} '{entry.name}' is not in the model; "
                    f"the model's {kind}s are {', '.join(repr(n) for n in by_name)}"
                )
            if kind == "input" and entry.name in {t.name for t in listed} and not entry.optional:
                # (as Triton's ONNX Runtime backend, whose count of the config's inputs that are
                # not optional must be the model's count of inputs)
                raise ModelConfigError(
                    f"model '{cfg.name}': config input '{entry.name}' is an initializer of the model that a "
                    "request may override, so it must be optional: true (a request that leaves it out is "
                    "run with the model's own value)"
                )
            if kind == "input" and entry.optional and entry.name in real_names:
                # (as Triton refuses it: its count of the config's inputs that are not optional must
                # be the model's count) A request that left it out would fail inside the engine.
                raise ModelConfigError(
                    f"model '{cfg.name}': config input '{entry.name}' is optional: true, but the model needs it "
                    "(it has no value of its own to run with when a request leaves it out); remove optional: true"
                )
            want = DATATYPES[info.v2_datatype].config
            if entry.data_type == mc.TYPE_INVALID:
                entry.data_type = mc.DataType.Value(want)
            elif mc.DataType.Name(entry.data_type) != want:
                raise ModelConfigError(
                    f"model '{cfg.name}': config {kind} '{entry.name}' says "
                    f"{mc.DataType.Name(entry.data_type)} but the model has {want}"
                )
            if not entry.dims:
                entry.dims.extend(_dims_from(info, batched))
            elif info.shape:
                _check_dims(cfg.name, kind, entry, _dims_from(info, batched))
    missing = [t.name for t in inputs if t.name not in {e.name for e in cfg.input}] if given_inputs else []
    if missing:
        raise ModelConfigError(
            f"model '{cfg.name}': the model needs input(s) {', '.join(repr(n) for n in missing[:8])}, "
            "which the config does not list"
        )
    _refuse_what_triton_refuses(cfg)  # (once the dims are completed)
    return cfg


def _refuse_what_triton_refuses_first(cfg: mc.ModelConfig) -> None:
    """What no completion can mend: a negative ``max_batch_size`` (Triton refuses it; it read as
    a batch of -1 rows) and a tensor listed twice (the metadata would list it twice)."""
    if cfg.max_batch_size < 0:
        raise ModelConfigError(
            f"model '{cfg.name}': max_batch_size must not be negative (0: the model does not batch), "
            f"not {cfg.max_batch_size}"
        )
    for kind, entries in (("input", cfg.input), ("output", cfg.output)):
        seen: dict[str, int] = {}
        for e in entries:
            seen[e.name] = seen.get(e.name, 0) + 1
        twice = [n for n, k in seen.items() if k > 1]
        if twice:
            raise ModelConfigError(
                f"model '{cfg.name}': config {kind} '{_said(twice[0])}' is listed {seen[twice[0]]} times; "
                f"list each {kind} once"
            )


def check_instance_groups(cfg: mc.ModelConfig) -> None:
    """What Triton refuses in ``instance_group`` before any instance is made: GPUs listed on a
    group that does not run on them (KIND_CPU, KIND_MODEL; they were taken from such a group
    for a KIND_GPU one beside it, or ignored), a GPU id below 0, and a TensorRT ``profile``."""
    for i, g in enumerate(cfg.instance_group):
        which = f"instance_group {i}" + (f" ('{_said(g.name)}')" if g.name else "")
        gpus = list(g.gpus)[:8]
        if gpus and g.kind in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_MODEL):
            kind = mc.ModelInstanceGroup.Kind.Name(g.kind)
            raise ModelConfigError(
                f"model '{cfg.name}': {which} has kind {kind} but lists gpus {gpus}; only a KIND_GPU group "
                "names GPUs (Triton refuses it too): remove gpus, or set kind: KIND_GPU"
            )
        if len(g.profile):  # (TensorRT optimization profiles: no platform served here has them)
            raise ModelConfigError(
                f"model '{cfg.name}': {which} sets profile, which only TensorRT models have (Triton refuses it "
                "for other platforms too); remove it"
            )
        if any(n < 0 for n in g.gpus):
            raise ModelConfigError(
                f"model '{cfg.name}': {which} lists gpus {gpus}; a GPU id is 0 or more (Triton refuses it too)"
            )


def settle_instance_kinds(cfg: mc.ModelConfig) -> mc.ModelConfig:
    """``cfg`` with each KIND_AUTO group given the kind it runs as, as Triton does: KIND_GPU when
    it lists gpus (they were ignored, and it ran on the CPU), else KIND_CPU (Triton picks the GPUs
    when the machine has some; here a group runs on a GPU only when its kind says KIND_GPU)."""
    if all(g.kind != mc.ModelInstanceGroup.KIND_AUTO for g in cfg.instance_group):
        return cfg
    cfg = _copy(cfg)
    for g in cfg.instance_group:
        if g.kind == mc.ModelInstanceGroup.KIND_AUTO:
            g.kind = mc.ModelInstanceGroup.KIND_GPU if len(g.gpus) else mc.ModelInstanceGroup.KIND_CPU
    return cfg


def _refuse_what_triton_refuses(cfg: mc.ModelConfig) -> None:
    """Tensor settings Triton refuses for every platform batchgate serves, refused the same way
    rather than read and then not acted on: a shape tensor (only Triton's TensorRT backend has
    them: its values, not its rows, would be merged into a batch) and an image format on a tensor
    of other than three dims."""
    for kind, entries in (("input", cfg.input), ("output", cfg.output)):
        for e in entries:
            if e.HasField("reshape"):
                problem = _reshape_problem(list(e.dims), list(e.reshape.shape), cfg.max_batch_size > 0)
                if problem:
                    raise ModelConfigError(f"model '{cfg.name}': config {kind} '{_said(e.name)}' has {problem}")
            if e.is_shape_tensor:
                raise ModelConfigError(
                    f"model '{cfg.name}': config {kind} '{e.name}' sets is_shape_tensor, which only TensorRT "
                    "models have (as Triton, batchgate refuses it for other platforms); remove it"
                )
            if kind == "input" and e.format != mc.ModelInput.FORMAT_NONE and len(e.dims) != 3:
                raise ModelConfigError(
                    f"model '{cfg.name}': config input '{e.name}' has format "
                    f"{mc.ModelInput.Format.Name(e.format)}, which needs 3 dims (as Triton requires), "
                    f"not {list(e.dims)}"
                )


def _reshape_problem(dims: list[int], shape: list[int], batched: bool) -> str:
    """What Triton refuses in a reshape ("" when it fits ``dims``): an empty one on a model that
    does not batch, a dimension below 1 but -1, and one that does not hold the elements of
    ``dims`` (the products between -1s must agree, so [2, 4, -1, 6] fits [8, -1, 6])."""
    if not shape:
        if not batched:
            return "an empty reshape; an empty reshape needs max_batch_size > 0 (the tensor would hold no data)"
        return "" if -1 not in dims and _product(dims) == 1 else f"dims {dims} and an empty reshape (for one element)"
    if any(d < 1 and d != -1 for d in shape):
        return f"reshape {shape}: its dimensions must be at least 1, or -1"

    def trunks(ds: list[int]) -> list[int]:
        out, n = [], 1
        for d in ds:
            if d == -1:
                out.append(n)
                n = 1
            else:
                n *= d
        return [*out, n]

    if trunks(dims) != trunks(shape):
        return f"dims {dims} and reshape {shape}, which do not hold the same number of elements"
    return ""


def _product(ds: list[int]) -> int:
    n = 1
    for d in ds:
        n *= d
    return n


def batch_doubts(inputs: list[IOInfo], outputs: list[IOInfo]) -> tuple[dict[str, str], list[str]]:
    """Whether each tensor's first dimension can be the batch, from the names an engine gives
    its dimensions (ONNX's symbolic dims). The inputs' first dimensions name the batch (each
    input its own name, as exporters often write them: a request's inputs share their batch size
    in any case); an output whose first dimension is named as another dimension of an input is not
    the batch (a transpose, a sum over the rows). Returns those outputs, each with why in words,
    and the outputs the names cannot tell about (unnamed, newly named, a rank of 0 or not
    known): a run at load tells those (see build.py)."""
    firsts: dict[str, str] = {}
    elsewhere: dict[str, str] = {}
    for t in inputs:
        names = t.dim_names
        if names and names[0]:
            firsts.setdefault(names[0], t.name)
        for k, n in enumerate(names[1:], 1):
            if n:
                elsewhere.setdefault(n, f"dimension {k} of input '{_said(t.name)}'")
    not_batch: dict[str, str] = {}
    unsure = []
    for t in outputs:
        first = t.dim_names[0] if t.dim_names else None
        if first in firsts:
            continue
        if first in elsewhere and t.shape[0] == -1:
            not_batch[t.name] = f"output '{_said(t.name)}' has first dimension '{_said(first)}', {elsewhere[first]}"
        elif not t.shape or t.shape[0] == -1:
            unsure.append(t.name)
    return not_batch, unsure


def _said(name: str | None) -> str:
    return printable(clip(name or ""))


def _check_dims(model: str, kind: str, entry, engine_dims: list[int]) -> None:
    """The config's dims (or its reshape: what the model sees) must fit the model's own shape:
    the same rank, and equal wherever the model's is fixed. A dimension the model leaves free
    (-1) takes any value, but a -1 in the config over a fixed one would be told to clients (the
    metadata) and then fail in the engine, as Triton refuses it."""
    dims = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
    fits = len(dims) == len(engine_dims) and all(a == b or b < 0 for a, b in zip(dims, engine_dims))
    if not fits:
        what = "reshape" if entry.HasField("reshape") else "dims"
        free = any(a < 0 <= b for a, b in zip(dims, engine_dims)) and len(dims) == len(engine_dims)
        raise ModelConfigError(
            f"model '{model}': config {kind} '{entry.name}' has {what} {dims} but the model's are {engine_dims}"
            " (without the batch dimension when max_batch_size > 0)"
            + ("; -1 fits only a dimension the model leaves free" if free else "")
        )


def _copy(cfg: mc.ModelConfig) -> mc.ModelConfig:
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    return out


def shared_dims(cfg: mc.ModelConfig, inputs: list[IOInfo]) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """The dynamic dimensions the engine names alike on several inputs, each with where they are
    in a request's shape (inputs the config reshapes are left out: their dims are the config's)."""
    served = {e.name for e in cfg.input if not e.HasField("reshape")}
    places: dict[str, list[tuple[str, int]]] = {}
    for t in inputs:
        if t.name in served:
            for k, (size, name) in enumerate(zip(t.shape, t.dim_names)):
                if name and size == -1 and not (k == 0 and cfg.max_batch_size > 0):  # (the batch: checked so)
                    places.setdefault(name, []).append((t.name, k))
    return tuple((name, tuple(at)) for name, at in places.items() if len({n for n, _ in at}) > 1)


def signature_of(cfg: mc.ModelConfig, shared: tuple = (), local: bool = False) -> ModelSignature:
    def spec(entry, output: bool) -> TensorSpec:
        name = mc.DataType.Name(entry.data_type)
        dt = BY_CONFIG.get(name)
        if dt is None:
            raise ModelConfigError(f"model '{cfg.name}': tensor '{entry.name}' has unsupported type {name}")
        dims = tuple(int(d) for d in entry.dims)
        return TensorSpec(entry.name, dt, dims, optional=(not output and entry.optional))

    return ModelSignature(
        name=cfg.name,
        platform=cfg.platform or cfg.backend,
        max_batch_size=int(cfg.max_batch_size),
        inputs=tuple(spec(i, False) for i in cfg.input),
        outputs=tuple(spec(o, True) for o in cfg.output),
        # Only a remote model can get here without both (a local engine's file declares them):
        # its upstream declares no signature, and checks requests itself.
        open=not cfg.input or not cfg.output,
        shared_dims=shared,
        local=local,
    )


def instances_of(cfg: mc.ModelConfig) -> int:
    """Executions of the version that may run at once: the instance groups' counts."""
    return max(1, sum(g.count or 1 for g in cfg.instance_group) or 1)


def queue_bound(cfg: mc.ModelConfig, default: int) -> int:
    """Requests that may wait: the config's queue policy, else the gateway's setting."""
    return cfg.dynamic_batching.default_queue_policy.max_queue_size or default


def schedule_of(cfg: mc.ModelConfig, max_queue_size: int, policy: str) -> BatcherConfig | None:
    """The dynamic batcher's settings from ``dynamic_batching``, or None when the model does
    not batch (no ``dynamic_batching`` or ``max_batch_size`` 0): each request runs alone."""
    if not (cfg.HasField("dynamic_batching") and cfg.max_batch_size > 0):
        return None
    db = cfg.dynamic_batching
    qp = db.default_queue_policy
    if db.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US:
        raise ValueError(
            f"dynamic_batching: max_queue_delay_microseconds is {db.max_queue_delay_microseconds}; at most "
            f"{MAX_QUEUE_DELAY_US} (an hour): how long a batch may wait for requests to join it"
        )
    return BatcherConfig(
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        instances=instances_of(cfg),
        max_queue_size=queue_bound(cfg, max_queue_size),
        priority_levels=db.priority_levels,
        default_priority_level=db.default_priority_level,
        default_timeout_s=qp.default_timeout_microseconds / 1e6,
        timeout_action_delay=qp.timeout_action == mc.ModelQueuePolicy.DELAY,
        preserve_ordering=db.preserve_ordering,
        policy=policy,
        level_policies=tuple(
            (level, QueuePolicy(p.max_queue_size, p.default_timeout_microseconds / 1e6, p.timeout_action == p.DELAY))
            for level, p in sorted(db.priority_queue_policy.items())
        ),
    )


_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def config_to_json(cfg: mc.ModelConfig) -> dict[str, Any]:
    """The config as Triton's HTTP ``/config`` shows it: proto field names, every field,
    64-bit integers as JSON numbers (protobuf's JSON writes them as strings)."""
    d = json_format.MessageToDict(cfg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(d, cfg.DESCRIPTOR)


def _numbers(d: dict, desc) -> dict:
    """Turn the 64-bit integer fields of ``desc`` (and of its sub-messages) into ints."""
    for f in desc.fields:
        if f.name not in d:
            continue
        v = d[f.name]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                d[f.name] = {k: _numbers(x, value_field.message_type) for k, x in v.items()}
            elif value_field.type in _INT64_TYPES:
                d[f.name] = {k: int(x) for k, x in v.items()}
        elif f.message_type is not None:
            d[f.name] = [_numbers(x, f.message_type) for x in v] if isinstance(v, list) else _numbers(v, f.message_type)
        elif f.type in _INT64_TYPES:
            d[f.name] = [int(x) for x in v] if isinstance(v, list) else int(v)
    return d
