"""bench/common.py's view of a server's threads on the core (``thread_times``,
``thread_shares``) and bench/overload_report.py's summary row that carries it, with the
reference server's refusal p99 beside batchgate's."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402
import overload_report  # noqa: E402


def test_shares_from_two_readings():
    pid = 100
    before = {100: ("python", 1_000_000_000, 500_000_000), 101: ("python", 0, 0)}
    after = {
        100: ("python", 1_600_000_000, 900_000_000),  # ran 0.6 s, waited 0.4 s
        101: ("python", 300_000_000, 10_000_000),  # ran 0.3 s
        102: ("python", 100_000_000, 0),  # started between the readings: all its time counts
    }
    shares = common.thread_shares(before, after, pid, 1.0)
    assert shares == {"loop_running": 0.6, "loop_waiting_for_core": 0.4, "other_threads_running": 0.4}
    assert common.thread_shares(before, {}, pid, 1.0) == {}  # the process is gone


def test_a_busy_thread_is_seen_running_and_a_sleeping_main_thread_is_not():
    pid = os.getpid()
    before = common.thread_times(pid)
    assert pid in before  # (the main thread's tid is the pid)
    stop, spun, leave = time.monotonic() + 0.3, threading.Event(), threading.Event()

    def spin():
        while time.monotonic() < stop:
            pass
        spun.set()
        leave.wait()  # (a thread that has ended is no longer in /proc: read it while it is there)

    t0 = time.monotonic()
    worker = threading.Thread(target=spin)
    worker.start()
    spun.wait()
    shares = common.thread_shares(before, common.thread_times(pid), pid, time.monotonic() - t0)
    leave.set()
    worker.join()
    assert shares["other_threads_running"] > 0.3  # (of a wall time that is mostly the spin)
    assert shares["loop_running"] < 0.3
    assert 0 <= shares["loop_waiting_for_core"] < 0.5


def test_summary_row_carries_the_loop_wait_and_the_reference_p99():
    cap = {"ok_per_s": 1000.0, "ok_p99_ms": 20.0}
    over = {
        "offered_per_s": 3000.0,
        "ok_per_s": 850.0,
        "ok_p99_ms": 35.0,
        "refusal_p99_ms": 12.0,
        "cancelled": 0,
        "closed_or_reset": 0,
        "queue_depth_mean": 30.0,
        "client_in_system": 31.0,
        "threads": {"loop_running": 0.5, "loop_waiting_for_core": 0.42, "other_threads_running": 0.48},
    }
    reference = {"overload-http": {"refusal_p99_ms": 1.5}}
    (row,) = overload_report.summary(cap, cap, None, over, None, None, reference)
    assert row["phase"] == "HTTP 3x open"
    assert row["ok_p99_ratio"] == 1.75
    assert row["nginx_refusal_p99_ms"] == 1.5
    assert row["loop_waiting_for_core"] == 0.42
    (row,) = overload_report.summary(cap, cap, over, None, None)  # no reference run
    assert row["phase"] == "gRPC 3x open" and row["nginx_refusal_p99_ms"] is None
