"""The input sets a conversion is checked on: generated inputs at several batch sizes and sizes
of the dynamic dimensions, and the user's ``--samples`` (read and checked against the specs)."""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.npyio import NpzFile

from .spec import ConversionError, InputSpec, example_sizes, generate

if TYPE_CHECKING:
    from .pipeline import Job


def cases(job: Job) -> list[dict[str, np.ndarray]]:
    """Generated inputs at several batch sizes (and other sizes of the dynamic dimensions),
    then the user's samples."""
    rng = np.random.default_rng(0)
    out = []
    if job.batched:
        batches = [b for b in (1, 2, 5) if b <= job.max_batch_size] or [1]
        # Three sets whatever the limit: with max_batch_size 1 one set alone had the export's own
        # sizes, so a dynamic size the exporter baked in passed (the largest batch is repeated).
        batches += batches[-1:] * (3 - len(batches))
        for step, b in enumerate(batches):
            out.append(generate(job.specs, example_sizes(job.specs, b, step), rng))
    else:  # several sizes too: the export's own sizes alone would not show a size it baked in
        for step in range(3):
            out.append(generate(job.specs, example_sizes(job.specs, 2 + step, step), rng))
    if job.samples:
        out.extend(load_samples(job.samples, job.specs, job))
    return out


def load_samples(path: str, specs: list[InputSpec], job: Job) -> list[dict[str, np.ndarray]]:
    """The ``--samples`` arrays, checked against the specs (called before the export, and again
    for the parity check)."""
    if not os.path.isfile(path):
        raise ConversionError(f"--samples {path}: " + ("not a file" if os.path.exists(path) else "no such file"))
    try:
        data = np.load(path, allow_pickle=False) if zipfile.is_zipfile(path) else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConversionError(f"--samples {path}: cannot read it as .npz: {e}") from None
    if not isinstance(data, NpzFile):  # a .npy, text, a pickle...
        raise ConversionError(f"--samples {path}: not an .npz file (write one with numpy.savez, an array per input)")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data.files]
    if missing:
        raise ConversionError(
            f"--samples {path}: no array for input(s) {', '.join(missing)} "
            f"(it holds {', '.join(data.files) or 'nothing'})"
        )
    sample = {}
    for s in specs:
        try:
            arr = data[s.name]
        except (OSError, ValueError, zipfile.BadZipFile) as e:  # a damaged member, or pickled objects
            raise ConversionError(f"--samples {path}: cannot read '{s.name}': {e}") from None
        if arr.ndim != len(s.dims):
            raise ConversionError(
                f"--samples {path}: '{s.name}' has {arr.ndim} dimensions, the input spec {len(s.dims)}"
            )
        for i, d in enumerate(s.dims):
            if isinstance(d, int) and d != -1 and arr.shape[i] != d:
                raise ConversionError(
                    f"--samples {path}: '{s.name}' has shape {list(arr.shape)}, but dimension {i} must be {d}"
                )
        if arr.size == 0:
            raise ConversionError(
                f"--samples {path}: '{s.name}' has shape {list(arr.shape)}, no values: the parity check "
                "would compare nothing"
            )
        if job.batched and arr.shape[0] > job.max_batch_size:
            raise ConversionError(
                f"--samples {path}: '{s.name}' has {arr.shape[0]} rows, more than max_batch_size {job.max_batch_size}"
            )
        try:
            sample[s.name] = arr.astype(s.dtype.np_dtype) if s.dtype.v2 != "BYTES" else as_text(arr)
        except (ValueError, TypeError) as e:  # (UnicodeDecodeError is a ValueError)
            raise ConversionError(
                f"--samples {path}: '{s.name}' ({arr.dtype}) cannot be read as {s.dtype.v2}: {e}"
            ) from None
    rows = {n: a.shape[0] for n, a in sample.items()}
    if job.batched and len(set(rows.values())) > 1:
        raise ConversionError(f"--samples {path}: the inputs' arrays have different numbers of rows ({rows})")
    named: dict[str, dict[str, int]] = {}  # a named dimension has one size in every input that has it
    for s in specs:
        for i, d in enumerate(s.dims):
            if isinstance(d, str) and not (job.batched and i == 0):
                named.setdefault(d, {})[s.name] = sample[s.name].shape[i]
    for d, sizes in named.items():
        if len(set(sizes.values())) > 1:
            told = ", ".join(f"{size} in '{n}'" for n, size in sizes.items())
            raise ConversionError(
                f"--samples {path}: dimension '{d}' has size {told}; the input specs name it in each, so it "
                "must be one size"
            )
    return [sample]


def as_text(arr: np.ndarray) -> np.ndarray:
    """BYTES as the server hands them to ONNX Runtime: text (ONNX Runtime makes a bytes object
    into the string "b'...'"), so the parity check feeds both models what serving would."""
    out = np.empty(arr.size, dtype=object)
    out[:] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
    return out.reshape(arr.shape)
