"""A load test's description: what to drive, how hard, for how long, and what counts as good.

Kept free of heavy imports: the command line builds its help from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_ERROR_BUDGET = 0.001  # the error budget of an SLO that names only a p99


class LoadTestError(RuntimeError):
    """The load test cannot run (bad scenario, server unreachable); the message says why."""


@dataclass
class Scenario:
    target: str  # host:port of the server's gRPC or HTTP endpoint
    model: str
    protocol: str = "grpc"  # grpc | http
    version: str = ""
    http_encoding: str = "json"  # json | binary (the binary tensor extension)
    grpc_stream: bool = False
    mode: str = "open"  # open | closed
    rate: float = 100.0  # open loop: requests/s over all workers
    arrival: str = "constant"  # constant | poisson
    shape: str = ""  # "", ramp:R0:R1, step:R1@T1,R2@T2,..., spike:BASE:PEAK@AT+LEN
    concurrency: int = 8  # closed loop: callers over all workers
    duration_s: float = 10.0
    warmup_s: float = 2.0
    window_s: float = 1.0
    cooldown_s: float = 1.0  # pause between the steps of a sweep (the server drains what is left)
    deadline_ms: float = 1000.0
    workers: int = 1
    channels: int = 1
    streams_per_channel: int = 0
    connections: int = 64
    batch_size: int = 1
    dynamic_size: int = 8
    data: str | None = None  # .npz or .jsonl
    payloads: int = 16
    seed: int = 1
    slo_p99_ms: float | None = None
    error_budget: float | None = None  # allowed error rate; given (or with slo_p99_ms) it is part of the SLO
    stability_pct: float = 10.0
    late_ms: float = 10.0
    precise_timing: bool = False  # spend the last ~1 ms before each send spinning (sub-ms dispatch, busy core)
    min_achieved: float = 0.99
    max_lag_p99_ms: float = 10.0
    metrics_url: str | None = None
    sweep_rate: str | None = None  # START:END:STEP or R1,R2,... (step search), LOW:HIGH (binary search)
    search: str = "step"  # step | binary
    precision: float = 0.0  # binary search: stop when the bracket is this narrow (req/s)
    sweep_concurrency: str | None = None  # e.g. 1,2,4,8,16

    def check(self) -> None:
        """Refuse a scenario that cannot run; messages name the setting as its flag is named."""
        choices = {
            "protocol": ("grpc", "http"),
            "http_encoding": ("json", "binary"),
            "mode": ("open", "closed"),
            "arrival": ("constant", "poisson"),
            "search": ("step", "binary"),
        }
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise LoadTestError(f"{flag(k)} must be one of {', '.join(allowed)}, not {getattr(self, k)!r}")
        for k in ("duration_s", "window_s", "deadline_ms", "rate", "warmup_s", "cooldown_s", "precision"):
            if not math.isfinite(getattr(self, k)):  # (inf ran for ever or counted every answer late)
                raise LoadTestError(f"{flag(k)} must be a finite number")
        for k in ("duration_s", "window_s", "deadline_ms", "rate"):
            if not getattr(self, k) > 0:
                raise LoadTestError(f"{flag(k)} must be greater than 0")
        if self.streams_per_channel < 0:
            raise LoadTestError(f"{flag('streams_per_channel')} must not be negative (0: one stream a request)")
        if not 0 < self.min_achieved <= 1:
            raise LoadTestError(f"{flag('min_achieved')} is a share of the rate asked: above 0, at most 1")
        if self.slo_p99_ms is not None and not (math.isfinite(self.slo_p99_ms) and self.slo_p99_ms > 0):
            raise LoadTestError(f"{flag('slo_p99_ms')} must be a finite number greater than 0")
        if self.error_budget is not None and not 0 <= self.error_budget <= 1:
            raise LoadTestError(f"{flag('error_budget')} is a share of the requests: from 0 to 1")
        for k in ("workers", "channels", "connections", "batch_size", "payloads", "concurrency"):
            if getattr(self, k) < 1:
                raise LoadTestError(f"{flag(k)} must be at least 1")
        for k in ("warmup_s", "cooldown_s", "precision"):
            if getattr(self, k) < 0:
                raise LoadTestError(f"{flag(k)} must not be negative")
        if self.grpc_stream and self.protocol != "grpc":
            raise LoadTestError("grpc-stream needs protocol grpc")
        segments(self)  # the shape parses
        if self.sweep_concurrency:
            concurrency_levels(self.sweep_concurrency)
        elif self.sweep_rate:
            rate_sweep(self)


# Scenario fields whose flag (and scenario-file key) is named differently; the others are the
# field's name with - for _.
FLAG_OF_FIELD = {
    "duration_s": "duration",
    "warmup_s": "warmup",
    "window_s": "window",
    "cooldown_s": "cooldown",
    "version": "model-version",
}


def flag(field_name: str) -> str:
    """The flag (without --) and scenario-file key that sets a Scenario field."""
    return FLAG_OF_FIELD.get(field_name, field_name.replace("_", "-"))


MAX_SWEEP_STEPS = 1000


def concurrency_levels(spec: str) -> list[int]:
    """The closed-loop levels of ``--sweep-concurrency``: ``1,2,4,8``."""
    try:
        levels = [int(x) for x in str(spec).split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise LoadTestError(
            f"sweep-concurrency is a comma-separated list of whole numbers >= 1, e.g. 1,2,4,8, not {spec!r}"
        )
    return levels


@dataclass
class RateSweep:
    """An open-loop sweep: the rates of a step search (run from the lowest up until one misses),
    or the bracket of a binary search."""

    method: str  # step | binary
    rates: list[float]  # step: every rate, in order; binary: [low, high]
    precision: float = 0.0  # binary: stop when the bracket is this narrow (req/s)

    @property
    def most_steps(self) -> int:
        """The most steps the sweep can take (a step search stops at its first miss, a binary
        search bisects until the bracket is within the precision)."""
        if self.method == "step":
            return len(self.rates)
        low, high = self.rates
        halvings = math.ceil(math.log2((high - low) / self.precision)) if high - low > self.precision else 0
        return 2 + halvings


def rate_sweep(sc: Scenario) -> RateSweep:
    """``--sweep-rate``: ``START:END:STEP`` or ``R1,R2,...`` (step search), ``LOW:HIGH`` (binary)."""
    spec = str(sc.sweep_rate or "").strip()
    try:
        if "," in spec or (":" not in spec and sc.search != "binary"):  # (one rate: a list of one)
            rates = sorted(set(float(x) for x in spec.split(",") if x.strip()))  # a step search goes up from the lowest
            parts = None
        else:
            parts = [float(x) for x in spec.split(":")]
    except ValueError:
        raise LoadTestError(
            f"sweep-rate {spec!r} must be START:END:STEP or R1,R2,... (step search) or LOW:HIGH (binary search)"
        ) from None
    if sc.search == "binary":
        if parts is None or len(parts) != 2 or not 0 < parts[0] < parts[1]:
            raise LoadTestError(f"sweep-rate for a binary search is LOW:HIGH with 0 < LOW < HIGH, not {spec!r}")
        low, high = parts
        return RateSweep("binary", [low, high], sc.precision or max(1.0, (high - low) / 32))
    if parts is not None:
        if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0] or parts[0] <= 0:
            raise LoadTestError(
                "sweep-rate for a step search is START:END:STEP (0 < START <= END, STEP > 0) "
                f"or R1,R2,..., not {spec!r}"
            )
        start, end, step = parts
        count = math.floor((end - start) / step + 1e-9) + 1
        if count > MAX_SWEEP_STEPS:
            raise LoadTestError(
                f"sweep-rate {spec!r} makes {count:,} steps (at most {MAX_SWEEP_STEPS:,}): a larger STEP"
            )
        rates = [round(start + i * step, 9) for i in range(count)]  # no sum of steps: no drift
    if min(rates) <= 0:
        raise LoadTestError(f"sweep-rate: every rate must be greater than 0, not {spec!r}")
    return RateSweep("step", rates)


def segments(sc: Scenario, rate: float | None = None) -> list[tuple[float, float, float, float]]:
    """The schedule's rate over the measurement: (t0, t1, r0, r1) pieces, linear within each."""
    d = sc.duration_s
    r = sc.rate if rate is None else rate
    shape = sc.shape.strip()
    try:
        if not shape or shape == "constant":
            return [(0.0, d, r, r)]
        kind, _, spec = shape.partition(":")
        if kind == "ramp":
            a, b = (float(x) for x in spec.split(":"))
            return [(0.0, d, a, b)]
        if kind == "step":
            pts = []
            for part in spec.split(","):
                rr, _, at = part.partition("@")
                pts.append((float(at or 0), float(rr)))
            pts.sort()
            return [(t, pts[i + 1][0] if i + 1 < len(pts) else d, rr, rr) for i, (t, rr) in enumerate(pts)]
        if kind == "spike":
            base, rest = spec.split(":", 1)
            peak, _, when = rest.partition("@")
            at, _, length = when.partition("+")
            b, p, t0, n = float(base), float(peak), float(at), float(length)
            return [(0.0, t0, b, b), (t0, t0 + n, p, p), (t0 + n, d, b, b)]
    except ValueError:
        pass
    raise LoadTestError(f"shape {shape!r} must be ramp:R0:R1, step:R1@T1,R2@T2,... or spike:BASE:PEAK@AT+LEN")
