"""How many cores this process may use: the container's CPU quota, the cores it may run on,
and this worker process's share of them when several serve together (``workers``)."""

from __future__ import annotations

import math
import os

MAX_WORKERS = 256
_workers = 1  # processes sharing the cores; set in each worker process (set_workers)


def affinity() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup's CPU quota in cores (cgroup v2 ``cpu.max``, else v1 ``cfs_quota_us``), or
    None when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            limit, period = f.read().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            limit_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if limit_us <= 0 or period_us <= 0 else limit_us / period_us
    except (OSError, ValueError):
        return None


def available(root: str = "/sys/fs/cgroup") -> int:
    """Cores this pod may keep busy: the CPU quota rounded up (at least 1), at most the cores
    it may run on."""
    q = quota(root)
    cores = affinity()
    return cores if q is None else max(1, min(cores, math.ceil(q - 1e-9)))


def parse_workers(text: str) -> int | None:
    """``workers`` as written: a whole number from 1 to MAX_WORKERS, or ``auto`` (None)."""
    t = str(text).strip().lower()
    if t == "auto":
        return None
    # (ASCII digits only: str.isdigit also takes "²", which int() refuses, and "٣")
    if not (t.isascii() and t.isdigit()) or not 1 <= int(t) <= MAX_WORKERS:
        raise ValueError(f"workers must be 'auto' or a whole number from 1 to {MAX_WORKERS}, not {text!r}")
    return int(t)


def resolve_workers(text: str, root: str = "/sys/fs/cgroup") -> int:
    n = parse_workers(text)
    return min(MAX_WORKERS, available(root)) if n is None else n


def set_workers(n: int) -> None:
    global _workers
    _workers = max(1, n)


def share() -> int:
    """This process's share of the cores: all of them alone, 1/N of them as one of N workers
    (at least 1). Thread pools (inference threads, ONNX Runtime, TorchScript) size by it."""
    return max(1, available() // _workers)
