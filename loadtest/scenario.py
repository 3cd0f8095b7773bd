"""A load test's description: what to drive, how hard, for how long, and what counts as good.

Kept free of heavy imports: the command line builds its help from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from batchgate.core.types import clip, is_host_port

from .secure import Secure, SecureError

DEFAULT_ERROR_BUDGET = 0.001  # the error budget of an SLO that names only a p99

# Bounds on the sizes and counts a scenario asks for, checked before anything is started or built.
WORKERS_PER_CPU = 4  # a worker keeps at most one core busy: more than a few per core only wait
MAX_WORKERS = 256  # and never more processes than this, whatever the machine
MAX_CONCURRENCY = 100_000  # closed loop: callers over all workers (also each --sweep-concurrency level)
# open loop: requests a second over all workers, at any point of a shape or sweep (a Python worker
# sends some tens of thousands; far past that, its schedule is always late and it never yielded)
MAX_RATE = 1_000_000
MAX_STREAMS_PER_CHANNEL = 100_000  # gRPC requests in flight per channel
MAX_CHANNELS = 1_000  # gRPC channels per worker
MAX_CONNECTIONS = 10_000  # HTTP connections per worker (each one a socket)
MAX_PAYLOADS = 100_000  # distinct generated requests
MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: the generated requests together (each worker holds a copy)
MAX_WINDOWS = 100_000  # measurement windows per step (duration / window)


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
    token_file: str | None = None  # a file holding the API key (loadtest/secure.py)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    sweep_rate: str | None = None  # START:END:STEP or R1,R2,... (step search), LOW:HIGH (binary search)
    search: str = "step"  # step | binary
    precision: float = 0.0  # binary search: stop when the bracket is this narrow (req/s)
    sweep_concurrency: str | None = None  # e.g. 1,2,4,8,16

    def check(self) -> None:
        """Refuse a scenario that cannot run; messages name the setting as its flag is named."""
        check_address(self.target, "target")
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
        finite = ("duration_s", "window_s", "deadline_ms", "rate", "warmup_s", "cooldown_s", "precision")
        for k in (*finite, "late_ms", "stability_pct", "max_lag_p99_ms"):
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
        for k in ("warmup_s", "cooldown_s", "precision", "late_ms", "stability_pct"):
            if getattr(self, k) < 0:
                raise LoadTestError(f"{flag(k)} must not be negative")
        if not self.max_lag_p99_ms >= LAG_RESOLUTION_MS:  # the lag is recorded in whole microseconds
            raise LoadTestError(
                f"{flag('max_lag_p99_ms')} must be at least {LAG_RESOLUTION_MS:g} (1 µs); "
                "below that every step is INVALID"
            )
        self._check_bounds()
        # A window longer than the step (a short --duration with the default window) is the step.
        self.window_s = min(self.window_s, self.duration_s)
        if self.duration_s / self.window_s > MAX_WINDOWS:
            raise LoadTestError(
                f"duration / window makes more than {MAX_WINDOWS:,} windows a step: a longer {flag('window_s')}"
            )
        if self.grpc_stream and self.protocol != "grpc":
            raise LoadTestError("grpc-stream needs protocol grpc")
        if self.metrics_url:
            check_metrics_url(self.metrics_url)
        self.secure()  # (the key and TLS files: checked before the run)
        if self.search == "binary" and not self.sweep_rate:
            raise LoadTestError("search binary bisects a sweep-rate LOW:HIGH: give sweep-rate too")
        if self.precision and self.search != "binary":
            raise LoadTestError("precision is where a binary search stops: it needs search binary and a sweep-rate")
        if self.sweep_rate and (self.sweep_concurrency or self.mode == "closed"):
            raise LoadTestError(
                "sweep-rate is an open-loop sweep: it cannot be combined with "
                + ("sweep-concurrency" if self.sweep_concurrency else "concurrency (a closed loop)")
            )
        if shaped(self) and (self.sweep_rate or self.sweep_concurrency):
            what = "sweep-rate" if self.sweep_rate else "sweep-concurrency"
            raise LoadTestError(
                f"shape cannot be combined with {what}: a shape is one open-loop step that sets its own rates"
            )
        segments(self)  # the shape parses
        if self.sweep_concurrency:
            concurrency_levels(self.sweep_concurrency)
        elif self.sweep_rate:
            rate_sweep(self)

    def secure(self) -> Secure:
        """The API key and TLS files to reach the target with (LoadTestError naming the flag)."""
        try:
            return Secure.of(self.token_file, self.tls, self.tls_ca, self.tls_cert, self.tls_key)
        except SecureError as e:
            raise LoadTestError(str(e)) from None

    def _check_bounds(self) -> None:
        most = max_workers()
        if self.workers > most:
            raise LoadTestError(
                f"workers must be at most {most} ({WORKERS_PER_CPU} per usable CPU, {usable_cpus()} here, "
                f"and never more than {MAX_WORKERS}), not {self.workers}"
            )
        for k, top in (
            ("concurrency", MAX_CONCURRENCY),
            ("streams_per_channel", MAX_STREAMS_PER_CHANNEL),
            ("channels", MAX_CHANNELS),
            ("connections", MAX_CONNECTIONS),
            ("payloads", MAX_PAYLOADS),
        ):
            if getattr(self, k) > top:
                raise LoadTestError(f"{flag(k)} must be at most {top:,}, not {getattr(self, k):,}")
        if self.dynamic_size < 0:
            raise LoadTestError(f"{flag('dynamic_size')} must not be negative")
        if self.seed < 0:  # (numpy's generators take none)
            raise LoadTestError(f"{flag('seed')} must not be negative, not {self.seed}")


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


LAG_RESOLUTION_MS = 0.001  # the dispatch lag's histogram counts whole microseconds
MAX_SWEEP_STEPS = 1000  # steps of a step search or levels of a concurrency sweep
MAX_BINARY_STEPS = 40  # steps of a binary search: 2 ends and 38 halvings (a bracket 2^38 times the precision)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the platform says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def max_workers() -> int:
    """The most worker processes a scenario may ask for on this machine."""
    return min(MAX_WORKERS, WORKERS_PER_CPU * usable_cpus())


def without_password(url: str) -> str:
    """``url`` with what identifies its caller masked (for reports and messages): ``user:***@``
    for a password, ``***@`` for a name alone (often a token). Read as text up to the last ``@``,
    not as urllib reads it: a password with an unescaped ``/``, ``?`` or ``#`` ends urllib's host
    part early, and urllib would then find no password to hide."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest:
        return text
    userinfo, _, after = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{after}" if colon else f"{scheme}://***@{after}"


