"""TorchScript backend (Triton's ``pytorch_libtorch`` platform, ``backend: "pytorch"``).

torch is an optional extra (``pip install 'batchgate[torch]'``) and is imported only when a
model of this platform loads; without it the load fails with that instruction, and every
other model serves as usual.

A TorchScript file does not carry a signature the gateway can read, so the model's
``config.pbtxt`` must declare its inputs and outputs (name, data_type, dims). How config
tensors meet ``forward()``:

- inputs, the first rule that fits:
  1. every input name is a ``forward()`` argument name: passed by keyword;
  2. every input name ends in ``__<n>`` (``INPUT__0``, ``INPUT__1``...) with n running 0..k-1:
     argument n, whatever the order of the config;
  3. otherwise: positionally, in the order the config lists them.
- outputs: every name ends in ``__<n>`` (distinct n): element n of the returned tuple;
  otherwise the config order. A single returned tensor is element 0.

One scripted module per model version, shared by its instances (inference on a TorchScript
module does not change it, so concurrent ``forward()`` calls are safe). ``instance_group {
kind: KIND_GPU }`` loads it on CUDA (``gpus`` picks the device) when torch sees one; without
CUDA it serves on the CPU with a warning, as the ONNX Runtime backend does.

Threads: torch's intra-op thread count is a process setting, not a model's. The first
TorchScript model loaded sets it: to its ``intra_op_thread_count`` parameter (Triton's
``INTRA_OP_THREAD_COUNT`` works too) if given, else, as the ONNX Runtime backend does per
session, to the cores this process may run on (not every core of the machine). A later model
asking for another count is logged and served with the one set.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import warnings
from typing import Any, ClassVar

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from .. import cores
from ..core.errors import ModelConfigError
from ..core.types import BY_CONFIG, clip
from .base import IOInfo, Kind, LocalOptions, register_local, thread_counts

log = logging.getLogger("batchgate.torch")

PLATFORM = "pytorch_libtorch"
EXTRA = "pip install 'batchgate[torch]'"

# V2 datatype -> torch dtype attribute. BYTES has no tensor in torch, and torch's unsigned types
# beyond uint8 lack most operators, so models cannot be declared with them.
_TORCH_DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_INDEXED = re.compile(r".+__(\d+)")
_threads_lock = threading.Lock()  # models load on several threads at once


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ModelConfigError(f"platform {PLATFORM} needs the torch extra: {EXTRA}") from None
    except Exception as e:  # noqa: BLE001 - a broken install raises OSError and others
        raise ModelConfigError(f"platform {PLATFORM}: torch failed to import ({type(e).__name__}: {e})") from None
    return torch


def _summary(e: BaseException) -> str:
    """torch's error in one line: the TorchScript interpreter prefixes the real error with a
    traceback naming the model author's source files; keep the error itself."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return clip(lines[-1] if "TorchScript" in lines[0] else lines[0], 400)


def _indices(names: list[str]) -> list[int] | None:
    """The ``__<n>`` suffixes of every name, or None if one has none."""
    found = [_INDEXED.fullmatch(n) for n in names]
    if not names or any(m is None for m in found):
        return None
    return [int(m.group(1)) for m in found if m is not None]


def _declared(cfg: mc.ModelConfig) -> tuple[list[IOInfo], list[IOInfo]]:
    """The config's inputs and outputs, checked for what this backend can serve."""
    if not cfg.input or not cfg.output:
        missing = "inputs and outputs" if not cfg.input and not cfg.output else "inputs" if not cfg.input else "outputs"
        raise ModelConfigError(
            f"a TorchScript model needs config.pbtxt with its inputs and outputs (name, data_type, dims), which "
            f"a TorchScript file does not declare; the config has no {missing}"
        )
    batched = cfg.max_batch_size > 0
    out: tuple[list[IOInfo], list[IOInfo]] = ([], [])
    for kind, entries, into in (("input", cfg.input, out[0]), ("output", cfg.output, out[1])):
        for e in entries:
            if e.data_type == mc.TYPE_INVALID:
                raise ModelConfigError(f"{kind} '{e.name}' needs a data_type (TorchScript does not declare one)")
            type_name = mc.DataType.Name(e.data_type)
            dt = BY_CONFIG.get(type_name)
            if dt is None or dt.v2 not in _TORCH_DTYPES:
                raise ModelConfigError(
                    f"{kind} '{e.name}' is {type_name}, which the TorchScript backend cannot serve; it serves "
                    + ", ".join(f"TYPE_{t}" for t in _TORCH_DTYPES)
                )
            if kind == "input" and e.optional:
                raise ModelConfigError(f"input '{e.name}' is optional, which the TorchScript backend does not support")
            # With a reshape, the model's own shape is reshape.shape; callers keep the config's dims
            # (base.Reshaped converts between the two around each run).
            dims = tuple(int(d) for d in (e.reshape.shape if e.HasField("reshape") else e.dims))
            into.append(IOInfo(e.name, dt.v2, ((-1,) if batched else ()) + dims))
    return out


