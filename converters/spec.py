"""Input specifications: ``NAME:DTYPE:SHAPE`` as the converter command line takes them.

SHAPE is the full shape, comma-separated. A dimension is a size (``3``), ``-1`` (dynamic)
or a name (dynamic, and every dimension with that name has the same size, e.g. ``seq`` on
a token tensor and its mask). The first dimension is the batch dimension unless batching
is turned off: whatever is written there, it becomes dynamic and is left out of the
config's ``dims`` (Triton's convention with ``max_batch_size`` > 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from batchgate.core.types import DATATYPES, DataType

TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
TENSOR_RULE = "a letter or _, then letters, digits, _, . or -"
BATCH = "batch"
INT64_MAX = 2**63 - 1


class ConversionError(Exception):
    """The conversion cannot go on; the message names the cause. Nothing has been written."""


def datatype(text: str) -> DataType:
    """A V2 datatype from its V2 name (FP32) or its numpy name (float32)."""
    up = text.strip().upper()
    if up in DATATYPES:
        return DATATYPES[up]
    try:
        np_dt = np.dtype(text.strip().lower())
    except TypeError:
        np_dt = None
    for dt in DATATYPES.values():
        if np_dt is not None and dt.v2 != "BYTES" and dt.np_dtype == np_dt:
            return dt
    raise ConversionError(f"unknown datatype {text!r}; use one of {', '.join(DATATYPES)}")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: DataType
    dims: tuple[int | str, ...]  # full shape; a str is a named dynamic dimension, -1 an unnamed one
    # The integers or strings generated inputs are drawn from: those of --samples (an index into an
    # embedding of 3 rows, a category), else none and small integers / short strings are made up.
    values: tuple = ()

    @classmethod
    def parse(cls, text: str, batched: bool = True) -> InputSpec:
        parts = text.split(":")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise ConversionError(f"input spec {text!r} must be NAME:DTYPE:SHAPE, e.g. x:FP32:-1,3,224,224")
        name, dt, shape = (p.strip() for p in parts)
        if not TENSOR_NAME.match(name):
            raise ConversionError(f"input spec {text!r}: {name!r} is not a valid tensor name ({TENSOR_RULE})")
        dims: list[int | str] = []
        for d in shape.split(","):
            d = d.strip()
            if re.fullmatch(r"-?\d+", d):
                v = int(d)
                if v == 0 or v < -1:
                    raise ConversionError(f"input spec {text!r}: dimension {d} must be positive, or -1 for dynamic")
                if v > INT64_MAX:  # (a config's dims are int64; numpy's "Maximum allowed dimension" traceback)
                    raise ConversionError(f"input spec {text!r}: dimension {d} is larger than a tensor's can be")
                dims.append(v)
            elif TENSOR_NAME.match(d):
                dims.append(d)
            else:
                raise ConversionError(f"input spec {text!r}: dimension {d!r} must be a size, -1 or a name")
        if batched:
            if isinstance(dims[0], str) and dims[0] != BATCH:
                raise ConversionError(
                    f"input spec {text!r}: the first dimension is the batch dimension; "
                    f"name it '{BATCH}' or -1 (or turn batching off)"
                )
            dims[0] = BATCH
        return cls(name, datatype(dt), tuple(dims))

    def config_dims(self, batched: bool) -> list[int]:
        dims = self.dims[1:] if batched else self.dims
        return [d if isinstance(d, int) else -1 for d in dims]


def example_sizes(specs: list[InputSpec], batch: int, step: int = 0) -> dict[str, int]:
    """A size for every named or unnamed dynamic dimension: distinct small sizes, never 0 or 1
    (an exporter treats those as constants), moved by ``step`` to try other sizes."""
    sizes: dict[str, int] = {BATCH: batch}
    n = 0
    for s in specs:
        for i, d in enumerate(s.dims):
            key = d if isinstance(d, str) else (f"{s.name}.{i}" if d == -1 else None)
            if key is not None and key not in sizes:
                sizes[key] = 3 + n + 2 * step
                n += 1
    return sizes


def shape_of(spec: InputSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    out = []
    for i, d in enumerate(spec.dims):
        if isinstance(d, str):
            out.append(sizes[d])
        elif d == -1:
            out.append(sizes[f"{spec.name}.{i}"])
        else:
            out.append(d)
    return tuple(out)


def generate(specs: list[InputSpec], sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the given sizes: normal floats, small non-negative integers (they may be
    indices), random booleans, short strings (as text, which the server feeds ONNX Runtime)."""
    out = {}
    for s in specs:
        shape = shape_of(s, sizes)
        dt = s.dtype
        if dt.v2 == "BOOL":
            out[s.name] = rng.random(shape) < 0.5
        elif s.values and (dt.v2 == "BYTES" or dt.np_dtype.kind in "iu"):
            pool = np.array(s.values, dtype=object if dt.v2 == "BYTES" else dt.np_dtype)
            out[s.name] = pool[rng.integers(0, len(pool), shape)]
        elif dt.v2 == "BYTES":
            out[s.name] = np.array([f"s{v}" for v in rng.integers(0, 100, int(np.prod(shape)))], dtype=object).reshape(
                shape
            )
        elif dt.np_dtype.kind in "iu":
            out[s.name] = rng.integers(0, 10, shape).astype(dt.np_dtype)
        else:
            out[s.name] = rng.standard_normal(shape).astype(dt.np_dtype)
    return out


def drawn_from(specs: list[InputSpec], sample: dict[str, np.ndarray]) -> list[InputSpec]:
    """The specs, their integer and string inputs to be generated from the values ``sample`` holds
    (a model may take some values only: made-up ones would stop it before any check)."""
    return [
        replace(s, values=tuple(np.unique(sample[s.name]).tolist()))
        if s.dtype.v2 == "BYTES" or s.dtype.np_dtype.kind in "iu"
        else s
        for s in specs
    ]
