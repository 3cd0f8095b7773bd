"""The drift detector process: windows of sampled rows scored against reference profiles.

The gateway starts it (``monitoring/drift.py``) and talks to it over two pipes. It receives
batches of samples and commands; it sends back one message per scored window (scores, verdicts,
state), state-change events (also delivered to the webhook from here, ``drift_events.py``),
periodic counts, and replies to commands. Nothing here runs on the gateway's event loop or
holds its GIL: the tests and ADWIN cost what they cost, here.

A window closes when it holds the monitor's ``window.samples`` rows of its first input, or after
``window.max_s`` once it holds ``window.min_samples``; rows of a smaller time-closed window carry
on into the next. Invalid samples (a tensor whose column count differs from the profile) are
counted, not scored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.drift import Profile, build_profile, build_tensor, columns, feature_widths
from ..core.drift_monitors import MonitorSpec, Webhook
from ..core.drift_window import Debounce, Scorer
from .drift_events import DETECTED, RECOVERED, DeadLetter, EventSender, make_event

log = logging.getLogger("batchgate.drift")

Key = tuple[str, str]  # (side, tensor)
TICK_S = 0.2
COUNTS_EVERY_S = 1.0
SCORING_ALIVE_S = 600.0  # a window's scoring is told alive for at most this long (see _pulse)
COMMIT_RESERVE_S = 0.25  # a command is carried out only this long or more before its caller stops waiting


@dataclass
class Plan:
    """What the gateway hands the detector process at start (picklable)."""

    monitors: list[tuple[MonitorSpec, Profile, Profile | None]]  # spec, configured profile, rebaselined one
    source: str  # the CloudEvents source of this replica
    profiles_dir: str = ""
    dead_letter_file: str = ""
    dead_letter_max_events: int = 1000
    dead_letter_retry_s: float = 30.0
    rebaseline_max_rows: int = 10_000
    # Per model, the state a detector process before this one had reached (see carried_state):
    # a restart goes on from it instead of starting its debounce afresh.
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Events a detector process before this one had not settled when it died (see Unsettled).
    resend: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Watch:
    spec: MonitorSpec
    configured: Profile
    profile: Profile
    scorer: Scorer
    flag: Debounce
    features: dict[str, Debounce]
    widths: dict[Key, int]
    first: Key
    buffers: dict[Key, list[np.ndarray]] = field(default_factory=dict)
    rows: int = 0
    opened: float = 0.0  # when the window's first sample was offered (monotonic clock)
    last_offered: float = 0.0
    index: int = 0
    detections: int = 0
    recent: dict[Key, deque] = field(default_factory=dict)  # rows kept for a rebaseline
    recent_rows: dict[Key, int] = field(default_factory=dict)
    used: int = 0
    invalid: int = 0


class Detector:
    def __init__(self, plan: Plan, send):
        self.plan = plan
        self.send = send
        self.scoring_since: float | None = None  # when the window being scored began (see _pulse)
        self.watches: dict[str, Watch] = {}
        self.events: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        for spec, configured, rebaselined in plan.monitors:
            w = self.watches[spec.model] = self._watch(spec, configured, rebaselined or configured)
            _restore(w, plan.states.get(spec.model))
        dead = DeadLetter(plan.dead_letter_file, plan.dead_letter_max_events)
        dead.retarget({spec.model: _hook(spec.webhook) for spec, _, _ in plan.monitors if spec.webhook is not None})
        self.sender = EventSender(dead, plan.dead_letter_retry_s, self._count_event)
        kept = {str(entry["event"].get("id")) for entry in dead.events}
        for event in plan.resend:  # (in the order they were made; one kept in the dead letter is there)
            hook = next((s.webhook for s, _, _ in plan.monitors if s.model == event.get("subject")), None)
            if hook is not None and str(event.get("id")) not in kept:
                self.sender.send(event, _hook(hook))

    def _count_event(self, outcome: str) -> None:
        self.events[outcome] = self.events.get(outcome, 0) + 1

    def _watch(self, spec: MonitorSpec, configured: Profile, profile: Profile) -> Watch:
        widths = feature_widths(spec, profile)
        return Watch(
            spec,
            configured,
            profile,
            Scorer(spec, profile),
            Debounce(spec.debounce_windows),
            {f.name: Debounce(spec.debounce_windows) for _, _, f in profile.features(spec.outputs)},
            widths,
            ("input", spec.inputs[0]),
        )

    # ---------------------------------------------------------------- samples
    def add(
        self, model: str, first: float, last: float, tensors: dict[Key, np.ndarray], count: int, now: float
    ) -> None:
        """``count`` samples of ``model`` (their rows stacked per tensor), offered between
        ``first`` and ``last`` (the gateway's monotonic clock). A window is filled to exactly
        its size; the rest of the rows start the next one."""
        w = self.watches.get(model)
        if w is None:
            return
        blocks: dict[Key, np.ndarray] = {}
        for key, array in tensors.items():
            width = w.widths.get(key)
            if width is None:
                continue
            cols = columns(array)
            if cols.shape[1] != width:
                w.invalid += count
                return
            blocks[key] = cols
        if w.first not in blocks:
            w.invalid += count
            return
        w.used += count
        rows = blocks[w.first].shape[0]
        start = 0
        while start < rows:
            if not w.rows:
                w.opened = first
            take = min(rows - start, w.spec.window_samples - w.rows)
            for key, cols in blocks.items():
                part = cols[start : start + take]
                w.buffers.setdefault(key, []).append(part)
                self._remember(w, key, part)
            w.rows += take
            start += take
            w.last_offered = last
            if w.rows >= w.spec.window_samples:
                self.close(w, now)
                first = last

    def refused(self, model: str, count: int, error: Exception) -> None:
        """Samples that could not be scored: counted as invalid, logged at most once a minute
        per monitor; the window they were in is started afresh."""
        w = self.watches.get(model)
        if w is None:
            return
        w.invalid += count
        w.buffers, w.rows = {}, 0
        now = time.monotonic()
        if now - self._logged.get(model, -1e9) >= 60.0:
            self._logged[model] = now
            log.warning("drift monitor of '%s': samples could not be scored: %s", model, str(error)[:512])

    def _remember(self, w: Watch, key: Key, cols: np.ndarray) -> None:
        ring = w.recent.setdefault(key, deque())
        ring.append(cols)
        total = w.recent_rows.get(key, 0) + cols.shape[0]
        while total - ring[0].shape[0] >= self.plan.rebaseline_max_rows:
            total -= ring.popleft().shape[0]
        w.recent_rows[key] = total

    def tick(self, now: float) -> None:
        for w in self.watches.values():  # (opened: the gateway's monotonic clock, the same as ours)
            if w.rows >= w.spec.min_window_samples and now - w.opened >= w.spec.window_max_s:
                self.close(w, now)

    # ---------------------------------------------------------------- windows
    def close(self, w: Watch, now: float) -> None:
        block = {key: np.concatenate(parts) for key, parts in w.buffers.items() if parts}
        w.buffers = {}
        rows, span = w.rows, max(0.0, w.last_offered - w.opened)
        w.rows = 0
        started = self.scoring_since = time.monotonic()
        try:
            result = w.scorer.score(block)
        finally:
            self.scoring_since = None
        w.index += 1
        changed = w.flag.step(result.drifted_window)
        detected = []
        for name, flag in w.features.items():
            flag.step(name in result.drifted)
            if flag.on:
                detected.append(name)
        if changed and w.flag.on:
            w.detections += 1
        scored = time.monotonic()
        self.send(
            (
                "window",
                w.spec.model,
                {
                    "index": w.index,
                    "rows": rows,
                    "span_s": span,
                    "lag_s": max(0.0, scored - w.last_offered),
                    "score_s": scored - started,
                    "result": result.summary(),
                    "active": w.flag.on,
                    "detected": detected,
                    "detections": w.detections,
                    "profile_id": w.profile.id,
                },
            )
        )
        if changed:
            self._announce(w, result, rows, span)

    def _announce(self, w: Watch, result, rows: int, span: float, reason: str = "") -> None:
        """The event of a state change: of a window (``result``), or of a reset or rebaseline
        (``reason``, no result) that leaves the drifted state."""
        scorer = w.scorer
        drifted = []
        for name in result.drifted if result is not None else ():
            fs = result.features[name]
            tests = {}
            for test in sorted(fs.decided):
                entry: dict[str, Any] = {"score": fs.scores.get(test)}
                if test in fs.pvalues:
                    entry.update(p_value=fs.pvalues[test], p_threshold=result.threshold)
                elif test == "psi":
                    entry["threshold"] = w.spec.psi_threshold
                elif test == "adwin":  # (its bound: until 2026-12-06 the entry held the score alone)
                    entry["threshold"] = scorer.adwin_bound
                tests[test] = entry
            drifted.append({"feature": name, "tests": tests})
        data = {
            "model": w.spec.model,
            "state": "detected" if w.flag.on else "recovered",
            "window": {"index": w.index, "rows": rows, "seconds": round(span, 3)},
            "drifted_features": drifted,
            "features_watched": len(scorer.layout),
            "min_drifted_features": scorer.needed,
            "alpha": w.spec.alpha,
            "correction": w.spec.correction,
            "profile_id": w.profile.id,
            "detections": w.detections,
        }
        if reason:
            data["reason"] = reason
        event = make_event(DETECTED if w.flag.on else RECOVERED, self.plan.source, w.spec.model, data)
        self.send(("event", w.spec.model, event))
        if w.spec.webhook is not None:
            self.sender.send(event, _hook(w.spec.webhook))

    # ---------------------------------------------------------------- commands
    def command(self, name: str, args: dict[str, Any], until: float = math.inf) -> dict[str, Any]:
        """A reset or rebaseline, carried out only while its answer can still reach its caller
        (``until``: when the caller stops waiting, ``time.monotonic()``); see :func:`_in_time`."""
        w = self.watches.get(str(args.get("model")))
        if w is None:
            raise KeyError(f"no drift monitor for model '{str(args.get('model'))[:128]}'")
        _in_time(name, until)
        if name == "reset":
            profile = w.configured if args.get("reference") else w.profile
            if args.get("reference"):
                self._forget_saved(w.spec.model)
            self._carry(w, profile, "reset")
            return {"profile_id": profile.id}
        if name == "rebaseline":
            return self._rebaseline(w, int(args.get("rows") or self.plan.rebaseline_max_rows), until)
        raise KeyError(f"unknown command {name!r}")

    def _carry(self, w: Watch, profile: Profile, reason: str) -> Watch:
        """A fresh watch in place of ``w`` (windows, debounce and ADWIN's state forgotten; counts
        and the rows kept for a rebaseline carried). Leaving the drifted state so is announced
        like any recovery (``reason``: reset or rebaseline), so a receiver never stays waiting
        for a recovery that would not come."""
        fresh = self._watch(w.spec, w.configured, profile)
        fresh.recent, fresh.recent_rows, fresh.index = w.recent, w.recent_rows, w.index
        fresh.detections, fresh.used, fresh.invalid = w.detections, w.used, w.invalid
        self.watches[w.spec.model] = fresh
        if w.flag.on:
            self._announce(fresh, None, 0, 0.0, reason)
        return fresh

    def _rebaseline(self, w: Watch, rows: int, until: float = math.inf) -> dict[str, Any]:
        have = w.recent_rows.get(w.first, 0)
        need = max(10, w.spec.min_window_samples)  # (fewer than a scored window's rows: no reference)
        if rows < need:  # (the check counted the rows kept, then took only the last `rows`)
            raise ValueError(f"a rebaseline takes at least {need} rows (the window's min_samples), not {rows}")
        if have < need:
            raise ValueError(
                f"only {have} live rows of '{w.spec.model}' are kept so far; a rebaseline needs at least {need}"
            )
        kinds = {f.name: f.kind for _, _, f in w.profile.features(True)}
        sides: dict[str, dict[str, Any]] = {"input": {}, "output": {}}
        names: dict[Key, list[str]] = {}
        for side, tensor, f in w.profile.features(w.spec.outputs):
            names.setdefault((side, tensor), []).append(f.name)
        taken = 0
        for key, feature_names in names.items():
            ring = w.recent.get(key)
            if not ring:
                continue
            array = np.concatenate(list(ring))[-rows:]
            taken = max(taken, array.shape[0])
            sides[key[0]][key[1]] = build_tensor(
                key[1],
                array,
                feature_names,
                categorical=[n for n in feature_names if kinds[n] == "categorical"],
                numeric=[n for n in feature_names if kinds[n] == "numeric"],
            )
        outputs = {**w.profile.outputs, **sides["output"]}  # outputs no request asked for keep their profile
        profile = build_profile(
            w.spec.model,
            sides["input"],
            outputs,
            {"live": True, "rows": taken, "based_on": w.configured.id, "taken": time.time()},
        )
        _in_time("rebaseline", until)  # (building it took a while: it may be too late now)
        self._save(w.spec.model, profile)
        self._carry(w, profile, "rebaseline")
        return {"profile_id": profile.id, "rows": taken}

    def _saved_path(self, model: str) -> str:
        return os.path.join(self.plan.profiles_dir, f"{model}.json")  # model: checked against MODEL_NAME

    def _save(self, model: str, profile: Profile) -> None:
        if not self.plan.profiles_dir:
            return
        path = self._saved_path(model)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(profile.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _forget_saved(self, model: str) -> None:
        if self.plan.profiles_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._saved_path(model))

    def counts(self) -> dict[str, Any]:
        return {
            "samples": {m: {"used": w.used, "invalid": w.invalid} for m, w in self.watches.items()},
            "events": dict(self.events),
            "dead_letter": len(self.sender.dead),
            "unsettled": self.sender.unsettled(),
            "cpu_s": time.process_time(),
            "pid": os.getpid(),
        }


def carried_state(active: int, detected: dict[str, int], detections: int, status: dict[str, Any]) -> dict[str, Any]:
    """What a restarted detector takes over of a monitor, as the gateway last heard it: the
    drifted state and features, the detections and the window index. Started afresh (until
    2026-12-06), a detector restarted in the drifted state never announced the recovery its
    receiver waited for, and announced a drift still present as a new detection."""
    last = status.get("last_window") or {}
    return {
        "active": bool(active),
        "detected": sorted(f for f, on in detected.items() if on),
        "detections": int(detections),
        "index": int(last.get("index", 0)),
    }


def carried_states(monitors: dict[str, Any], specs: Any, status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`carried_state` of each monitor in ``specs``, from its figures (``DriftMetrics``) and status."""
    return {
        m: carried_state(dm.active, dm.detected, dm.detections, status.get(m, {}))
        for m, dm in monitors.items()
        if m in specs
    }


class Unsettled:
    """The gateway's copy of the events a detector process made and has not yet settled
    (delivered, or kept in the dead-letter file): a detector that dies (killed as hung, out of
    memory) loses those it was queueing or retrying, so the next one is handed them (``Plan.resend``)
    and delivers them again under their ids (at least once: one whose delivery had just ended
    well arrives twice). Until 2026-12-06 they were lost."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}  # id -> event, in the order they were made

    def add(self, event: dict[str, Any]) -> None:
        self.events[str(event.get("id"))] = event

    def settle(self, unsettled: list[str]) -> None:
        """The detector's list of ids still unsettled (its counts, which follow every event it sent)."""
        keep = set(unsettled)
        self.events = {i: e for i, e in self.events.items() if i in keep}


def _restore(w: Watch, state: dict[str, Any] | None) -> None:
    if not state:
        return
    w.flag.on = bool(state["active"])
    for name in state["detected"]:
        if name in w.features:
            w.features[name].on = True
    w.detections, w.index = int(state["detections"]), int(state["index"])


def _hook(hook: Webhook) -> dict[str, Any]:
    """A webhook as events carry it (into the dead letter too)."""
    return {"url": hook.url, "format": hook.format, "timeout_s": hook.timeout_s, "retries": hook.retries}


def _in_time(name: str, until: float) -> None:
    """Raises TimeoutError (answered DEADLINE_EXCEEDED, as the caller's own wait) when a command's answer could no
    longer reach its caller: less than ``COMMIT_RESERVE_S`` before ``until``, the time the
    answer takes back. Checked as the command is read and again just before a rebaseline is
    kept (its profile is built first): one read just in time was kept after its caller was told
    it failed (504, DEADLINE_EXCEEDED)."""
    late = time.monotonic() - (until - COMMIT_RESERVE_S)
    if late > 0:
        log.warning("drift: a %s command was dropped, too late for its caller (by %.3f s)", name, late)
        raise TimeoutError(f"the {name} came too late for its caller: dropped")


def _pulse(detector: Detector, send, every_s: float = COUNTS_EVERY_S) -> None:
    """While a window is being scored, say so every ``every_s``: the detector reports between
    windows only, and a large window takes longer than ``drift_detector_hang_s`` (100,000 rows
    of 512 features: 24 s here), so the gateway's watchdog killed a busy detector again and again
    and no window was ever scored. For at most ``SCORING_ALIVE_S`` of one window: a scoring that
    never ends is still a hang."""
    while True:
        time.sleep(every_s)
        since = detector.scoring_since
        if since is not None and time.monotonic() - since < SCORING_ALIVE_S:
            try:
                send(("alive",))
            except (OSError, ValueError):  # the gateway is gone
                return


def main(inbox, outbox, plan: Plan) -> None:
    """The detector process's entry point (multiprocessing, spawn)."""
    if hasattr(os, "nice"):
        os.nice(5)  # below the gateway's own threads
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s drift-detector %(levelname)s %(message)s")
    lock = threading.Lock()  # (the pulse's thread sends too: one message at a time on the pipe)

    def send(msg) -> None:
        with lock:
            outbox.send(msg)

    detector = Detector(plan, send)
    threading.Thread(target=_pulse, args=(detector, send), name="drift-pulse", daemon=True).start()
    send(("up", os.getpid()))
    last_counts = 0.0
    try:
        while True:
            now = time.monotonic()
            if inbox.poll(TICK_S):
                msg = inbox.recv()
                kind = msg[0]
                now = time.monotonic()
                if kind == "samples":
                    for model, first, last, tensors, count in msg[1]:
                        try:
                            detector.add(model, first, last, tensors, count, now)
                        except Exception as e:  # samples that do not fit (a type the profile cannot take)
                            detector.refused(model, count, e)
                elif kind == "command":
                    _, ident, name, args, until = msg
                    if now > until:  # its caller was told it timed out: it must not happen now
                        log.warning(
                            "drift: a %s command came %.1f s after its caller gave up: dropped", name, now - until
                        )
                    else:
                        try:
                            send(("reply", ident, True, detector.command(name, args, until)))
                        except TimeoutError as e:  # (too late: answered as the caller's own timeout)
                            send(("reply", ident, None, str(e)[:1024]))
                        except (KeyError, ValueError) as e:  # (the caller's: too few rows, an unknown model)
                            send(("reply", ident, False, str(e)[:1024]))
                        except OSError as e:  # (ours: the profile could not be kept; nothing changed)
                            send(("reply", ident, "failed", f"the detector could not carry it out: {e}"[:1024]))
                elif kind == "stop":
                    break
            try:
                detector.tick(now)
            except Exception:
                log.exception("drift: a window could not be scored")
            if now - last_counts >= COUNTS_EVERY_S:
                send(("counts", detector.counts()))
                last_counts = now
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            send(("counts", detector.counts()))
        detector.sender.close()
