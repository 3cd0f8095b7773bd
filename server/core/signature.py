"""What a model accepts and returns, and the checks of a request against it.

Pure: built from a model config by ``repository/``, used by ``ModelVersion.submit``
before a request is queued, so a malformed request never reaches a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .errors import invalid
from .types import DataType, InferRequest, Tensor, clip


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: DataType
    dims: tuple[int, ...]  # without the batch dimension; -1 = any size
    optional: bool = False

    def full_shape(self, max_batch_size: int) -> list[int]:
        return ([-1] if max_batch_size > 0 else []) + list(self.dims)


class Checked(NamedTuple):
    """A request that passed validation: what the backend needs to run it. (A named tuple:
    one is built per request, several times faster than a frozen dataclass.)"""

    feeds: dict[str, np.ndarray]
    output_names: tuple[str, ...]  # () only for an open signature: every output the model gives
    batch_size: int  # rows (1 when the model does not batch)
    # What requests must share to share a batch, when the signature cannot say it (an open
    # signature): None = the batcher's own rule (input names, datatypes, non-batch shapes).
    group: object = None


@dataclass(frozen=True)
class ModelSignature:
    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # No declared tensors (an upstream whose metadata lists none, like MLServer's default
    # model settings): requests are forwarded unchecked and the upstream validates them.
    open: bool = False
    # Dimensions the model names alike on several inputs (ONNX's symbolic dims: a sequence
    # length on input_ids and attention_mask): (name, ((input, axis of the request's shape), ...)).
    # A request must give them one size: the engine would fail on it inside the graph.
    shared_dims: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    # Run by an engine here (not forwarded to an upstream, which may apply MLServer's codecs):
    # an input asking for a codec that changes its bytes (base64) is refused, never ignored.
    local: bool = False
    # Derived in __post_init__ (the instance is frozen, so through object.__setattr__).
    _in: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _out: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _all_out: tuple[str, ...] = field(init=False, repr=False, compare=False)
    output_types: dict[str, str] = field(init=False, repr=False, compare=False)  # output name -> V2 datatype
    _layouts: dict[tuple[tuple[str, str, tuple[int, ...]], ...], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_in", {t.name: t for t in self.inputs})
        object.__setattr__(self, "_out", {t.name: t for t in self.outputs})
        object.__setattr__(self, "_all_out", tuple(t.name for t in self.outputs))
        object.__setattr__(self, "output_types", {t.name: t.dtype.v2 for t in self.outputs})
        object.__setattr__(self, "_layouts", {})  # input layout -> batch size, for layouts that passed

    def check(self, request: InferRequest) -> Checked:
        """Check ``request`` against the signature; raise INVALID_ARGUMENT naming what is wrong.

        The verdict on a layout of inputs (names, datatypes, shapes) is remembered, so a
        stream of same-shaped requests pays for one dictionary lookup."""
        if self.open:
            return self._check_open(request)
        inputs = request.inputs
        if self.local:
            _refuse_codecs(inputs)
        layout = tuple([(t.name, t.datatype, t.shape) for t in inputs])
        batch = self._layouts.get(layout)
        if batch is not None and request.outputs is None:
            return Checked({t.name: t.data for t in inputs}, self._all_out, batch)
        checked = self._check(request)
        if len(self._layouts) < 256:
            self._layouts[layout] = checked.batch_size
        return checked

    def precheck(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """One input's name, datatype and shape, before its values are read: a large body
        whose shape the model refuses is not decoded (transport/http_app.py). The checks are
        :meth:`check`'s, with the same words."""
        if not self.open:
            self._check_input(name, datatype, shape, -1)

    def _check_input(self, name: str, datatype: str, shape: tuple[int, ...], batch: int) -> int:
        """Raise for an input the signature refuses; the batch size, given the others' so far."""
        where = f"model '{self.name}'"
        spec = self._in.get(name)
        if spec is None:
            raise invalid(f"{where} has no input '{clip(name)}'; its inputs are {', '.join(repr(s) for s in self._in)}")
        if datatype != spec.dtype.v2:
            raise invalid(f"input '{clip(name)}' has datatype {datatype}, but {where} expects {spec.dtype.v2}")
        dims = spec.dims
        if self.max_batch_size > 0:
            if len(shape) != len(dims) + 1:
                raise invalid(
                    f"input '{clip(name)}' has shape {list(shape)}, but {where} expects "
                    f"{spec.full_shape(self.max_batch_size)} (batch dimension first)"
                )
            b = shape[0]
            if b < 1 or b > self.max_batch_size:
                raise invalid(
                    f"input '{clip(name)}': batch size {b} must be between 1 and {self.max_batch_size} for {where}"
                )
            if batch == -1:
                batch = b
            elif b != batch:
                raise invalid(
                    f"input '{clip(name)}' has batch size {b}, but another input has {batch}; "
                    "all inputs must share the batch dimension"
                )
            rest = shape[1:]
        else:
            rest = shape
            if len(shape) != len(dims):
                raise invalid(f"input '{clip(name)}' has shape {list(shape)}, but {where} expects {list(dims)}")
        for have, want in zip(rest, dims):
            if want != -1 and have != want:
                raise invalid(
                    f"input '{clip(name)}' has shape {list(shape)}, but {where} expects "
                    f"{spec.full_shape(self.max_batch_size)}"
                )
        return batch

    def _check(self, request: InferRequest) -> Checked:
        where = f"model '{self.name}'"
        feeds: dict[str, np.ndarray] = {}
        batch = -1
        for t in request.inputs:
            if t.name in feeds:
                raise invalid(f"input '{clip(t.name)}' appears more than once")
            batch = self._check_input(t.name, t.datatype, t.shape, batch)
            feeds[t.name] = t.data
        missing = [s.name for s in self.inputs if s.name not in feeds and not s.optional]
        if missing:
            raise invalid(
                f"{where} needs input{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)}, which the request does not give"
            )
        for dim, places in self.shared_dims:
            sizes = [(n, k, feeds[n].shape[k]) for n, k in places if n in feeds and feeds[n].ndim > k]
            if len({size for _, _, size in sizes}) > 1:
                (a, i, x), (b, j, y) = sizes[0], next(t for t in sizes if t[2] != sizes[0][2])
                raise invalid(
                    f"inputs '{a}' and '{b}' must have the same size in dimension '{clip(dim)}' ({where} names "
                    f"both so): '{a}' has {x} at dimension {i}, '{b}' has {y} at dimension {j}"
                )
        if request.outputs is None:
            names = self._all_out
        else:
            picked = []
            for name in request.outputs:
                if name not in self._out:
                    raise invalid(
                        f"{where} has no output '{clip(name)}'; its outputs are {', '.join(repr(s) for s in self._out)}"
                    )
                picked.append(name)
            names = tuple(picked)
        return Checked(feeds, names, batch if batch > 0 else 1)

    def _check_open(self, request: InferRequest) -> Checked:
        """An open signature checks only what batching needs. A request may join others when
        the model batches and every input has the same first dimension, within the batch
        size; it then shares a batch only with requests of the same input names, datatypes,
        non-batch shapes and requested outputs. Any other request is sent alone, as it came."""
        feeds: dict[str, np.ndarray] = {}
        for t in request.inputs:
            if t.name in feeds:
                raise invalid(f"input '{clip(t.name)}' appears more than once")
            feeds[t.name] = t.data
        names = tuple(dict.fromkeys(request.outputs)) if request.outputs is not None else ()
        firsts = {t.shape[0] if t.shape else -1 for t in request.inputs}
        if self.max_batch_size > 0 and len(firsts) == 1:
            rows = firsts.pop()
            if 1 <= rows <= self.max_batch_size:
                key = tuple(sorted((t.name, t.datatype, t.shape[1:], _frozen(t.parameters)) for t in request.inputs))
                # (their parameters too: an upstream may read them, MLServer's content_type)
                return Checked(feeds, names, rows, (key, names, _frozen(request.parameters)))
        return Checked(feeds, names, 1, object())  # a key nothing else shares: alone