Argument = tuple[str, bool, str]  # a forward() argument: name, has a default, TorchScript type
_TENSOR_TYPES = ("Tensor", "Optional[Tensor]")


def _forward_arguments(module: Any) -> list[Argument] | None:
    """``forward()``'s arguments after ``self``; None if unknown."""
    try:
        args = module.forward.schema.arguments
    except Exception:  # noqa: BLE001 - not every module type exposes a schema
        return None
    return [(a.name, a.has_default_value(), str(a.type)) for a in args[1:]]


def _tensors_only(forward: list[Argument], fed: list[str]) -> None:
    """Each config input is one tensor: an argument that gets one, or that has no default, must
    take a tensor (not, say, a ``Dict[str, Tensor]`` of every input)."""
    for name, has_default, kind in forward:
        if kind not in _TENSOR_TYPES and (name in fed or not has_default):
            raise ModelConfigError(
                f"forward() argument '{name}' is {kind}; the TorchScript backend passes each config input "
                "as a Tensor argument of its own, so forward() must take tensors"
            )


def _bind_inputs(names: list[str], forward: list[Argument] | None) -> tuple[str, list[str]]:
    """How inputs reach ``forward()``: ("keyword", names) or ("position", names in argument order)."""
    if forward is not None:
        arg_names = [a for a, _, _ in forward]
        if set(names) <= set(arg_names):
            _tensors_only(forward, names)
            needed = [a for a, has_default, _ in forward if not has_default and a not in names]
            if needed:
                raise ModelConfigError(
                    f"forward() needs argument {', '.join(repr(a) for a in needed)}, which the config does not declare"
                )
            return "keyword", names
        _tensors_only(forward, arg_names[: len(names)])
    order = list(names)
    idx = _indices(names)
    if idx is not None:
        if sorted(idx) != list(range(len(names))):
            raise ModelConfigError(
                "inputs named <name>__<n> bind to forward() argument n, so n must run 0.."
                f"{len(names) - 1} once each; the config has {', '.join(names)}"
            )
        order = [n for _, n in sorted(zip(idx, names))]
    if forward is not None:
        required = sum(1 for _, has_default, _ in forward if not has_default)
        if not required <= len(order) <= len(forward):
            raise ModelConfigError(
                f"forward() takes {required}"
                + (f" to {len(forward)}" if len(forward) != required else "")
                + f" arguments but the config declares {len(order)} inputs"
            )
    return "position", order


def _bind_outputs(names: list[str]) -> tuple[dict[str, int], bool]:
    """Each output's element of the returned tuple, and whether the config order decides."""
    idx = _indices(names)
    if idx is not None and len(set(idx)) == len(idx):
        return dict(zip(names, idx)), False
    return {n: i for i, n in enumerate(names)}, True


def _threads(cfg: mc.ModelConfig) -> tuple[int, int]:
    return thread_counts({k.lower(): v.string_value for k, v in cfg.parameters.items()})


