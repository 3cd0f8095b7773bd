"""A process's figures as plain data (:class:`Snapshot`), how several processes' snapshots add
up (each family by the rule ``families.py`` declares), and how a snapshot becomes Prometheus text
(``metrics.py`` keeps the figures; the supervisor of several workers merges their snapshots)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..core.stats import merge_stats
from .families import FAMILIES, MAX, SUM
from .triton import render as render_triton

Labels = tuple[str, ...]
HistValue = tuple[tuple[int, ...], float]  # (count per bucket, the last for +Inf), sum


@dataclass
class Snapshot:
    """Every figure one process holds, as plain data (picklable, JSON-able once the label
    tuples are joined): per family, label values -> a number or a histogram; the V2
    statistics of each model version and route (version ""); and, for Triton's failure
    reasons, the failures of each counted by reason (REJECTED, CANCELED, BACKEND). Several
    processes' snapshots add up with :meth:`merge`, each family by the rule it declares."""

    values: dict[str, dict[Labels, float | HistValue]] = field(default_factory=dict)
    stats: dict[tuple[str, str], dict] = field(default_factory=dict)
    failures: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    # Families whose buckets are not the table's (the request durations with a latency SLO)
    buckets: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def add(self, family: str, labels: Labels, value: float | HistValue) -> None:
        self.values.setdefault(family, {})[labels] = value

    def merge(self, other: Snapshot) -> Snapshot:
        out = Snapshot(
            {f: dict(series) for f, series in self.values.items()},
            dict(self.stats),
            {k: dict(v) for k, v in self.failures.items()},
            {**self.buckets, **other.buckets},
        )
        for fam, series in other.values.items():
            rule = FAMILIES[fam].merge
            mine = out.values.setdefault(fam, {})
            for labels, v in series.items():
                have = mine.get(labels)
                mine[labels] = v if have is None else _combine(rule, have, v)
        for key, st in other.stats.items():
            have_st = out.stats.get(key)
            out.stats[key] = st if have_st is None else merge_stats(have_st, st)
        for key, by_reason in other.failures.items():
            mine_f = out.failures.setdefault(key, {})
            for reason, n in by_reason.items():
                mine_f[reason] = mine_f.get(reason, 0) + n
        return out

    def part(self, families: frozenset[str], inside: bool) -> Snapshot:
        """The families in ``families`` (``inside``) with the routes' statistics (version "": front
        mode's workers serve the routes), or the others with the rest of the statistics."""
        return Snapshot(
            {f: dict(v) for f, v in self.values.items() if (f in families) == inside},
            {k: v for k, v in self.stats.items() if (k[1] == "") == inside},
            {k: dict(v) for k, v in self.failures.items() if (k[1] == "") == inside},
            dict(self.buckets),
        )

    def without_gauges(self) -> Snapshot:
        """What a process that has gone keeps contributing: its counters and histograms (so
        totals never go backwards), not its gauges (its queue is gone with it)."""
        return Snapshot(
            {f: dict(s) for f, s in self.values.items() if FAMILIES[f].kind != "gauge"},
            dict(self.stats),
            {k: dict(v) for k, v in self.failures.items()},
            dict(self.buckets),
        )


def _combine(rule: str, a: float | HistValue, b: float | HistValue) -> float | HistValue:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return tuple(x + y for x, y in zip(a[0], b[0])), a[1] + b[1]
    assert not isinstance(a, tuple) and not isinstance(b, tuple)
    if rule == SUM:
        return a + b
    if rule == MAX:
        return max(a, b)
    return min(a, b)  # ALL


def render(snapshot: Snapshot) -> list:
    """Prometheus families from a snapshot (what ``/metrics`` shows)."""
    out = []
    for name, fam in FAMILIES.items():
        metric = _KINDS[fam.kind](name, fam.help, labels=list(fam.labels))
        buckets = snapshot.buckets.get(name, fam.buckets)
        for labels, v in snapshot.values.get(name, {}).items():
            if isinstance(v, tuple):
                metric.add_metric(list(labels), _cumulative(v[0], buckets), v[1])
            else:
                metric.add_metric(list(labels), v)
        out.append(metric)
    return out