def shown_url(url: str) -> str:
    """``url`` as a message quotes it: without its password, cut to 128 characters."""
    return clip(without_password(url))


def check_metrics_url(url: str) -> None:
    """Refuse a --metrics-url that is not an http(s) URL with a host (whether it answers is
    found out when the run starts)."""
    try:
        parts = urlsplit(str(url))
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:  # e.g. an unclosed [ of an IPv6 address, or a password with an unescaped /
        ok = False
    if not ok:
        raise LoadTestError(
            f"metrics-url must be an http:// or https:// URL with a host (a password's /, ? and # "
            f"percent-escaped), not {shown_url(url)!r}"
        )


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
    if max(levels) > MAX_CONCURRENCY:
        raise LoadTestError(f"sweep-concurrency: a level must be at most {MAX_CONCURRENCY:,}, not {max(levels):,}")
    if len(levels) > MAX_SWEEP_STEPS:
        raise LoadTestError(f"sweep-concurrency has {len(levels):,} levels (at most {MAX_SWEEP_STEPS:,})")
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
    # float() takes "nan" and "inf": NaN passed every comparison below (a START of nan crashed the
    # step count, a listed nan ran a step at "nan/s"), and an END of inf made endless steps.
    if not all(math.isfinite(x) for x in (rates if parts is None else parts)):
        raise LoadTestError(f"sweep-rate: every number must be finite, not {spec!r}")
    if sc.search == "binary":
        if parts is None or len(parts) != 2 or not 0 < parts[0] < parts[1] <= MAX_RATE:
            raise LoadTestError(
                f"sweep-rate for a binary search is LOW:HIGH with 0 < LOW < HIGH <= {MAX_RATE:,}, not {spec!r}"
            )
        low, high = parts
        sweep = RateSweep("binary", [low, high], sc.precision or max(1.0, (high - low) / 32))
        if sweep.most_steps > MAX_BINARY_STEPS:
            raise LoadTestError(
                f"a binary search over {spec} to within {sweep.precision:g} req/s takes up to {sweep.most_steps:,} "
                f"steps (at most {MAX_BINARY_STEPS}): a larger precision"
            )
        return sweep
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
    if max(rates) > MAX_RATE:
        raise LoadTestError(f"sweep-rate: every rate must be at most {MAX_RATE:,}/s, not {spec!r}")
    return RateSweep("step", rates)


SHAPE_FORMS = "ramp:R0:R1, step:R1@T1,R2@T2,... or spike:BASE:PEAK@AT+LEN"


