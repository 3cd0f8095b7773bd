"""Routes served: one V2 model name answered by weighted variants, with shadows and a rollout.

A route is served under its own name like a model: ``DataPlane.admit`` hands a route's requests
to :meth:`ServedRoute.admit`, which picks the variant from what is known before the body is read
(a pin header, a sticky header, else at random by weight) and admits the request on that
variant's model version, under the same limits as a direct request. Once the request is decoded,
a pin parameter or a ``param:`` / ``input:`` sticky key may name another variant; the admission
then moves to it. The answer carries the variant's model name and version and the parameter
``variant``.

The pure parts (parsing, buckets, pins, signatures, the rollout's state machine) are in
``core/routing.py`` and ``core/rollout.py``; :class:`RouteTable` (``route_table.py``) builds,
reloads and steps the routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

import numpy as np
import yaml

from .core import rollout as ro
from .core.buckets import BucketTable
from .core.errors import ConfigError, ErrorCode, GatewayError, ModelRefused, cancelled_code, invalid
from .core.psi import judged_columns
from .core.routing import PIN_HEADER, PIN_PARAMETER, RouteSpec, Shadow, check_pin, parse_routes, pinned, sticky_key
from .core.stats import ModelStats
from .core.types import OFFLINE_HEADER, SYNTHETIC_HEADER, InferRequest, InferResponse
from .core.unique_yaml import UniqueKeys
from .model import ModelVersion
from .monitoring.metrics import ROLLOUT_STATE_CODES, RouteMetrics
from .security.limits import Admission
from .shadows import ShadowRunner
from .state import read_capped

_perf_ns = time.perf_counter_ns
# Answers that count as the canary's errors in the rollout's gate: the server's, not the client's
# mistakes and not refusals for overload.
SERVER_ERRORS = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
OUTPUT_SAMPLES = 512  # answers kept per variant and interval for the max_output_psi gate
OUTPUT_ROWS = 64  # rows kept of one answer
Header = Callable[[str], "str | None"]  # a request's header / metadata value by lower-case name


class Window:
    """One variant's figures over the rollout's current interval."""

    __slots__ = (
        "requests",
        "server_errors",
        "refused",
        "latency",
        "compared",
        "disagreed",
        "outputs",
        "answers",
        "parts",
        "width",
    )

    def __init__(self) -> None:
        from hdrh.histogram import HdrHistogram  # only servers with routes load it

        self.requests = 0
        self.server_errors = 0
        self.refused = 0  # requests the model refused as invalid (ModelRefused); in requests too
        # Microseconds, 1 µs to 10 min, 2 significant digits: a p99 within 1%, which a gate
        # of 1.25 needs and Prometheus buckets cannot give.
        self.latency = HdrHistogram(1, 600_000_000, 2)
        self.compared = 0
        self.disagreed = 0
        self.outputs: list[np.ndarray] = []  # a uniform sample of answers' rows (max_output_psi)
        self.answers = 0
        self.width = 0  # the kept answers' width (rows flattened), before only the judged columns were kept
        # absorbed samples, with the answers each stands for and the width they were kept from
        self.parts: list[tuple[list[np.ndarray], int, int]] = []

    def keep(self, rows: np.ndarray, rng: random.Random) -> None:
        """Reservoir sampling over answers: each of the interval's answers is equally likely to
        be among the :data:`OUTPUT_SAMPLES` kept. Only answers of the first answer's width (rows
        flattened) are kept, so one odd answer cannot make the interval's figures fail; of a wide
        answer, only the columns the gate judges (a whole answer of a million values, kept 512
        times, was gigabytes)."""
        if not rows.ndim or not rows.shape[0]:
            return
        rows = rows.reshape(rows.shape[0], -1)
        if self.outputs and rows.shape[1] != self.width:
            return
        self.width = rows.shape[1]
        self.answers += 1
        if len(self.outputs) < OUTPUT_SAMPLES:
            self.outputs.append(np.array(rows[:OUTPUT_ROWS, judged_columns(self.width)]))
        else:
            slot = rng.randrange(self.answers)
            if slot < OUTPUT_SAMPLES:
                self.outputs[slot] = np.array(rows[:OUTPUT_ROWS, judged_columns(self.width)])

    def export(self, outputs: bool = True) -> dict[str, Any]:
        """The window as plain data: another worker process's rollout controller adds it to its
        own (the latency histogram travels encoded, whole); without ``outputs``, no kept answers
        (the admin API's counts)."""
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "refused": self.refused,
            "latency": self.latency.encode(),
            "compared": self.compared,
            "disagreed": self.disagreed,
            "outputs": _bounded(self.outputs) if outputs else [],
            "answers": self.answers if outputs else 0,
            "width": self.width,
        }

    def absorb(self, other: dict[str, Any]) -> None:
        """Add another process's window (:meth:`export`) to this one."""
        self.requests += other["requests"]
        self.server_errors += other["server_errors"]
        self.refused += other["refused"]
        if other["requests"]:
            self.latency.decode_and_add(other["latency"])
        self.compared += other["compared"]
        self.disagreed += other["disagreed"]
        self.parts.append((other["outputs"], other["answers"], other["width"]))

    def counts(self) -> ro.Figures:
        """The figures without the kept answers (what the admin API shows): joining that sample
        (up to 512 answers of 64 rows and 256 columns) took about 10 ms a variant, on the event
        loop, for every GetRoute and every route of a ListRoutes."""
        n = self.latency.get_total_count()
        p99 = self.latency.get_value_at_percentile(99) / 1e6 if n else None
        return ro.Figures(self.requests, self.server_errors, p99, self.compared, self.disagreed, None, self.refused)

    def figures(self) -> ro.Figures:
        kept = self.outputs
        if self.parts:  # several processes' samples: each in proportion to the answers it stands for
            total = sum(a for _, a, _ in self.parts) or 1
            rng = random.Random(0)
            taken = []
            for samples, answers, width in self.parts:
                take = min(len(samples), round(OUTPUT_SAMPLES * answers / total))
                taken += [(width, a) for a in rng.sample(samples, take)]
            # Each process keeps its first answer's width; processes that saw different ones (a
            # reload between their first answers) would not concatenate, or their kept columns not
            # be the same ones: the most rows' width counts.
            rows: dict[int, int] = {}
            for width, a in taken:
                rows[width] = rows.get(width, 0) + a.shape[0]
            most = max(rows, key=lambda w: rows[w]) if rows else 0
            kept = [a for width, a in taken if width == most]
        return dataclasses.replace(self.counts(), outputs=np.concatenate(kept) if kept else None)


