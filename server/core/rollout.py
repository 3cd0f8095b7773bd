"""The rollout of a route's canary: a state machine stepped once per interval. Pure: the caller
hands it each interval's figures and the time; it says what the weights become.

At each interval, with at least ``min_requests`` answered by the canary in that interval, the
gates compare the canary with the baseline *over that interval only* (never cumulative counts,
which would hide a canary that turned bad after a good start):

- error rate: the canary's server errors (INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED; not client
  errors or refusals) over its requests, at most ``max_error_rate``; and the share of its
  requests its model refused as invalid (values that passed the gateway's checks: ONNX Runtime's
  invalid argument, an upstream's INVALID_ARGUMENT) past the baseline's share by at most
  ``max_error_rate`` (the variants share a signature and split the same traffic: a canary that
  refuses what the baseline takes fails, clients' bad values do not fail it; not judged in an
  interval without baseline requests);
- latency: the canary's p99 over the baseline's, at most ``max_p99_ratio`` (when both have one,
  the baseline's over at least :data:`MIN_P99_ANSWERS` answers);
- disagreement: the share of the canary's shadowed answers that disagreed with the primary's,
  at most ``max_disagreement`` (when the canary is also shadowed);
- output drift: with ``max_output_psi``, the two-sample PSI of the canary's outputs against the
  baseline's (the route's ``compare`` output, else the first every variant gives; per column, on deciles of the
  baseline's values, NaN answers a bin of their own; at most 256 columns) over a sample of the
  interval's answers, at most ``max_output_psi`` beyond what chance makes of samples that size
  (when both sides have :data:`MIN_OUTPUT_ROWS` rows).

All pass: the next step's weight. One fails: ``rollback`` (canary weight 0) or ``pause``
(weights kept until resumed). Too few requests: the interval is not judged and the step waits.
After the last step the canary is promoted. Every transition says why, with its figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from .buckets import shares
from .psi import psi_by_chance, two_sample_psi
from .routing import Rollout

MIN_OUTPUT_ROWS = 100
# Baseline answers an interval needs for its p99 to be judged against: the 99th percentile of
# fewer is their slowest or next to it, lower than a true p99 by chance, so at a late step (90%
# and more, the baseline answering a few dozen) an equal canary's p99 passed it by 25% often.
MIN_P99_ANSWERS = 100
PSI_ALPHA = 0.005  # how sure the output PSI gate must be, over all the columns it judges, before it fails

RUNNING, PAUSED, PROMOTED, ROLLED_BACK = "running", "paused", "promoted", "rolled_back"
STATES = (RUNNING, PAUSED, PROMOTED, ROLLED_BACK)


@dataclass(frozen=True)
class Figures:
    """One variant's figures over one interval."""

    requests: int = 0
    server_errors: int = 0
    p99_s: float | None = None
    compared: int = 0  # shadowed answers compared with the primary's
    disagreed: int = 0
    outputs: Any = None  # [rows, columns] of sampled answers (max_output_psi only), or None
    refused: int = 0  # of the requests, those the model refused as invalid (ModelRefused)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "pass", "fail" or "wait"
    reasons: tuple[str, ...] = ()
    figures: Mapping[str, float] = field(default_factory=dict)