def check_address(address: str, what: str) -> None:
    """``address`` is HOST:PORT with a port from 1 to 65535 (gRPC took 99999999 modulo 65536:
    another port, load-tested and reported VALID)."""
    if not is_host_port(address):
        shown = address[:128].encode("unicode_escape").decode()
        raise LoadTestError(f"{what} must be HOST:PORT with a port from 1 to 65535, not {shown!r}")


def segments(sc: Scenario, rate: float | None = None) -> list[tuple[float, float, float, float]]:
    """The schedule's rate over the measurement: (t0, t1, r0, r1) pieces, linear within each."""
    segs = _segments(sc, rate)
    top = max(x for seg in segs for x in seg[2:])
    if top > MAX_RATE:
        raise LoadTestError(f"a rate of {top:g}/s is past what a load generator can send (at most {MAX_RATE:,}/s)")
    return segs


def _segments(sc: Scenario, rate: float | None = None) -> list[tuple[float, float, float, float]]:
    d = sc.duration_s
    r = sc.rate if rate is None else rate
    shape = sc.shape.strip()
    if not shape or shape == "constant":
        return [(0.0, d, r, r)]
    try:
        segs = _shape_segments(shape, d)
    except ValueError:
        raise LoadTestError(f"shape {shape!r} must be {SHAPE_FORMS}") from None
    rates = [x for seg in segs for x in seg[2:]]
    if not all(math.isfinite(x) and x >= 0 for x in rates):
        raise LoadTestError(f"shape {shape!r}: every rate must be a finite number >= 0")
    if not any(rates):
        raise LoadTestError(f"shape {shape!r}: every rate is 0, so nothing would be sent")
    return segs


def _shape_segments(shape: str, d: float) -> list[tuple[float, float, float, float]]:
    """Parse a shape (ValueError when it does not parse); times must fall within the duration ``d``."""
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
        times = [t for t, _ in pts]
        if not (times[0] >= 0 and times[-1] < d) or len(set(times)) < len(times):
            raise LoadTestError(f"shape {shape!r}: each step's time must differ and lie in [0, duration {d:g} s)")
        return [(t, pts[i + 1][0] if i + 1 < len(pts) else d, rr, rr) for i, (t, rr) in enumerate(pts)]
    if kind == "spike":
        base, rest = spec.split(":", 1)
        peak, _, when = rest.partition("@")
        at, _, length = when.partition("+")
        b, p, t0, n = float(base), float(peak), float(at), float(length)
        if not (t0 >= 0 and n > 0 and t0 + n <= d):
            raise LoadTestError(
                f"shape {shape!r}: the spike (from {t0:g} s for {n:g} s) must lie within the duration ({d:g} s)"
            )
        return [(0.0, t0, b, b), (t0, t0 + n, p, p), (t0 + n, d, b, b)]
    raise ValueError(kind)


def shaped(sc: Scenario) -> bool:
    """Whether the scenario's open-loop rate follows a shape rather than ``rate``."""
    return sc.shape.strip() not in ("", "constant")


def mean_rate(segs: list[tuple[float, float, float, float]], duration_s: float) -> float:
    """The mean scheduled rate over the measurement (before the first piece: its rate)."""
    total = segs[0][0] * segs[0][2]
    for t0, t1, r0, r1 in segs:
        total += (t1 - t0) * (r0 + r1) / 2
    return total / duration_s


def rate_label(sc: Scenario, rate: float | None = None) -> str:
    """A step's name from its schedule: ``constant 100/s``, ``ramp 10→50/s``, ``step 100→500→50/s``,
    ``spike 200→2000/s at 3+2 s`` (with ``poisson`` in front for Poisson arrivals)."""
    r = sc.rate if rate is None else rate
    if not shaped(sc):
        return f"{sc.arrival} {fmt_rate(r)}/s"
    segs = segments(sc)
    kind = sc.shape.strip().partition(":")[0]
    if kind == "spike":
        text = f"spike {fmt_rate(segs[0][2])}→{fmt_rate(segs[1][2])}/s at {segs[1][0]:g}+{segs[1][1] - segs[1][0]:g} s"
    else:
        levels = [segs[0][2]] + [seg[3] for seg in segs]
        kept = [x for i, x in enumerate(levels) if i == 0 or x != levels[i - 1]]
        text = f"{kind} {'→'.join(fmt_rate(x) for x in kept)}/s"
    return ("poisson " if sc.arrival == "poisson" else "") + text


def fmt_rate(rate: float, digits: int = 6) -> str:
    return f"{rate:.{digits}g}" if rate < 1e6 or digits > 6 else f"{rate:.3g}"