@register_local(PLATFORM, "pytorch")
class TorchScriptBackend:
    platform: ClassVar[str] = PLATFORM
    kind: ClassVar[Kind] = "local"
    engine: ClassVar[str] = "TorchScript"  # named in load errors
    default_model_filename: ClassVar[str] = "model.pt"

    @classmethod
    def load(cls, path: str, config: mc.ModelConfig, options: LocalOptions) -> TorchScriptBackend:
        """Check the config, import torch, open ``path`` on the device the config asks for."""
        inputs, outputs = _declared(config)  # before torch: a config error needs no torch to be told
        intra, inter = _threads(config)
        torch = _import_torch()
        device = "cpu"
        if any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group):
            gpus = [g for grp in config.instance_group for g in grp.gpus]
            gpu = gpus[0] if gpus else options.gpu_device_id
            if torch.cuda.is_available():
                if gpu >= torch.cuda.device_count():
                    raise ModelConfigError(
                        f"instance_group asks for GPU {gpu}, but torch sees {torch.cuda.device_count()} GPU(s)"
                    )
                device = f"cuda:{gpu}"
            else:
                log.warning("model '%s' asks for a GPU but torch has no CUDA here; serving on CPU", config.name)
        _set_threads(torch, intra or cores.share(), inter, asked=intra > 0)
        return cls(torch, path, device, inputs, outputs)

    def __init__(self, torch: Any, path: str, device: str, inputs: list[IOInfo], outputs: list[IOInfo]):
        self._torch = torch
        self._device = torch.device(device)
        with warnings.catch_warnings():
            # torch 2.13 marks torch.jit.load deprecated (in favour of torch.export); it still loads.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            module = torch.jit.load(path, map_location=self._device)
        module.eval()
        self.module: Any = module
        self._inputs = inputs
        self._outputs = outputs
        self._dtypes = {t.name: getattr(torch, _TORCH_DTYPES[t.v2_datatype]) for t in inputs + outputs}
        self._types = {t.name: f"TYPE_{t.v2_datatype}" for t in outputs}  # as config.pbtxt spells them
        rule, self._input_order = _bind_inputs([t.name for t in inputs], _forward_arguments(module))
        self._by_keyword = rule == "keyword"
        self._element, self._config_order = _bind_outputs([t.name for t in outputs])

    def providers(self) -> list[str]:
        return [str(self._device)]

    def ready(self) -> bool:
        return self.module is not None

    def not_ready_reason(self) -> str:
        return "" if self.module is not None else "closed"

    def inputs(self) -> list[IOInfo]:
        return self._inputs

    def outputs(self) -> list[IOInfo]:
        return self._outputs

    def run(self, feeds: dict[str, np.ndarray], output_names: tuple[str, ...]) -> list[np.ndarray]:
        torch = self._torch
        tensors = {name: self._tensor(feeds[name]) for name in self._input_order}
        try:
            with torch.inference_mode():
                if self._by_keyword:
                    result = self.module(**tensors)
                else:
                    result = self.module(*tensors.values())
        except Exception as e:  # noqa: BLE001 - torch's errors carry a traceback of the model's source
            if "Expected a value of type" in str(e):  # forward() takes other arguments than the config gives
                raise _Mismatch(_summary(e)) from None
            raise RuntimeError(_summary(e)) from None
        if isinstance(result, dict):
            raise _Mismatch(
                "forward() returned a dict, which the TorchScript backend does not support: "
                "forward() must return a tensor or a tuple/list of tensors"
            )
        returned = list(result) if isinstance(result, (tuple, list)) else [result]
        if self._config_order and len(returned) != len(self._outputs):
            raise _Mismatch(
                f"forward() returned {len(returned)} value(s) but the config declares {len(self._outputs)} output(s)"
            )
        out = []
        for name in output_names:
            i = self._element[name]
            if i >= len(returned):
                raise _Mismatch(f"output '{name}' is element {i} of forward()'s result, which has {len(returned)}")
            t = returned[i]
            if not isinstance(t, torch.Tensor):
                raise _Mismatch(f"output '{name}': forward() returned {type(t).__name__}, not a tensor")
            if t.dtype != self._dtypes[name]:
                raise _Mismatch(
                    f"output '{name}' comes out as {str(t.dtype).removeprefix('torch.')} but the config declares "
                    f"{self._types[name]}"
                )
            out.append(t.contiguous().cpu().numpy())
        return out

    def _tensor(self, arr: np.ndarray) -> Any:
        # torch shares the array's memory; a read-only buffer (a request's bytes) or a strided
        # view is copied first, since torch cannot take either as it is.
        if not (arr.flags.writeable and arr.flags.c_contiguous):
            arr = np.array(arr, order="C", copy=True)
        t = self._torch.from_numpy(arr)
        return t if self._device.type == "cpu" else t.to(self._device)

    def warm_up(self, batch: int = 0, free: int = 1) -> list[np.ndarray]:
        """Run twice on zeros (dynamic dims as ``free``, the first as ``batch`` when given): the
        first call profiles, the second builds the optimized graph, so no caller pays for either;
        a config the model does not match fails here."""
        feeds = {}
        for i in self._inputs:
            shape = tuple(d if d > 0 else free for d in i.shape)
            if batch > 0 and shape:
                shape = (batch, *shape[1:])
            feeds[i.name] = np.zeros(shape, dtype=np.dtype(_TORCH_DTYPES[i.v2_datatype]))
        names = tuple(o.name for o in self._outputs)
        try:
            for _ in range(2):
                outs = self.run(feeds, names)
        except _Mismatch as e:  # the config does not match what the model gives: it cannot serve
            raise ModelConfigError(f"the warm-up run on zeros failed: {e}") from None
        # (any other failure: zeros that do not fit the model, which still serves; see build.py)
        return outs

    async def close(self) -> None:
        # On a thread: a run may still hold the module if the retire grace period ran out.
        await asyncio.to_thread(self._drop)

    def _drop(self) -> None:
        self.module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()


_threads_set: list[int] = []  # the intra-op thread count torch was given, once set


def _set_threads(torch: Any, intra: int, inter: int, asked: bool) -> None:
    """Size torch's thread pools, which are per process: the first TorchScript model loaded
    sizes the intra-op pool (each thread that runs torch takes the count when it first does, so
    a later change would reach only some of them); a later model that asks for another count is
    told in the log. The inter-op pool can be sized only before torch first uses it."""
    with _threads_lock:
        if not _threads_set:
            torch.set_num_threads(intra)
            _threads_set.append(intra)
        elif asked and intra != _threads_set[0]:
            log.warning(
                "intra_op_thread_count %d not applied: torch's intra-op threads are a process setting, already %d",
                intra,
                _threads_set[0],
            )
        if inter and torch.get_num_interop_threads() != inter:
            try:
                torch.set_num_interop_threads(inter)
            except RuntimeError:
                log.warning(
                    "inter_op_thread_count %d not applied: torch's inter-op pool already runs with %d threads",
                    inter,
                    torch.get_num_interop_threads(),
                )


class _Mismatch(RuntimeError):
    """What the model gave does not match its config (outputs' count, position or data type)."""
