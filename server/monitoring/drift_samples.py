"""What a drift monitor takes of a request, shaped for the detector: a tensor's rows copied as
[rows, columns] (BYTES cut to a category's length), and a batch of samples stacked by model and
tensor shape, so that pickling and the detector's work go per batch, not per request."""

from __future__ import annotations

import numpy as np

from ..core.drift import MAX_CATEGORY_BYTES, columns


def sample(data: np.ndarray, rows: int, width: int | None = None) -> np.ndarray:
    """At most ``rows`` rows of a tensor as [rows, columns], copied (never a view of the
    request's body); BYTES values cut to the length a category is kept at (a client's 50 MB
    string never reaches the queue, the pipe or a window). ValueError, before any copy, when
    its columns are not the profile's ``width``."""
    if not data.ndim or not data.shape[0]:
        raise ValueError("a tensor without rows")
    if width is not None and (data.size // data.shape[0] if data.ndim > 1 else 1) != width:
        raise ValueError("a tensor of another width than the profile's")
    cols = (data if data.ndim == 2 else columns(data))[:rows]
    if cols.dtype.kind == "O":
        return np.array([[_cut(v) for v in row] for row in cols.tolist()], dtype=object)
    return cols.copy()


def _cut(value: object) -> object:
    if isinstance(value, (bytes, bytearray, str)) and len(value) > MAX_CATEGORY_BYTES:
        return value[:MAX_CATEGORY_BYTES]
    return value


def stacked(batch: list[tuple[str, float, dict[tuple[str, str], np.ndarray]]]) -> list[tuple]:
    """Samples of one model with the same tensors (names, widths, types), their rows stacked:
    one array a tensor instead of one a request (pickling and the detector's work per sample
    shrink to per batch). Each group: (model, first offered, last offered, tensors, samples)."""
    groups: dict[tuple, list[tuple[float, dict]]] = {}
    for model, offered, tensors in batch:
        shape = tuple([(k, a.shape[1:], a.dtype) for k, a in tensors.items()])  # (in the request's order)
        groups.setdefault((model, shape), []).append((offered, tensors))
    out = []
    for (model, shape), items in groups.items():
        if len(items) == 1:
            tensors = items[0][1]
        else:
            tensors = {k: np.concatenate([t[k] for _, t in items]) for k, _, _ in shape}
        out.append((model, items[0][0], items[-1][0], tensors, len(items)))
    return out