def _refuse_codecs(inputs: Sequence[Tensor]) -> None:
    for t in inputs:
        p = t.parameters
        if p and p.get("content_type") == "base64":
            raise invalid(
                f"input '{clip(t.name)}': parameters.content_type 'base64' is MLServer's base64 codec, which a "
                "model served here does not apply (it would be given the base64 text); send the bytes themselves "
                "(binary tensor data, or the text as it is)"
            )


def forwarded_parameters(request: InferRequest) -> tuple[dict[str, Any], dict[str, Mapping[str, Any]]]:
    """The request's parameters an upstream is sent (all but the routing pin ``variant``), and
    those of its inputs, by input name."""
    params = {k: v for k, v in request.parameters.items() if k != "variant"} if request.parameters else {}
    return params, {t.name: t.parameters for t in request.inputs if t.parameters}


def parameters_key(request: InferRequest) -> tuple[object, object]:
    """The parameters a request sends an upstream, its own and its inputs', as a key: requests
    go to an upstream in one call only with the same key (a shadow's copies)."""
    params, own = forwarded_parameters(request)
    return _frozen(params), tuple(sorted((name, _frozen(p)) for name, p in own.items()))


def with_parameters(request: InferRequest, checked: Checked) -> Checked:
    """``checked`` for a model whose upstream is sent the request's parameters (a remote model
    with a signature): a request with parameters shares a batch only with requests of the same
    ones, of the same input names, datatypes and non-batch shapes."""
    params, own = forwarded_parameters(request)
    if not params and not own:
        return checked
    key = tuple(sorted((t.name, t.datatype, t.shape[1:], _frozen(t.parameters)) for t in request.inputs))
    return checked._replace(group=(key, _frozen(params)))


def _frozen(params: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """Parameters as a key: equal ones, equal keys (a request's values may be lists or objects)."""
    return tuple(sorted((k, repr(v)) for k, v in params.items())) if params else ()