def judge(rollout: Rollout, canary: Figures, baseline: Figures) -> Verdict:
    """The gates over one interval (see the module text)."""
    if canary.requests < rollout.min_requests:
        return Verdict("wait", (f"{canary.requests} canary requests, fewer than min_requests {rollout.min_requests}",))
    g = rollout.gates
    figures: dict[str, float] = {"canary_requests": canary.requests}
    reasons = []
    if canary.refused and baseline.requests:  # a client error only if the baseline refuses as many
        share, base = canary.refused / canary.requests, baseline.refused / baseline.requests
        figures["refused_excess"] = share - base
        if share - base > g.max_error_rate and _beyond_chance(canary, baseline, g.max_error_rate):
            reasons.append(
                f"the model refused {share:.4f} of its requests as invalid, the baseline's {base:.4f}: "
                f"more by {share - base:.4f} > max_error_rate {g.max_error_rate:g}"
            )
    # The other gates judge what the canary answered or failed: requests refused as invalid (as
    # the baseline refuses them) neither make min_requests nor dilute the error rate.
    answered = canary.requests - canary.refused
    if not reasons and answered < rollout.min_requests:
        return Verdict(
            "wait",
            (
                f"{answered} canary requests answered or failed ({canary.refused} more refused as invalid), "
                f"fewer than min_requests {rollout.min_requests}",
            ),
        )
    error_rate = canary.server_errors / answered if answered else 0.0
    figures["error_rate"] = error_rate
    if error_rate > g.max_error_rate:
        reasons.append(f"error rate {error_rate:.4f} > max_error_rate {g.max_error_rate:g}")
    if canary.p99_s is not None and baseline.p99_s and baseline.requests - baseline.refused >= MIN_P99_ANSWERS:
        ratio = canary.p99_s / baseline.p99_s
        figures["p99_ratio"] = ratio
        if ratio > g.max_p99_ratio:
            reasons.append(f"p99 ratio {ratio:.3f} > max_p99_ratio {g.max_p99_ratio:g}")
    if canary.compared:
        disagreement = canary.disagreed / canary.compared
        figures["disagreement"] = disagreement
        if disagreement > g.max_disagreement:
            reasons.append(f"disagreement {disagreement:.4f} > max_disagreement {g.max_disagreement:g}")
    rows, base_rows = _rows(canary.outputs), _rows(baseline.outputs)
    if g.max_output_psi > 0 and rows >= MIN_OUTPUT_ROWS and base_rows >= MIN_OUTPUT_ROWS:
        columns = two_sample_psi(canary.outputs, baseline.outputs)
        if columns:
            # A column fails when its PSI passes the gate by more than chance makes of samples
            # this small (about 0.2 at 100 rows a side over deciles, where max_output_psi is
            # commonly 0.1 to 0.25): Bonferroni over the columns, PSI_ALPHA in all.
            z = NormalDist().inv_cdf(1.0 - PSI_ALPHA / len(columns))
            excess = [(p - psi_by_chance(df, rows, base_rows, z), p, df) for p, df in columns]
            over, worst, df = max(excess)
            figures["output_psi"] = max(p for p, _ in columns)
            figures["output_psi_by_chance"] = worst - over
            if over > g.max_output_psi:
                reasons.append(
                    f"output PSI {worst:.4f} > max_output_psi {g.max_output_psi:g} + {worst - over:.4f} that "
                    f"chance allows at {rows} and {base_rows} rows"
                )
    return Verdict("fail" if reasons else "pass", tuple(reasons), figures)


def _rows(outputs: Any) -> int:
    return 0 if outputs is None else int(outputs.shape[0])


@dataclass
class RolloutState:
    """Where a route's rollout stands; ``step`` indexes ``Rollout.steps`` (-1: not begun)."""

    state: str = RUNNING
    step: int = -1
    next_at: float = 0.0  # when the current interval ends
    last: str = ""  # the last transition, in words
    waits: int = 0  # intervals in a row the current step has waited (not kept in the state file)

    def to_state(self) -> dict[str, Any]:
        return {"state": self.state, "step": self.step, "next_at": self.next_at, "last": self.last}

    @classmethod
    def from_state(cls, raw: Mapping[str, Any], rollout: Rollout) -> RolloutState:
        """What :meth:`to_state` wrote, checked against the rollout it belongs to."""
        try:
            state, step = str(raw["state"]), int(raw["step"])
            next_at, last = float(raw["next_at"]), str(raw.get("last", ""))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ValueError(f"not a rollout state: {e}") from None
        if state not in STATES or not -1 <= step < len(rollout.steps) or not math.isfinite(next_at):
            raise ValueError("not a rollout state: unknown state or step")
        return cls(state, step, next_at, last)


