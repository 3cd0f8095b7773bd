"""Strict-JSON cleaning shared by the load-test report and the autoscale simulation."""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """Make a value strict-JSON safe: NaN/inf become null, odd types become plain ones."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_safe(v) for v in sorted(obj, key=str)]
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return json_safe(obj.tolist())
    return str(obj)
