"""A route's rollout window across worker processes: exported, merged on the leader, with the
latency histogram whole and the answers' samples weighted by the traffic each stands for."""

from __future__ import annotations

import random

import numpy as np

from batchgate.core.psi import MAX_PSI_COLUMNS, judged_columns, two_sample_psi
from batchgate.routes import OUTPUT_SAMPLES, Window, _bounded


def _window(requests: int, latency_us: int, value: float, answers: int) -> Window:
    w = Window()
    rng = random.Random(1)
    for _ in range(requests):
        w.requests += 1
        w.latency.record_value(latency_us)
    for _ in range(answers):
        w.keep(np.full((1, 3), value, np.float32), rng)
    return w


def test_merged_figures_add_counts_and_take_the_p99_of_the_union():
    busy, quiet = _window(990, 1000, 1.0, 0), _window(10, 500_000, 0.0, 0)
    merged = Window()
    merged.absorb(busy.export())
    merged.absorb(quiet.export())
    f = merged.figures()
    assert f.requests == 1000
    assert 0.00099 <= f.p99_s <= 0.00102  # 1 ms: the slow 1% sits above the 99th percentile
    quiet2 = _window(20, 500_000, 0.0, 0)
    merged.absorb(quiet2.export())
    assert merged.figures().p99_s > 0.4  # now 3% are slow


def test_answer_samples_count_by_the_answers_they_stand_for():
    busy, quiet = _window(0, 1, 1.0, 5000), _window(0, 1, 0.0, 50)
    merged = Window()
    merged.absorb(busy.export())
    merged.absorb(quiet.export())
    outputs = merged.figures().outputs
    assert outputs.shape[0] <= OUTPUT_SAMPLES
    share_quiet = float((outputs[:, 0] == 0.0).mean())
    assert share_quiet < 0.03  # ~1% of the answers, not half of the sample


def test_what_one_worker_sends_is_bounded():
    samples = [np.zeros((64, 1000), np.float32) for _ in range(512)]  # 131 MB kept
    sent = _bounded(samples)
    assert sum(a.nbytes for a in sent) <= 8 << 20 and len(sent) > 10
    small = [np.zeros((1, 3), np.float32)] * 5
    assert _bounded(small) == small


def test_workers_that_kept_answers_of_different_widths_merge_on_the_width_most_rows_have():
    """Each worker keeps the width of its first answer; two that saw different widths (a model
    reloaded between their first answers) made the merged figures raise (np.concatenate) and the
    interval's gates were never judged."""
    old, new = Window(), Window()
    rng = random.Random(1)
    for _ in range(10):
        old.keep(np.zeros((1, 3), np.float32), rng)
    for _ in range(40):
        new.keep(np.ones((1, 5), np.float32), rng)
    merged = Window()
    merged.absorb(old.export())
    merged.absorb(new.export())
    outputs = merged.figures().outputs
    assert outputs.shape[1] == 5 and (outputs == 1).all()


def test_a_wide_answer_is_kept_by_the_columns_the_gate_judges_only():
    """The output PSI gate judges at most MAX_PSI_COLUMNS columns, but the window kept every
    answer whole: 512 answers of a model answering a million values were gigabytes a variant
    (and the judgement copied them all to float64). The columns kept are the ones judged, so the
    figures are those of the whole answers; a worker's export says the width they came from."""
    rng, pick = np.random.default_rng(0), random.Random(1)
    answers = [rng.random((2, 5000)).astype(np.float32) for _ in range(60)]
    w = Window()
    for a in answers:
        w.keep(a, pick)
    kept = w.figures().outputs
    assert kept.shape == (120, MAX_PSI_COLUMNS)
    other = rng.random((150, 5000))
    assert two_sample_psi(kept, other[:, judged_columns(5000)]) == two_sample_psi(np.concatenate(answers), other)
    merged = Window()
    merged.absorb(w.export())
    assert merged.figures().outputs.shape == (120, MAX_PSI_COLUMNS)