def canary_weight(rollout: Rollout, state: RolloutState) -> int | None:
    """The canary's percentage of the canary-plus-baseline traffic now; None before the first
    step (the configured weights stand)."""
    if state.state == ROLLED_BACK:
        return 0
    if state.state == PROMOTED:
        return 100
    return rollout.steps[state.step] if state.step >= 0 else None


def weights(rollout: Rollout, state: RolloutState, configured: Mapping[str, int]) -> dict[str, int]:
    """The route's weights for this state, in percent of the route: the canary takes its
    percentage of what the canary and the baseline weigh together, and every other variant keeps
    its share (configured 40/0/60 for baseline/canary/other is 36/4/60 at a step of 10%)."""
    pct = canary_weight(rollout, state)
    if pct is None:
        return dict(configured)
    out = shares(configured, 100)
    pair = out[rollout.canary] + out[rollout.baseline]
    out[rollout.canary] = round(pair * pct / 100)
    out[rollout.baseline] = pair - out[rollout.canary]
    return out


def start(rollout: Rollout, now: float) -> RolloutState:
    """A rollout begins at its first step; its first interval ends ``interval_s`` from now."""
    return RolloutState(RUNNING, 0, now + rollout.interval_s, f"started at step {rollout.steps[0]}%")


def tick(rollout: Rollout, state: RolloutState, now: float, canary: Figures, baseline: Figures) -> Verdict | None:
    """At the end of an interval, judge it and move ``state`` on. None when the interval has not
    ended or the rollout is not running; otherwise the verdict that was applied."""
    if state.state != RUNNING or now < state.next_at:
        return None
    verdict = judge(rollout, canary, baseline)
    state.next_at = now + rollout.interval_s
    at = rollout.steps[state.step]
    state.waits = state.waits + 1 if verdict.outcome == "wait" else 0
    if verdict.outcome == "wait":
        state.last = f"step {at}% waits: {verdict.reasons[0]}"
    elif verdict.outcome == "fail":
        state.state = ROLLED_BACK if rollout.on_fail == "rollback" else PAUSED
        state.last = f"step {at}% failed ({'; '.join(verdict.reasons)}): {state.state.replace('_', ' ')}"
    elif state.step + 1 < len(rollout.steps):
        state.step += 1
        state.last = f"step {at}% passed: on to {rollout.steps[state.step]}%"
    else:
        state.state = PROMOTED
        state.last = f"step {at}% passed: promoted"
    return verdict


def promote(state: RolloutState, rollout: Rollout) -> None:
    state.state, state.step, state.last = PROMOTED, len(rollout.steps) - 1, "promoted by hand"


def rollback(state: RolloutState) -> None:
    state.state, state.last = ROLLED_BACK, "rolled back by hand"


def pause(state: RolloutState) -> None:
    if state.state == RUNNING:
        state.state, state.last = PAUSED, "paused by hand"


def resume(state: RolloutState, rollout: Rollout, now: float) -> None:
    """A paused rollout goes on from its step, with a fresh interval."""
    if state.state == PAUSED:
        state.state, state.next_at, state.last = RUNNING, now + rollout.interval_s, "resumed by hand"


REFUSED_Z = 2.58  # one-sided, about 0.5%: how sure the refused-share gate must be before it fails


def _beyond_chance(canary: Figures, baseline: Figures, margin: float) -> bool:
    """Whether the canary's share of requests refused as invalid passes the baseline's by more
    than ``margin`` beyond what chance explains (a one-sided two-proportion z-test, pooled): the
    clients' bad values fall on either variant at random, and in an interval of a few dozen
    requests each, an equal canary's share passed the baseline's by several points often enough
    to roll it back."""
    n_c, n_b = canary.requests, baseline.requests
    pooled = (canary.refused + baseline.refused) / (n_c + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_b))
    excess = canary.refused / n_c - baseline.refused / n_b - margin
    return excess > 0 if se == 0 else excess / se > REFUSED_Z