def _les(buckets: tuple[float, ...]) -> list[str]:
    # Whole-number buckets (rows per batch) keep their integer labels: le="8", not le="8.0".
    return [str(b) if isinstance(b, int) else floatToGoString(b) for b in buckets] + ["+Inf"]


def _cumulative(counts: tuple[int, ...], buckets: tuple[float, ...]) -> list[tuple[str, int]]:
    les = _les(buckets)
    out, total = [], 0
    for le, n in zip(les, counts):
        total += n
        out.append((le, total))
    return out


_KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


RuntimeFamily = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def text(snapshot: Snapshot) -> str:
    """The snapshot's families in Prometheus text format 0.0.4, byte for byte what
    prometheus_client's ``generate_latest`` writes of :func:`render`'s families, written directly:
    that took about 8 ms a scrape for five models (its samples are objects, each name checked and
    each label escaped again), on the event loop's core and, in 5 ms turns, under its lock."""
    out: list[str] = []
    for name, fam in FAMILIES.items():
        kind = fam.kind
        base = name[:-6] if kind == "counter" and name.endswith("_total") else name
        shown = base + "_total" if kind == "counter" else base
        doc = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {kind}\n")
        series = snapshot.values.get(name)
        if not series:
            continue
        names = list(fam.labels)
        order = sorted(range(len(names)), key=names.__getitem__)  # (labels are written by name)
        les = _les(snapshot.buckets.get(name, fam.buckets)) if kind == "histogram" else []
        at = sum(names[i] < "le" for i in order)  # a bucket's "le" takes its place among them by name
        for labels, v in series.items():
            pairs = [f'{names[i]}="{_label_value(labels[i])}"' for i in order]
            plain = f"{{{','.join(pairs)}}}" if pairs else ""
            if not les:
                out.append(f"{shown}{plain} {floatToGoString(v)}\n")
                continue
            head, tail = "".join(p + "," for p in pairs[:at]), "".join("," + p for p in pairs[at:])
            counts, total = v  # type: ignore[misc]
            cum = 0
            for le, n in zip(les, counts):
                cum += n
                out.append(f'{base}_bucket{{{head}le="{le}"{tail}}} {floatToGoString(cum)}\n')
            out.append(f"{base}_count{plain} {floatToGoString(cum)}\n{base}_sum{plain} {floatToGoString(total)}\n")
    return "".join(out)


def exposition(snap: Snapshot, runtime: Iterable[Metric], triton: bool) -> bytes:
    """Prometheus text: the snapshot's families, the ``runtime`` ones (process_*, python_*) and,
    with ``triton``, Triton's nv_inference_* families from the same snapshot."""
    page = text(snap).encode() + generate_latest(_Scrape(list(runtime), ()))
    if not triton:
        return page
    return page + render_triton(snap.stats, snap.failures, snap.values.get("batchgate_queue_depth", {})).encode()


def by_worker(sources: dict[str, list[RuntimeFamily]]) -> list[Metric]:
    """Several processes' runtime families as one set, each series labelled ``worker``."""
    families: dict[str, Metric] = {}
    for worker, fams in sources.items():
        for name, kind, doc, samples in fams:
            m = families.get(name)
            if m is None:
                m = families[name] = Metric(name, doc, kind)
            for sample, labels, value in samples:
                m.add_sample(sample, {**labels, "worker": worker}, value)
    return list(families.values())


class _Scrape(Collector):
    """One scrape's families, rendered already, and the collectors read with them."""

    def __init__(self, families: list, collectors: tuple[Collector, ...]):
        self.families, self.collectors = families, collectors

    def collect(self) -> Iterator:
        yield from self.families
        for c in self.collectors:
            yield from c.collect()