def _bounded(samples: list[np.ndarray], limit: int = 8 << 20) -> list[np.ndarray]:
    """At most ``limit`` bytes of kept answers (an even subsample past it): what one worker sends
    the leader each interval stays small."""
    size = sum(a.nbytes for a in samples)
    if size <= limit:
        return list(samples)
    step = -(-size // limit)
    return samples[::step]


class Routed:
    """One request's passage through a route: the variant and version it is admitted on."""

    __slots__ = ("route", "variant", "version", "pinned")

    def __init__(self, route: ServedRoute, variant: str, version: ModelVersion, pinned: bool):
        self.route, self.variant, self.version, self.pinned = route, variant, version, pinned

    def submit(self, request: InferRequest):
        return self.route.serve(self, request)


class ServedRoute:
    def __init__(
        self,
        spec: RouteSpec,
        table: BucketTable,
        state: ro.RolloutState | None,
        metrics: RouteMetrics,
        admission: Admission,
    ):
        self.spec = spec
        self.name = spec.name
        self.table = table
        self.rollout = state
        self.metrics = metrics
        self.admission = admission
        self.members: dict[str, ModelVersion | None] = {}  # variant or shadow name -> version
        self.outputs: frozenset[str] = frozenset()  # the outputs every loaded variant gives
        self.problem: str | None = "not checked yet"  # why the route cannot serve at all
        self.shadows: list[ShadowRunner] = []
        self.stats = ModelStats(spec.name, "")
        self.windows = {v.name: Window() for v in spec.variants}
        self.rng = random.Random()
        self._shadow_of: dict[str, str] = {}  # shadow name -> the variant its comparisons judge
        self._judged = spec.rollout is not None  # figures per interval: only a rollout reads them
        # the output whose distribution the max_output_psi gate compares ("" = the first answered)
        self._psi_output: str | None = None
        if spec.rollout is not None and spec.rollout.gates.max_output_psi > 0:
            self._psi_output = spec.compare.output if spec.compare is not None else ""
        self._answers = {v.name: {PIN_PARAMETER: v.name} for v in spec.variants}  # the answer's parameters
        self._names: list[str] = []
        self._cumulative: list[int] = []
        self.publish()

    @property
    def weights(self) -> dict[str, int]:
        return self.table.weights

    # ---------------------------------------------------------------- state
    def publish(self) -> None:
        """Bring the route's gauges up to date (weights, rollout state)."""
        m = self.metrics
        m.weights = dict(self.table.weights)
        # For picks without a key: running totals of the weights, searched by bisection.
        self._names, self._cumulative, at = [], [], 0
        for name, w in self.table.weights.items():
            if w > 0:
                at += w
                self._names.append(name)
                self._cumulative.append(at)
        if self.spec.rollout is None or self.rollout is None:
            m.rollout_state, m.canary_percent = 0, None
        else:
            m.rollout_state = ROLLOUT_STATE_CODES[self.rollout.state]
            m.canary_percent = self.canary_percent()

    def set_members(self, members: dict[str, ModelVersion | None], problem: str | None) -> None:
        self.members, self.problem = members, problem
        # A variant may give outputs the first does not: the route shows only those every loaded
        # variant gives (one the heaviest alone gave was refused on the others' share of requests).
        given = [{t.name for t in v.signature.outputs} for v in map(members.get, self.spec.weights) if v is not None]
        self.outputs = frozenset(set.intersection(*given)) if given else frozenset()
        self._shadow_of = {}
        for s in self.spec.shadows:  # a shadow of the canary's model judges the canary
            mine = members.get(s.name)
            for v in self.spec.variants:  # the same version loaded (a version named or not), else as written
                theirs = members.get(v.name)
                loaded = mine is not None and theirs is not None
                if mine is theirs if loaded else (s.model, s.version) == (v.model, v.version):
                    self._shadow_of[s.name] = v.name
                    break

    def canary_percent(self) -> float | None:
        """The canary's share of the canary-plus-baseline traffic, from the weights served now
        (after a rollback or a promotion, weights set by hand are what is served: the rollout's
        own figure went stale); None before the first step of a rollout."""
        r, state = self.spec.rollout, self.rollout
        if r is None or state is None or ro.canary_weight(r, state) is None:
            return None
        w = self.table.weights
        both = w.get(r.canary, 0) + w.get(r.baseline, 0)
        return round(100 * w.get(r.canary, 0) / both, 2) if both else None

    def not_ready_reason(self) -> str | None:
        """Why the route cannot serve every request now (None: it can): every variant with
        weight above 0 needs a ready version."""
        if self.problem is not None:
            return self.problem
        for v in self.spec.variants:
            if self.table.weights.get(v.name, 0) <= 0:
                continue
            served = self.members.get(v.name)
            if served is None:
                return f"variant '{v.name}': model '{v.model}' version {v.version or 'latest'} is not loaded"
            if not served.ready():
                return f"variant '{v.name}': model '{v.model}' is not ready: {served.not_ready_reason()}"
        return None

    def primary(self) -> ModelVersion | None:
        """The version that speaks for the route in metadata and config: the heaviest variant's."""
        for v in sorted(self.spec.variants, key=lambda v: -self.table.weights.get(v.name, 0)):
            served = self.members.get(v.name)
            if served is not None:
                return served
        return None

    # ---------------------------------------------------------------- serving
    def admit(self, version: str, header: Header | None, count: bool = True) -> Routed:
        """Pick the variant from what is known before the body (a pin header, a sticky header,
        else at random by weight) and admit the request on its version (``count``: as
        :meth:`Admission.admit`)."""
        if version:
            raise invalid(f"'{self.name}' is a route, which has no versions: send the request without a model version")
        if self.problem is not None:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"route '{self.name}' is not ready: {self.problem}")
        pin = header(PIN_HEADER) if header is not None else None
        variant = check_pin(self.spec, pin) if pin is not None else self._pick(header)
        # (synthetic and offline requests count in no gate: known here from their headers)
        served = self._version(variant, pin is not None or (header is not None and _uncounted(header)))
        self.admission.admit(served, count)
        return Routed(self, variant, served, pin is not None)

    def _pick(self, header: Header | None) -> str:
        sticky = self.spec.sticky
        if sticky is not None and sticky.kind == "header" and header is not None:
            value = header(sticky.name)
            if value is not None:
                return self.table.variant_for(value.encode())
        # no key yet (a param: or input: key is read after decoding): at random by weight
        names = self._names
        if len(names) == 1:
            return names[0]
        return names[bisect_right(self._cumulative, self.rng.random() * self._cumulative[-1])]

    def _version(self, variant: str, uncounted: bool) -> ModelVersion:
        served = self.members.get(variant)
        if served is None:
            # Counted as the variant's failure (statistics, metrics and, unless pinned, synthetic
            # or offline, the rollout's window): a canary whose model is unloaded mid-rollout
            # fails its error gate (before, its refusals were counted nowhere and the rollout
            # went on stepping).
            self.stats.record_request(False, 0)
            self.metrics.answered(variant, ErrorCode.UNAVAILABLE.value)
            if not uncounted and self._judged:
                w = self.windows[variant]
                w.requests += 1
                w.server_errors += 1
            v = self.spec.variant(variant)
            raise GatewayError(
                ErrorCode.UNAVAILABLE,
                f"route '{self.name}': variant '{variant}' (model '{v.model}') is not loaded",
            )
        return served

    def _repick(self, routed: Routed, request: InferRequest) -> None:
        """After decoding: a ``variant`` parameter pins; a param or input sticky key chooses."""
        parameter = request.parameters.get(PIN_PARAMETER)
        if routed.pinned:  # by the header, before the body: a parameter may only agree with it
            if parameter is not None:
                pinned(self.spec, routed.variant, parameter)
            return
        variant = routed.variant
        pin = pinned(self.spec, None, parameter)
        if pin is not None:
            variant, routed.pinned = pin, True
        elif self.spec.sticky is not None and self.spec.sticky.kind != "header":
            key = sticky_key(self.spec.sticky, request)
            if key is not None:
                variant = self.table.variant_for(key)
        if variant != routed.variant:
            served = self._version(variant, routed.pinned or request.synthetic or request.offline)
            self.admission.move(routed.version, served)  # refused: still admitted on the old one
            routed.variant, routed.version = variant, served

    async def serve(self, routed: Routed, request: InferRequest) -> InferResponse:
        self._repick(routed, request)
        variant = routed.variant
        counted = not routed.pinned and not request.synthetic and not request.offline
        # No copy to a shadow of the answering variant's own model: it would agree with itself.
        copies = (
            [(s, s.offer(request)) for s in self.shadows if self._shadow_of.get(s.spec.name) != variant]
            if self.shadows
            else ()
        )
        # A client that asked for other outputs only: the primary gives the compared one too, for
        # the copies to be compared with, and it is left out of the answer.
        extra = self._compared_extra(request, counted, copies)
        start = _perf_ns()
        status = "OK"
        refused = False  # by the model, on values past the gateway's checks
        resp: InferResponse | None = None
        try:
            resp = await routed.version.submit(
                request if extra is None else request._replace(outputs=(*(request.outputs or ()), extra))
            )
        except GatewayError as e:
            status, refused = e.code.value, isinstance(e, ModelRefused)
            raise
        except asyncio.CancelledError:
            status = cancelled_code(request.deadline, request.arrival).value
            raise
        except Exception:
            status = ErrorCode.INTERNAL.value
            raise
        finally:
            elapsed = _perf_ns() - start
            self.stats.record_request(status == "OK", elapsed)
            if status == "OK":
                shape = request.inputs[0].shape if request.inputs else ()
                batched = routed.version.signature.max_batch_size > 0 and len(shape) > 0
                self.stats.record_routed(int(shape[0]) if batched else 1)
            self.metrics.answered(variant, status)
            if counted and self._judged:
                w = self.windows[variant]
                if status == "OK":
                    w.requests += 1
                    w.latency.record_value(max(1, elapsed // 1000))
                    if self._psi_output is not None and resp is not None:
                        self._keep_output(w, resp)
                elif status in SERVER_ERRORS and (status != "DEADLINE_EXCEEDED" or request.deadline is None):
                    # (a deadline the caller set and missed is the caller's choice, not the canary's fault)
                    w.requests += 1
                    w.server_errors += 1
                elif refused:  # held against the variant only past what the baseline refuses
                    w.requests += 1
                    w.refused += 1
            for runner, fut in copies:
                if fut is None:
                    continue
                if status != "OK" and status not in SERVER_ERRORS:  # refused, invalid, cancelled: no copy
                    fut.cancel()
                runner.settle(fut, request, resp, elapsed / 1e9, counted, self._judge(runner))
        assert resp is not None
        if extra is not None:
            resp = resp._replace(outputs=[o for o in resp.outputs if o.name != extra])
        # (the variant's answer parameters beside any the model gave: a remote upstream's own)
        return resp._replace(
            parameters={**resp.parameters, **self._answers[variant]} if resp.parameters else self._answers[variant]
        )

    def _compared_extra(self, request: InferRequest, counted: bool, copies) -> str | None:
        """The compared output, when the request asks for others only and a counted copy of it went
        to a shadow (else None: nothing to add)."""
        c = self.spec.compare
        if c is None or not counted or request.outputs is None or c.output in request.outputs:
            return None
        return c.output if any(fut is not None for _, fut in copies) else None

    def _keep_output(self, w: Window, resp: InferResponse) -> None:
        name = self._psi_output
        if not name:  # the first output of the signature: never what a caller chose to ask for
            primary = self.primary()
            # (one every variant gives: the heaviest's own first may be one the others lack, and
            # the gate then never had the rows to judge)
            first = [t.name for t in primary.signature.outputs if t.name in self.outputs] if primary else []
            if not first:
                return
            name = self._psi_output = first[0]
        for o in resp.outputs:
            if o.name == name:
                if o.data.dtype.kind in "fiub":
                    w.keep(o.data, self.rng)
                return

    def _judge(self, runner: ShadowRunner) -> Callable[[bool], None] | None:
        variant = self._shadow_of.get(runner.spec.name)
        if variant is None:
            return None
        window = self.windows

        def judged(disagreed: bool) -> None:
            w = window.get(variant)
            if w is not None:
                w.compared += 1
                w.disagreed += disagreed

        return judged

    # ---------------------------------------------------------------- rollout
    def window_figures(self) -> tuple[ro.Figures, ro.Figures]:
        r = self.spec.rollout
        assert r is not None
        return self.windows[r.canary].figures(), self.windows[r.baseline].figures()

    def pod_figures(self, others: list[dict[str, dict[str, Any]]]) -> tuple[ro.Figures, ro.Figures]:
        """:meth:`window_figures` over this process's windows and ``others`` (other worker
        processes' exports, variant -> window)."""
        r = self.spec.rollout
        assert r is not None

        def merged(variant: str) -> ro.Figures:
            w = Window()
            for part in [{variant: self.windows[variant].export()}, *others]:
                if variant in part:
                    w.absorb(part[variant])
            return w.figures()

        return merged(r.canary), merged(r.baseline)

    def new_windows(self) -> None:
        self.windows = {v.name: Window() for v in self.spec.variants}

    def _shadow_dict(self, shadow: Shadow) -> dict[str, Any]:
        """One configured shadow as the admin API shows it, a left-out one too (with why)."""
        out: dict[str, Any] = {"name": shadow.name, "model": shadow.model, "percent": shadow.percent}
        runner = next((r for r in self.shadows if r.spec.name == shadow.name), None)
        if runner is not None:
            out.update(inflight=runner.inflight, active=True)
        elif self.members.get(shadow.name) is None:
            out["reason"] = f"left out: model '{shadow.model}' is not served, or does not fit the route's signature"
        else:
            out["reason"] = "not running: starting, or its model cannot run a copy for shadowing"
        return out

    def _counts(self, others: list[dict[str, dict[str, Any]]]) -> dict[str, ro.Figures]:
        """Each variant's counts of the current window, with ``others`` (other worker processes'
        exports, as :meth:`pod_figures` takes them): the pod's, which the rollout judges."""
        if not others:
            return {name: w.counts() for name, w in self.windows.items()}
        out = {}
        for name, mine in self.windows.items():
            w = Window()
            for part in [{name: mine.export(outputs=False)}, *others]:
                if name in part:
                    w.absorb(part[name])
            out[name] = w.counts()
        return out

    def describe(self, others: list[dict[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
        """The route as the admin API shows it: weights, rollout, figures of the current window
        (with ``others``, other worker processes' windows: the pod's), every configured shadow
        (``active`` false for one left out)."""
        out: dict[str, Any] = {
            "name": self.name,
            "weights": dict(self.table.weights),
            "variants": [
                {"name": v.name, "model": v.model, "version": v.version, "configured_weight": v.weight}
                for v in self.spec.variants
            ],
            "shadows": [self._shadow_dict(s) for s in self.spec.shadows],
            "ready": self.not_ready_reason() is None,
            "reason": self.not_ready_reason() or "",
            "window": {name: _figures_dict(f) for name, f in self._counts(others or []).items()},
        }
        if self.spec.rollout is not None and self.rollout is not None:
            out["rollout"] = {
                **self.rollout.to_state(),
                "canary": self.spec.rollout.canary,
                "baseline": self.spec.rollout.baseline,
                "steps": list(self.spec.rollout.steps),
                "canary_percent": self.canary_percent(),
            }
        return out


def _uncounted(header: Header) -> bool:
    """Whether a request's headers mark it synthetic (a load test) or offline (batch scoring),
    as ``core/types.py`` reads them once the request is decoded."""
    return any(
        (header(name) or "").strip().lower() in ("1", "true", "yes") for name in (SYNTHETIC_HEADER, OFFLINE_HEADER)
    )


def _figures_dict(f: ro.Figures) -> dict[str, Any]:
    return {
        "requests": f.requests,
        "server_errors": f.server_errors,
        "p99_s": f.p99_s,
        "compared": f.compared,
        "disagreed": f.disagreed,
        "refused": f.refused,
    }


def read_routes_file(path: str) -> list[RouteSpec]:
    """The ``routes:`` list of a routes file (blocking)."""
    raw = read_capped(path, 4 * 1024 * 1024, "routes file")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=UniqueKeys) or {}  # noqa: S506 - a SafeLoader subclass
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"routes file {path} is not valid YAML: {str(e)[:512]}") from None
    if not isinstance(data, dict) or set(data) - {"routes"}:
        raise ConfigError(f"routes file {path} must hold one key, 'routes', with a list of routes")
    return parse_routes(data.get("routes"), f"routes file {path}: routes")


class Settled:
    """Whether a watched file changed and then stood still for one poll.

    An editor or ``cp`` truncates the file before writing it: read at that moment it holds no
    routes, and every route would go away until the next poll. A change is therefore applied only
    when two polls in a row see the same stamp (a ConfigMap's atomic symlink swap is applied one
    poll later than it would be otherwise)."""

    def __init__(self, stamp: object) -> None:
        self.applied = self.seen = stamp

    def changed(self, stamp: object) -> bool:
        if stamp != self.seen:  # (still) being written: wait for it to stand still
            self.seen = stamp
            return False
        if stamp == self.applied:
            return False
        self.applied = stamp
        return True


def file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
