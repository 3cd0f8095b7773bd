"""A small PromQL evaluator over recorded scrapes of /metrics, for the chart's dashboard and rules:
the tests evaluate every panel query and every rule against scrapes of a real gateway (so each
names series the code exports, with the labels it uses), and ``tools/dashboard_preview.py``
draws the dashboard from a recording, where no Grafana or Prometheus runs.

Queries are parsed by ``promql-parser`` (the Rust parser of GreptimeDB, the grammar of
Prometheus). Evaluated: vector selectors with every matcher kind; ``rate``, ``irate``,
``increase`` over range selectors (counter resets handled as Prometheus does, without its
extrapolation to the window's edges), ``histogram_quantile``, ``clamp_min``, ``clamp_max``,
``abs``, ``vector``, ``time``; ``sum``, ``avg``, ``min``, ``max``, ``count`` with ``by`` /
``without``; arithmetic and comparisons (``bool`` too) between scalars and vectors, one-to-one
or with ``on`` / ``ignoring`` and ``group_left`` / ``group_right``; ``and``, ``or``, ``unless``.
Anything else raises ``Unsupported``, naming it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import promql_parser as pp
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset  # of (name, value) pairs, __name__ included for selected series
Vector = dict  # Labels -> float


class Unsupported(ValueError):
    """A query uses what this evaluator does not."""


@dataclass
class Recording:
    """Scrapes of one or more targets, in time order: ``times[i]`` (seconds) and, at each, every
    sample as (labels with ``__name__``) -> value."""

    times: list[float] = field(default_factory=list)
    samples: list[dict[Labels, float]] = field(default_factory=list)

    def add(self, t: float, texts: Iterable[tuple[dict[str, str], str]]) -> None:
        """One scrape round at ``t``: each (target labels, /metrics text) pair; the target labels
        (``pod``, ``job``...) are added to its samples, as Prometheus does."""
        at: dict[Labels, float] = {}
        for target, text in texts:
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    labels = {**s.labels, **target, "__name__": s.name}
                    at[frozenset(labels.items())] = float(s.value)
        self.times.append(t)
        self.samples.append(at)


_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),
    "%": lambda a, b: math.fmod(a, b) if b else math.nan,
    "^": operator.pow,
}
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


def _strip(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _match(m: pp.Matcher, value: str) -> bool:
    op = m.op
    if op == pp.MatchOp.Equal:
        return value == m.value
    if op == pp.MatchOp.NotEqual:
        return value != m.value
    if op == pp.MatchOp.Re:
        return re.fullmatch(m.value, value) is not None
    if op == pp.MatchOp.NotRe:
        return re.fullmatch(m.value, value) is None
    raise Unsupported(f"matcher {m.op}")


def _selects(vs: pp.VectorSelector, labels: Labels) -> bool:
    d = dict(labels)
    if vs.name and d.get("__name__") != vs.name:
        return False
    return all(_match(m, d.get(m.name, "")) for m in vs.matchers.matchers)


def expand(query: str, variables: dict[str, str] | None = None) -> str:
    """A Grafana query with its variables replaced (``$__rate_interval`` and the like by the
    values given, ``$var`` / ``${var}`` by theirs), ready for the parser."""
    values = {"__rate_interval": "1m", "__interval": "15s", **(variables or {})}
    for name in sorted(values, key=len, reverse=True):
        query = query.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return query


class Evaluator:
    def __init__(self, rec: Recording):
        self.rec = rec

    def instant(self, query: str, index: int = -1, variables: dict[str, str] | None = None) -> Vector | float:
        """The query's value at scrape ``index``: an instant vector (labels -> value) or a scalar."""
        expr = pp.parse(expand(query, variables))
        return self._eval(expr, index if index >= 0 else len(self.rec.times) + index)

    # ------------------------------------------------------------------ nodes
    def _eval(self, e, i: int) -> Vector | float:
        if isinstance(e, pp.NumberLiteral):
            return float(e.val)
        if isinstance(e, pp.ParenExpr):
            return self._eval(e.expr, i)
        if isinstance(e, pp.UnaryExpr):
            v = self._eval(e.expr, i)
            return -v if isinstance(v, float) else {k: -x for k, x in v.items()}
        if isinstance(e, pp.VectorSelector):
            return {k: v for k, v in self.rec.samples[i].items() if _selects(e, k)}
        if isinstance(e, pp.Call):
            return self._call(e, i)
        if isinstance(e, pp.AggregateExpr):
            return self._aggregate(e, i)
        if isinstance(e, pp.BinaryExpr):
            return self._binary(e, i)
        raise Unsupported(type(e).__name__)

    def _range(self, ms: pp.MatrixSelector, i: int) -> dict[Labels, list[tuple[float, float]]]:
        t = self.rec.times[i]
        start = t - ms.range.total_seconds()
        out: dict[Labels, list[tuple[float, float]]] = {}
        for j in range(i + 1):
            tj = self.rec.times[j]
            if tj < start:
                continue
            for k, v in self.rec.samples[j].items():
                if _selects(ms.vector_selector, k):
                    out.setdefault(k, []).append((tj, v))
        return out

    def _call(self, e: pp.Call, i: int) -> Vector | float:
        name = e.func.name
        args = e.args
        if name in ("rate", "irate", "increase"):
            if not isinstance(args[0], pp.MatrixSelector):
                raise Unsupported(f"{name} of a {type(args[0]).__name__}")
            out = {}
            for k, pts in self._range(args[0], i).items():
                if name == "irate":
                    pts = pts[-2:]
                if len(pts) < 2:
                    continue
                grew, prev = 0.0, pts[0][1]
                for _, v in pts[1:]:
                    grew += v - prev if v >= prev else v  # a reset: the counter began again at 0
                    prev = v
                span = pts[-1][0] - pts[0][0]
                if span <= 0:
                    continue
                out[_strip(k)] = grew if name == "increase" else grew / span
            return out
        if name == "histogram_quantile":
            q = self._eval(args[0], i)
            vec = self._eval(args[1], i)
            if not isinstance(q, float) or isinstance(vec, float):
                raise Unsupported("histogram_quantile(scalar, vector) only")
            return _quantiles(q, vec)
        if name in ("clamp_min", "clamp_max"):
            vec, bound = self._eval(args[0], i), self._eval(args[1], i)
            if isinstance(vec, float) or not isinstance(bound, float):
                raise Unsupported(f"{name}(vector, scalar) only")
            pick = max if name == "clamp_min" else min
            return {k: pick(v, bound) for k, v in vec.items()}
        if name == "abs":
            vec = self._eval(args[0], i)
            return abs(vec) if isinstance(vec, float) else {k: abs(v) for k, v in vec.items()}
        if name == "vector":
            s = self._eval(args[0], i)
            if not isinstance(s, float):
                raise Unsupported("vector(scalar) only")
            return {frozenset(): s}
        if name == "time":
            return float(self.rec.times[i])
        raise Unsupported(f"function {name}")

    def _aggregate(self, e: pp.AggregateExpr, i: int) -> Vector:
        vec = self._eval(e.expr, i)
        if isinstance(vec, float):
            raise Unsupported(f"{str(e.op)} of a scalar")
        mod = e.modifier
        groups: dict[Labels, list[float]] = {}
        for k, v in vec.items():
            if mod is None:
                key: Labels = frozenset()
            elif mod.type == pp.AggModifierType.By:
                key = frozenset((a, b) for a, b in k if a in mod.labels)
            else:
                key = frozenset((a, b) for a, b in k if a not in mod.labels and a != "__name__")
            groups.setdefault(key, []).append(v)
        fn: dict[str, Callable[[list[float]], float]] = {
            "sum": math.fsum,
            "avg": lambda xs: math.fsum(xs) / len(xs),
            "min": min,
            "max": max,
            "count": lambda xs: float(len(xs)),
        }
        op = str(e.op)
        if op not in fn:
            raise Unsupported(f"aggregation {op}")
        return {k: fn[op](xs) for k, xs in groups.items()}

    def _binary(self, e: pp.BinaryExpr, i: int) -> Vector | float:
        op = str(e.op)
        lhs, rhs = self._eval(e.lhs, i), self._eval(e.rhs, i)
        mod = e.modifier
        keep_bool = bool(mod is not None and mod.return_bool)
        if op in ("and", "or", "unless"):
            if isinstance(lhs, float) or isinstance(rhs, float):
                raise Unsupported(f"{op} between scalars")
            sig_r = {self._sig(k, mod) for k in rhs}
            if op == "and":
                return {k: v for k, v in lhs.items() if self._sig(k, mod) in sig_r}
            if op == "unless":
                return {k: v for k, v in lhs.items() if self._sig(k, mod) not in sig_r}
            sig_l = {self._sig(k, mod) for k in lhs}
            return {**lhs, **{k: v for k, v in rhs.items() if self._sig(k, mod) not in sig_l}}
        if op in _ARITH:
            f = _ARITH[op]

            def apply(a: float, b: float) -> float | None:
                return f(a, b)
        elif op in _COMPARE:
            c = _COMPARE[op]

            def apply(a: float, b: float) -> float | None:
                ok = c(a, b)
                return (1.0 if ok else 0.0) if keep_bool else (a if ok else None)
        else:
            raise Unsupported(f"operator {op}")
        if isinstance(lhs, float) and isinstance(rhs, float):
            got = apply(lhs, rhs)
            return 0.0 if got is None else got
        if isinstance(rhs, float):
            return _kept({_strip(k): apply(v, rhs) for k, v in lhs.items()})
        if isinstance(lhs, float):
            out = {}
            for k, v in rhs.items():
                r = apply(lhs, v)
                if r is not None:  # a filtering comparison keeps the vector's own value
                    out[_strip(k)] = r if keep_bool or op in _ARITH else v
            return out
        return self._match_vectors(lhs, rhs, mod, apply)

    @staticmethod
    def _sig(k: Labels, mod) -> Labels:
        m = None if mod is None else mod.matching
        if m is None:
            return _strip(k)
        if m.type == pp.LabelModifierType.Include:
            return frozenset((a, b) for a, b in k if a in m.labels)
        return frozenset((a, b) for a, b in k if a not in m.labels and a != "__name__")

    def _match_vectors(self, lhs: Vector, rhs: Vector, mod, apply) -> Vector:
        card = None if mod is None else mod.card
        right: dict[Labels, tuple[Labels, float]] = {}
        for k, v in rhs.items():
            right[self._sig(k, mod)] = (k, v)
        out: dict[Labels, float | None] = {}
        if card == pp.VectorMatchCardinality.OneToMany:
            left = {self._sig(k, mod): (k, v) for k, v in lhs.items()}
            for k, v in rhs.items():
                hit = left.get(self._sig(k, mod))
                if hit is not None:
                    out[_strip(k)] = apply(hit[1], v)
            return _kept(out)
        for k, v in lhs.items():
            hit = right.get(self._sig(k, mod))
            if hit is not None:
                # one-to-one keeps the matching labels only (Prometheus's rule); many-to-one the left side's
                key = _strip(k) if card == pp.VectorMatchCardinality.ManyToOne else self._sig(k, mod)
                out[key] = apply(v, hit[1])
        return _kept(out)


def _kept(vec: dict[Labels, float | None]) -> Vector:
    return {k: v for k, v in vec.items() if v is not None}


def _quantiles(q: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile: per series (labels but ``le``), linear interpolation
    within the bucket the rank falls in; the highest finite bound when it falls in +Inf."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    for k, v in buckets.items():
        d = dict(k)
        if "le" not in d:
            continue
        le = math.inf if d["le"] == "+Inf" else float(d["le"])
        rest = frozenset((a, b) for a, b in k if a not in ("le", "__name__"))
        series.setdefault(rest, []).append((le, v))
    out = {}
    for k, pts in series.items():
        pts.sort()
        total = pts[-1][1]
        if not pts or pts[-1][0] != math.inf or total <= 0 or math.isnan(total):
            out[k] = math.nan
            continue
        rank = q * total
        prev_le, prev_count = 0.0, 0.0
        for le, count in pts:
            if count >= rank:
                if le == math.inf:
                    out[k] = prev_le
                elif count == prev_count:
                    out[k] = le
                else:
                    out[k] = prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
                break
            prev_le, prev_count = le, count
    return out
