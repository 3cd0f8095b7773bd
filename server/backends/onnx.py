"""ONNX Runtime backend.

One ``InferenceSession`` per model version; ``instance_group`` count bounds how
many ``run`` calls may execute at once (ONNX Runtime sessions are thread-safe,
so the instances share one copy of the weights). Execution providers come from
the model config: ``instance_group { kind: KIND_GPU }`` asks for CUDA, and
``optimization { execution_accelerators { gpu_execution_accelerator [{name:
"tensorrt"}] } }`` asks for TensorRT in front of it; a provider this machine does
not have is skipped with a warning and the CPU serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument
from tritonclient.grpc import model_config_pb2 as mc

from .. import cores
from ..core.errors import ModelConfigError, ModelRefused, engine_message, invalid
from ..core.types import BY_ONNX, DATATYPES, clip, printable
from .base import IOInfo, Kind, LocalOptions, register_local, thread_counts
from .onnx_rows import value_shaped_outputs
from .onnx_zipmap import open_session

log = logging.getLogger("batchgate.onnx")

PLATFORM = "onnxruntime_onnx"


def choose_providers(want_gpu: bool, want_tensorrt: bool, device_id: int = 0, model: str = "") -> list:
    """ONNX Runtime's providers for what the config asks; one it lacks is skipped with a warning
    naming ``model``."""
    said = f"model '{printable(clip(model))}': " if model else ""
    available = set(ort.get_available_providers())
    chosen: list = []
    if want_tensorrt:
        if "TensorrtExecutionProvider" in available:
            chosen.append(("TensorrtExecutionProvider", {"device_id": device_id}))
        else:
            log.warning("%sTensorRT execution provider requested but not available here", said)
    if want_gpu or want_tensorrt:
        if "CUDAExecutionProvider" in available:
            chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
        else:
            log.warning("%sCUDA execution provider requested but not available; serving on CPU", said)
    chosen.append("CPUExecutionProvider")
    return chosen


def _shape(dims) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def _io(arg) -> IOInfo:
    dt = BY_ONNX.get(arg.type)
    if dt is None:
        raise invalid(f"tensor '{arg.name}' has ONNX type {arg.type}, which batchgate cannot serve")
    dims = arg.shape or ()  # (ONNX Runtime gives [] for a rank it cannot tell, as for a scalar: see _unranked)
    names = tuple(d if isinstance(d, str) and d else None for d in dims)
    return IOInfo(arg.name, dt.v2, _shape(dims), names)


def _unranked_names(source: str | bytes) -> frozenset[str]:
    """The graph inputs and outputs of the model at ``source`` (a path, or the file's bytes) whose
    tensor type has no shape: their rank is not declared."""
    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
    g = model.graph
    return frozenset(
        v.name
        for v in (*g.input, *g.output)
        if v.type.WhichOneof("value") == "tensor_type" and not v.type.tensor_type.HasField("shape")
    )


def _served_shape(entry, batch: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape the model sees of a config input or output (its reshape, else its dims, after
    ``batch``); None when the entry gives no dims."""
    if entry.HasField("reshape"):
        return batch + tuple(int(d) for d in entry.reshape.shape)
    return batch + tuple(int(d) for d in entry.dims) if len(entry.dims) else None


def _io_or_none(arg) -> IOInfo | None:
    return _io(arg) if arg.type in BY_ONNX else None


@register_local(PLATFORM, "onnxruntime")
class OnnxBackend:
    platform: ClassVar[str] = PLATFORM
    kind: ClassVar[Kind] = "local"
    engine: ClassVar[str] = "ONNX Runtime"  # named in load errors

    @classmethod
    def load(cls, path: str, config: mc.ModelConfig, options: LocalOptions) -> OnnxBackend:
        """Open ``path`` with the execution providers and thread counts ``config`` asks for."""
        want_gpu = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator
        want_trt = any(a.name.lower() == "tensorrt" for a in accel)
        gpus = [g for grp in config.instance_group for g in grp.gpus]
        providers = choose_providers(want_gpu, want_trt, gpus[0] if gpus else options.gpu_device_id, config.name)
        params = {k: v.string_value for k, v in config.parameters.items()}
        intra, inter = thread_counts(params)
        spinning = params.get("allow_spinning", "false").strip().lower()
        if spinning not in ("true", "false", "1", "0"):
            raise ModelConfigError("allow_spinning must be true or false")
        backend = cls(path, providers, intra, inter, spinning in ("true", "1"))
        backend._settle_from_config(config)
        return backend

    def __init__(
        self,
        path: str,
        providers: list | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        allow_spinning: bool = False,
        content: bytes | None = None,
    ):
        """``content``: the bytes of the file at ``path`` as it was when first opened (a twin's)."""
        so = ort.SessionOptions()
        # By default ONNX Runtime starts one thread per physical core, whatever cores this
        # process may use, and lets them spin between runs: they would take the cores the
        # event loop needs (a server pinned to one core ran on two). So: as many threads as
        # the cores this process may run on, and no spinning unless the model asks for it.
        so.intra_op_num_threads = intra_op_threads or cores.share()
        if not allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if inter_op_threads:
            so.inter_op_num_threads = inter_op_threads
        so.log_severity_level = 3
        self.path = path
        self._providers = providers
        # The file stays open: a twin opened later (a shadow's session) is the model this session
        # serves, even once the path is gone (the private directory of a model uploaded with its
        # load) or names another file (a new model copied in ahead of its reload).
        self._file = -1
        if content is None:
            self._file = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._close_file = weakref.finalize(self, os.close, self._file) if self._file >= 0 else None
        # (a classifier's ZipMap output is served as a tensor: onnx_zipmap.py)
        shown_as = "/".join(os.path.normpath(path).split(os.sep)[-3:])
        self.session = open_session(
            path if content is None else content,
            shown_as,
            sess_options=so,
            providers=providers or ["CPUExecutionProvider"],
        )
        self._inputs = [_io(a) for a in self.session.get_inputs()]
        self._outputs = [_io(a) for a in self.session.get_outputs()]
        # ONNX Runtime gives [] both for a scalar and for a tensor whose type has no shape at all
        # (its rank not declared, so it takes any): the file tells the two apart.
        self._unranked: frozenset[str] = frozenset()
        self._warm_shapes: dict[str, tuple[int, ...]] = {}  # input -> the shape runs on zeros take (config's sizes)
        if any(not t.shape for t in self._inputs + self._outputs):
            self._unranked = _unranked_names(path if content is None else content)
        # (one of a type batchgate cannot serve is left out: only a config that names it needs it)
        self._overridable = [i for i in map(_io_or_none, self.session.get_overridable_initializers()) if i]
        self._string_inputs = {i.name for i in self._inputs + self._overridable if i.v2_datatype == "BYTES"}
        # The session's own binding, without the Python wrapper's per-call checks (which
        # the gateway has already made against the model's signature); the public method
        # where a future onnxruntime moves it.
        sess = getattr(self.session, "_sess", None)
        options = ort.RunOptions()
        # A run's failure is the caller's answer and one bounded line of ours (execution.py); ONNX
        # Runtime's own error line on stderr would be one more per failed run, unbounded and
        # outside the log's format (a client whose values fail a model could flood it).
        options.log_severity_level = 4
        if sess is not None:
            self._run = lambda names, feeds: sess.run(names, feeds, options)
        else:
            session = self.session
            self._run = lambda names, feeds: session.run(names, feeds, options)

    def twin(self) -> OnnxBackend:
        """A second session on the same file with one intra-op thread and no spinning, for
        shadow copies: they run on threads of their own and must not take the primary's
        cores (blocking: call it on a thread)."""
        twin = OnnxBackend(self.path, self._providers, 1, 1, False, self._content())
        twin._inputs, twin._outputs = self._inputs, self._outputs  # (as settled from the config)
        twin._warm_shapes = self._warm_shapes
        return twin

    def _settle_from_config(self, config: mc.ModelConfig) -> None:
        """What the config says of the tensors' shapes beyond the file. (1) The shape of each tensor
        whose rank the file does not declare, from the config's dims (or reshape: what the model
        sees), as a TorchScript model's come from its config. Read as the scalar ONNX Runtime
        reports, such an input refused every request but a scalar, and a warm-up fed it one (a
        batching config then failed its load, the output having no rows). An input the config does
        not give fails the load, saying so; an output it does not give is left to what the runs
        give. (2) The sizes the config fixes where the file leaves a dimension free, for the runs
        on zeros at load: a convolution exported with free height and width but served at 224 x 224
        fails on 1 x 1 (the warm-up was lost, with a warning at every load)."""
        batch: tuple[int, ...] = (-1,) if config.max_batch_size > 0 else ()
        for kind, infos, entries in (("input", self._inputs, config.input), ("output", self._outputs, config.output)):
            given = {e.name: e for e in entries}
            for k, t in enumerate(infos):
                e = given.get(t.name)
                served = _served_shape(e, batch) if e is not None else None
                if t.name in self._unranked:
                    if served is not None:
                        infos[k] = IOInfo(t.name, t.v2_datatype, served)
                    elif kind == "input":
                        raise ModelConfigError(
                            f"input '{printable(clip(t.name))}' has no shape in the ONNX file (its rank is not "
                            "declared), so the config must give its dims: list it in config.pbtxt with them"
                        )
                elif kind == "input" and served is not None and len(served) == len(t.shape):
                    self._warm_shapes[t.name] = tuple(m if m >= 0 else c for m, c in zip(t.shape, served))

    def _content(self) -> bytes | None:
        """None while ``path`` still names the file this session was opened from (an ONNX file may
        name external data beside it), else that file's bytes, read through the descriptor kept."""
        try:
            if os.path.samestat(os.fstat(self._file), os.stat(self.path)):
                return None
        except OSError:  # (the path is gone)
            pass
        size, data = os.fstat(self._file).st_size, bytearray()
        while len(data) < size:
            chunk = os.pread(self._file, size - len(data), len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def providers(self) -> list[str]:
        return self.session.get_providers()

    def value_shaped_outputs(self, names: list[str]) -> dict[str, str]:
        """Those of the outputs ``names`` whose rows may follow the input values (onnx_rows.py),
        each with the op that makes it so (blocking: reads the file's graph)."""
        return value_shaped_outputs(onnx.load(self.path, load_external_data=False), names)

    def ready(self) -> bool:
        return self.session is not None

    def not_ready_reason(self) -> str:
        return "" if self.session is not None else "closed"

    def inputs(self) -> list[IOInfo]:
        return self._inputs

    def outputs(self) -> list[IOInfo]:
        return self._outputs

    def overridable_inputs(self) -> list[IOInfo]:
        """The initializers that the graph also lists among its inputs (ONNX IR >= 4 allows it;
        older files list every initializer so): a run may be given one to replace the model's
        value. Not among ``inputs()``, as Triton's ONNX Runtime backend leaves them out of a
        completed config; a config that lists one (``optional: true``) serves it."""
        return self._overridable

    def run(self, feeds: dict[str, np.ndarray], output_names: tuple[str, ...]) -> list[np.ndarray]:
        if self._string_inputs:
            feeds = dict(feeds)
            for name in self._string_inputs:
                if name in feeds:
                    feeds[name] = _as_str_array(name, feeds[name])
        try:
            return self._run(list(output_names), feeds)
        except OrtInvalidArgument as e:
            # The gateway has checked names, datatypes and shapes against the signature: what ONNX
            # Runtime still calls an invalid argument is in the values (an index past a table, a
            # shape read from an input). The caller's mistake, answered 400 / INVALID_ARGUMENT
            # with the engine's words; a batch that fails so runs again request by request
            # (execution.py), so only that caller gets it.
            raise ModelRefused(f"the model cannot take these values: {engine_message(e)}") from None

    def warm_up(self, batch: int = 0, free: int = 1) -> list[np.ndarray]:
        """Run once on zeros (dynamic dims as ``free``, the first as ``batch`` when given) so
        the first caller does not pay for it."""
        feeds = {}
        for i in self._inputs:
            shape = tuple(d if d >= 0 else free for d in self._warm_shapes.get(i.name, i.shape))  # (a fixed 0 stays 0)
            if batch > 0 and shape:
                shape = (batch, *shape[1:])
            if i.v2_datatype == "BYTES":
                feeds[i.name] = np.full(shape, "", dtype=object)
            else:
                feeds[i.name] = np.zeros(shape, dtype=DATATYPES[i.v2_datatype].np_dtype)
        return self._run([o.name for o in self._outputs], feeds)

    async def close(self) -> None:
        # On a thread: a run may still hold the session if the retire grace period ran out.
        await asyncio.to_thread(self._drop)

    def _drop(self) -> None:
        if self._close_file is not None:
            self._close_file()
        self.session = None
        self._run = None  # type: ignore[assignment]  # released on close; never called after it


def _as_str_array(name: str, arr: np.ndarray) -> np.ndarray:
    """ONNX Runtime string tensors hold text: BYTES elements must be UTF-8."""
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat_in):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(
                    f"input '{name}': element {i} is not UTF-8 text, which the ONNX model's string tensor requires"
                ) from None
        flat_out[i] = v if isinstance(v, str) else str(v)
    return out
