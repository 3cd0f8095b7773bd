"""Drift monitoring, the gateway's side: sampling on the request path, the detector process,
its results as metrics, status, commands (reset, rebaseline) and audit lines.

On the request path (:meth:`DriftService.watch`, from ``DataPlane.infer``) a monitored model's
request is sampled with its monitor's ``sample_rate`` (never synthetic traffic); when its answer
comes, the watched inputs' rows (and outputs' with ``outputs: true``), at most
``max_rows_per_sample`` of them, are copied and put on a bounded queue (``drift_queue_samples``);
when the queue is full the sample is dropped and counted. A sender thread moves what gathered to
the detector process (``drift_detector.py``) in batches over a pipe; a reader thread takes its
answers and writes the metrics. The event loop only copies rows and appends to a deque.

A monitor on a route sees every request addressed to the route, whichever variant answered; a
monitor on a model sees the requests addressed to it and those a route sent it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from random import random
from typing import Any, Protocol

import numpy as np

from ..core.drift import Profile, feature_widths
from ..core.drift_monitors import MonitorSpec
from ..core.errors import ConfigError, ErrorCode, GatewayError, invalid, not_found
from ..core.rate import Backoff
from ..core.signature import ModelSignature
from ..core.types import InferRequest, InferResponse, clip
from ..settings_sections import DriftSettings
from .drift_checks import check_dead_letter, check_monitor, read_profile  # noqa: F401  (part of this module's interface)
from .drift_detector import Plan, Unsettled, carried_states
from .drift_detector import main as detector_main
from .drift_samples import sample as _sample
from .drift_samples import stacked
from .metrics import DriftMetrics, Metrics

log = logging.getLogger("batchgate")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # exits in a row, each within a minute of its start
SEND_GATHER_S = 0.02  # a batch for the detector gathers this long after its first sample
COMMAND_TIMEOUT_S = 30.0
Audit = Callable[[str, str, str, str], Awaitable[None]]


class Tap:
    """One monitor's sampling on the request path."""

    __slots__ = ("model", "rate", "inputs", "outputs", "max_rows", "metrics", "widths")

    def __init__(
        self,
        spec: MonitorSpec,
        metrics: DriftMetrics,
        outputs: frozenset[str] = frozenset(),
        widths: dict[tuple[str, str], int] | None = None,
    ):
        self.model = spec.model
        self.rate = spec.sample_rate
        self.inputs = frozenset(spec.inputs)
        self.outputs = outputs  # the profiled outputs (none without 'outputs: true')
        self.max_rows = spec.max_rows_per_sample
        self.metrics = metrics
        # Each tensor's features in the profile: a sample of another width is refused here, before
        # it is copied (a tensor of dynamic width could otherwise queue megabytes a sample).
        self.widths = widths or {}


class DriftLink(Protocol):
    """How a worker process's drift service reaches the one detector, the supervisor's."""

    def forward(self, message: tuple) -> None:
        """Samples for the detector (called on the event loop; never waits)."""

    async def call(self, op: str, **args: Any) -> Any:
        """``drift_status`` / ``drift_command`` of the supervisor's service."""


class DriftService:
    def __init__(
        self,
        specs: tuple[MonitorSpec, ...],
        settings: DriftSettings,
        metrics: Metrics,
        audit: Audit,
        link: DriftLink | None = None,
    ):
        # With ``link`` (one of several worker processes): sampling here, the detector, its
        # figures, status and commands in the supervisor (supervisor.py), fed by every worker.
        self.link = link
        self.incoming: deque = deque()  # sample groups from worker processes (the supervisor's service)
        self.specs = {s.model: s for s in specs}
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.taps: dict[str, Tap] = {}
        self.plan: Plan | None = None
        self.status_by_model: dict[str, dict[str, Any]] = {}
        self.queue: deque = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._backoff = Backoff(RESTART_BACKOFF_S)  # before each restart of the detector
        self._heard_at = float("inf")  # when the detector last said anything (see _watch)
        self._process: Any = None
        self._inbox: Any = None  # our end of the pipe to the detector
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self.detector_pid: int | None = None
        self._invalid_here: dict[str, int] = {}  # samples that could not be taken, per model
        self._latest: dict[str, Any] | None = None  # the running detector's last counts
        self._carried: dict[str, Any] = {"samples": {}, "events": {}, "cpu_s": 0.0}  # of those before
        self._unsettled = Unsettled()  # events the detector has not delivered (nor kept in its file) yet

    # ---------------------------------------------------------------- start / stop
    def prepare(self, signatures: dict[str, ModelSignature | None]) -> None:
        """Read every profile and check each monitor against its model's signature (a route's
        signature is its variants'); anything wrong is a ConfigError and the server does not start.
        A name mapped to None is a remote model (or a route) not loaded yet, its upstream down:
        the gateway serves it once it loads, so its monitor starts too, checked against the
        profile alone (a warning says so)."""
        # the detector process imports them; only whether they are there is checked here (importing
        # scipy would cost the gateway's start seconds and memory it never uses)
        missing = [m for m in ("river", "scipy") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"drift monitors need the drift extra ({', '.join(missing)} not installed): "
                "pip install 'batchgate[drift]'"
            )
        s = self.settings
        monitors = []
        if s.drift_profiles_dir:
            try:
                os.makedirs(s.drift_profiles_dir, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"drift_profiles_dir {s.drift_profiles_dir}: {e.strerror}") from None
        if s.drift_dead_letter_file:
            check_dead_letter(s.drift_dead_letter_file)
        for model, spec in self.specs.items():
            if model not in signatures:
                raise ConfigError(f"drift monitor of '{model}': no model or route of that name is served")
            sig = signatures[model]
            profile = read_profile(spec.reference)
            check_monitor(spec, profile, sig, s.drift_max_features)
            if s.drift_rebaseline_max_rows < spec.min_window_samples:  # (a rebaseline could never be taken)
                raise ConfigError(
                    f"drift monitor of '{model}': window.min_samples {spec.min_window_samples} is more than "
                    f"drift_rebaseline_max_rows {s.drift_rebaseline_max_rows}, the live rows kept for a rebaseline, "
                    "which needs at least min_samples: raise drift_rebaseline_max_rows or lower min_samples"
                )
            if sig is None:
                log.warning(
                    "drift monitor of '%s': the model is not loaded yet (its upstream is down); the monitor "
                    "starts checked against its profile only: samples of another width are counted invalid",
                    model,
                )
            saved = self._saved(model, profile)
            monitors.append((spec, profile, saved))
            dm = self.metrics.drift(model)
            outputs = frozenset(profile.outputs) if spec.outputs else frozenset()
            self.taps[model] = Tap(spec, dm, outputs, feature_widths(spec, profile))
            self.status_by_model[model] = {"model": model, "profile_id": (saved or profile).id, "windows": 0}
        source = s.drift_event_source or f"/batchgate/{socket.gethostname()[:200]}"
        self.plan = Plan(
            monitors,
            source,
            s.drift_profiles_dir,
            s.drift_dead_letter_file,
            s.drift_dead_letter_max_events,
            s.drift_dead_letter_retry_s,
            s.drift_rebaseline_max_rows,
        )
        assert self.metrics.detector is not None or not monitors
        if self.link is not None:  # the detector's figures are the supervisor's
            self.metrics.detector = None
        elif self.metrics.detector is not None:
            self.metrics.detector.queue_depth = lambda: len(self.queue) + sum(g[4] for g in list(self.incoming))

    def _saved(self, model: str, configured: Profile) -> Profile | None:
        """A rebaselined profile kept in drift_profiles_dir, if it was taken from this reference."""
        d = self.settings.drift_profiles_dir
        if not d:
            return None
        path = os.path.join(d, f"{model}.json")
        if not os.path.exists(path):
            return None
        try:
            saved = read_profile(path)
        except ConfigError as e:
            log.warning("drift: ignoring the rebaselined profile of '%s': %s", model, e)
            return None
        if saved.source.get("based_on") != configured.id:
            log.info("drift: the reference of '%s' changed since its rebaseline; using the configured one", model)
            return None
        return saved

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self.link is None:
            self._spawn()
            if self.settings.drift_detector_hang_s:
                loop.call_later(1.0, self._watch)
        sender = threading.Thread(target=self._send_samples, name="batchgate-drift-send", daemon=True)
        sender.start()
        self._threads.append(sender)

    def _watch(self) -> None:
        """On the loop, every second: a detector not heard from for drift_detector_hang_s (hung, or
        stopped: it reports every second) is killed; its reader then starts another."""
        if self._stopping:
            return
        proc, det = self._process, self.metrics.detector
        hang_s = self.settings.drift_detector_hang_s
        if proc is not None and proc.is_alive() and time.monotonic() - self._heard_at > hang_s:
            log.error("drift: the detector process (pid %s) has not reported for %g s: killing it", proc.pid, hang_s)
            if det is not None:
                det.up = 0
            proc.kill()
            self._heard_at = float("inf")  # (once: its reader starts the next, judged from its "up")
        assert self._loop is not None
        self._loop.call_later(1.0, self._watch)

    def _spawn(self) -> None:
        self._heard_at = float("inf")  # (judged once it says it is up: starting takes its imports' time)
        ctx = multiprocessing.get_context("spawn")
        to_child_r, to_child_w = ctx.Pipe(duplex=False)
        from_child_r, from_child_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=detector_main, args=(to_child_r, from_child_w, self.plan), name="batchgate-drift", daemon=True
        )
        proc.start()
        to_child_r.close()
        from_child_w.close()
        self._process, self._inbox = proc, to_child_w
        reader = threading.Thread(
            target=self._read, args=(from_child_r, proc), name="batchgate-drift-read", daemon=True
        )
        reader.start()
        self._threads.append(reader)

    def stop(self, wait_s: float = 3.0) -> None:
        self._stopping = True
        self._wake.set()
        proc = self._process
        if proc is None:
            for t in self._threads:
                t.join(1.0)
            return
        if self._send_lock.acquire(timeout=1.0):  # a send stuck on a full pipe: terminate below
            try:
                self._inbox.send(("stop",))
            except (OSError, ValueError):
                pass
            finally:
                self._send_lock.release()
        proc.join(wait_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(1.0)
        for t in self._threads:
            t.join(1.0)

    # ---------------------------------------------------------------- request path
    def watch(
        self,
        answer: Awaitable[InferResponse],
        request: InferRequest,
        variant: str | None,
        sampled: bool | None = None,
    ) -> Awaitable[InferResponse]:
        """``answer`` itself, or (for a sampled request) a coroutine that awaits it and then
        offers the sample. ``sampled``: True when it was decided already (a remote model's gRPC
        request, before its fast path: ``DataPlane.drift_sampled``)."""
        tap = self.taps.get(request.model_name)
        if tap is None and variant is not None:
            tap = self.taps.get(variant)
        if tap is None or (not sampled and random() >= tap.rate):
            return answer
        return self._sampled(answer, request, tap)

    async def _sampled(self, answer: Awaitable[InferResponse], request: InferRequest, tap: Tap) -> InferResponse:
        resp = await answer
        try:
            self.offer(tap, request, resp)
        except Exception:  # a sample that cannot be taken never fails the caller's request
            self._invalid_here[tap.model] = self._invalid_here.get(tap.model, 0) + 1
            tap.metrics.samples["invalid"] += 1
        return resp

    def offer(self, tap: Tap, request: InferRequest, resp: InferResponse) -> None:
        if len(self.queue) >= self.settings.drift_queue_samples:
            tap.metrics.samples["dropped"] += 1
            return
        rows = tap.max_rows
        tensors: dict[tuple[str, str], np.ndarray] = {}
        widths = tap.widths
        for t in request.inputs:
            if t.name in tap.inputs:
                tensors[("input", t.name)] = _sample(t.data, rows, widths.get(("input", t.name)))
        if tap.outputs:
            for o in resp.outputs:
                if o.name in tap.outputs:
                    tensors[("output", o.name)] = _sample(o.data, rows, widths.get(("output", o.name)))
        empty = not self.queue
        self.queue.append((tap.model, time.monotonic(), tensors))
        if empty:
            self._wake.set()

    def take(self, groups: list[tuple]) -> None:
        """Sample groups a worker process gathered (the supervisor's service): queued for the
        detector like samples of its own; dropped and counted when the queue is full."""
        waiting = len(self.queue) + sum(g[4] for g in list(self.incoming))
        for g in groups:
            if waiting + g[4] > self.settings.drift_queue_samples:
                self._dropped(g[0], g[4])
                continue
            waiting += g[4]
            self.incoming.append(g)
        self._wake.set()

    def _send_samples(self) -> None:
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            if not self.queue and not self.incoming:
                continue
            time.sleep(SEND_GATHER_S)
            batch = []
            while self.queue:
                batch.append(self.queue.popleft())
            groups = stacked(batch)
            while self.incoming:
                groups.append(self.incoming.popleft())
            try:
                self._send(("samples", groups))
            except (OSError, ValueError, AttributeError):
                if self._loop is not None:  # the detector is gone (restarting): counted, not kept
                    for model, _, _, _, count in groups:
                        self._loop.call_soon_threadsafe(self._dropped, model, count)

    def _dropped(self, model: str, count: int) -> None:
        self.metrics.drift(model).samples["dropped"] += count

    def _send(self, message: tuple) -> None:
        link = self.link
        if link is not None:  # to the supervisor, from the loop (the channel is the loop's)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(link.forward, message)
            return
        with self._send_lock:
            self._inbox.send(message)

    def _send_command(self, message: tuple) -> None:
        """A command to the detector (on a worker thread); TimeoutError when the pipe stays held
        for the command's whole time (the thread is never left waiting for good)."""
        if not self._send_lock.acquire(timeout=max(0.0, message[-1] - time.monotonic())):
            raise TimeoutError
        try:
            self._inbox.send(message)
        finally:
            self._send_lock.release()

    # ---------------------------------------------------------------- the detector's answers
    def _read(self, conn, proc) -> None:
        det = self.metrics.detector
        assert det is not None
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "window":
                    self._window(msg[1], msg[2])
                elif kind == "event":
                    self._event(msg[1], msg[2])
                elif kind == "counts":
                    self._counts(msg[1])
                elif kind == "reply":
                    self._reply(msg[1], msg[2], msg[3])
                elif kind == "up":
                    det.up = 1
                    self.detector_pid = msg[1]
                    self._backoff.started()
                self._heard_at = time.monotonic()
        except (EOFError, OSError):
            pass
        det.up = 0
        self._carry_counts()
        self._fail_replies("the drift detector process stopped")
        if self._stopping:
            return
        proc.join(1.0)
        log.error("drift: the detector process exited (code %s); restarting it", proc.exitcode)
        time.sleep(self._backoff.delay())
        if not self._stopping:
            det.restarts += 1
            assert self.plan is not None  # a rebaseline kept in drift_profiles_dir survives the restart
            self.plan.monitors = [
                (spec, configured, self._saved(spec.model, configured)) for spec, configured, _ in self.plan.monitors
            ]
            self.plan.states = carried_states(self.metrics.drift_monitors(), self.specs, self.status_by_model)
            self.plan.resend = list(self._unsettled.events.values())  # (events it had not delivered yet)
            self._spawn()

    def _window(self, model: str, w: dict[str, Any]) -> None:
        dm = self.metrics.drift(model)
        result = w["result"]
        scores: dict[tuple[str, str], float] = {}
        quality: dict[tuple[str, str], int] = {}
        for feature, fs in result["features"].items():
            for test, v in fs["scores"].items():
                scores[(feature, test)] = float(v)
            for kind, rate in fs["quality"].items():
                scores[(feature, kind)] = float(rate)
                quality[(feature, kind)] = int(kind in fs["alarms"])
        detected = set(w["detected"])
        dm.scores = scores
        dm.quality = quality
        dm.detected = {f: int(f in detected) for f in result["features"]}
        dm.active = int(w["active"])
        dm.drifted = len(detected)
        dm.detections = w["detections"]  # (a restarted detector goes on from its predecessor's count)
        dm.windows += 1
        dm.window_seconds = w["span_s"]
        dm.lag.observe(w["lag_s"])
        status = self.status_by_model.setdefault(model, {"model": model})
        status.update(
            windows=dm.windows,
            active=bool(w["active"]),
            detected=sorted(detected),
            detections=dm.detections,
            profile_id=w["profile_id"],
            last_window={k: v for k, v in w.items() if k not in ("detected", "active", "detections", "profile_id")},
            last_window_at=time.time(),
        )

    def _event(self, model: str, event: dict[str, Any]) -> None:
        self._unsettled.add(event)
        data = event.get("data", {})
        feats = ", ".join(f"{d['feature']}({'+'.join(d['tests'])})" for d in data.get("drifted_features", [])[:32])
        state = data.get("state", "?")
        log.warning("drift: '%s' %s (window %s): %s", model, state, data.get("window", {}).get("index"), feats or "-")
        if self._loop is not None:
            detail = f"event {event.get('id')}; drifted: {feats or 'none'}"
            self._loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self.audit(f"drift.{state}", model, "ok", detail))
            )

    def _counts(self, c: dict[str, Any]) -> None:
        """The detector's own totals, added to those of the detector processes before it (so
        the counters never go backwards when one is restarted)."""
        det = self.metrics.detector
        assert det is not None
        self._latest = c
        self._unsettled.settle(c.get("unsettled", []))
        gone = self._carried
        for model, n in c["samples"].items():
            dm = self.metrics.drift(model)
            before = gone["samples"].get(model, {})
            dm.samples["used"] = before.get("used", 0) + n["used"]
            dm.samples["invalid"] = before.get("invalid", 0) + n["invalid"] + self._invalid_here.get(model, 0)
        events = dict(gone["events"])
        for outcome, v in c["events"].items():
            events[outcome] = events.get(outcome, 0) + v
        det.events = events
        det.dead_letter = c["dead_letter"]
        det.cpu_seconds = gone["cpu_s"] + c["cpu_s"]
        self.detector_pid = c["pid"]

    def _carry_counts(self) -> None:
        """A detector process is gone: its last totals are kept."""
        gone = self._carried
        c = self._latest
        if c is None:
            return
        for model, n in c["samples"].items():
            before = gone["samples"].setdefault(model, {})
            for k, v in n.items():
                before[k] = before.get(k, 0) + v
        for outcome, v in c["events"].items():
            gone["events"][outcome] = gone["events"].get(outcome, 0) + v
        gone["cpu_s"] += c["cpu_s"]
        self._latest = None

    def _reply(self, ident: int, ok: bool | str | None, payload: Any) -> None:
        """A command's answer: ``ok`` True (its result), False (the caller's mistake:
        INVALID_ARGUMENT), ``"failed"`` (the detector's own, such as a profile it could not write:
        INTERNAL; until 2026-12-06 INVALID_ARGUMENT, which blames the caller and is not retried) or
        None (dropped, too late for its caller: DEADLINE_EXCEEDED, as the caller's own wait)."""
        fut = self._replies.pop(ident, None)
        if fut is None or self._loop is None:
            return

        def settle() -> None:
            if fut.done():
                return
            if ok == "failed":
                fut.set_exception(GatewayError(ErrorCode.INTERNAL, str(payload)))
            elif ok:
                fut.set_result(payload)
            elif ok is None:
                fut.set_exception(GatewayError(ErrorCode.DEADLINE_EXCEEDED, str(payload)))
            else:
                fut.set_exception(invalid(str(payload)))

        self._loop.call_soon_threadsafe(settle)

    def _fail_replies(self, why: str) -> None:
        for ident in list(self._replies):
            fut = self._replies.pop(ident, None)
            if fut is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(_fail, fut, GatewayError(ErrorCode.UNAVAILABLE, why))

    # ---------------------------------------------------------------- admin
    def monitor(self, model: str) -> MonitorSpec:
        spec = self.specs.get(model)
        if spec is None:
            raise not_found(f"no drift monitor for '{clip(model)}'")
        return spec

    def status(self, model: str) -> dict[str, Any]:
        spec = self.monitor(model)
        out = dict(self.status_by_model.get(model, {"model": model}))
        dm = self.metrics.drift(model)
        out.update(
            sample_rate=spec.sample_rate,
            window_samples=spec.window_samples,
            tests=list(spec.tests),
            alpha=spec.alpha,
            correction=spec.correction,
            samples=dict(dm.samples),
            detector_up=bool(self.metrics.detector.up) if self.metrics.detector else False,
            detector_pid=self.detector_pid or 0,
        )
        return out

    async def status_now(self, model: str) -> dict[str, Any]:
        """:meth:`status`, from the supervisor's detector when this is a worker process."""
        if self.link is not None:
            self.monitor(model)
            return await self.link.call("drift_status", model=model)
        return self.status(model)

    async def command(self, name: str, args: dict[str, Any], until: float | None = None) -> dict[str, Any]:
        """Run a reset or rebaseline in the detector. ``until`` (``time.monotonic()``, which every
        process of the host shares): when the caller stops waiting (a gRPC call's deadline), if
        sooner than the command's own time; the detector drops a command it reads after that."""
        if self.link is not None:
            return await self.link.call("drift_command", name=name, args=args, until=until)
        if self._loop is None or self._inbox is None:
            raise GatewayError(ErrorCode.UNAVAILABLE, "the drift detector is not running")
        ident = next(self._ids)
        fut = self._loop.create_future()
        self._replies[ident] = fut
        own = time.monotonic() + COMMAND_TIMEOUT_S
        until = own if until is None else min(own, until)
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                # On a thread: the pipe may be full while the detector scores a window. The
                # command's time covers the send too: a detector that stops reading leaves the
                # sender thread waiting on the pipe, holding it, for as long as it is stuck.
                # The detector drops a command that reaches it after its caller gave up (the
                # thread may send it once the pipe drains, long after the caller was answered).
                await asyncio.to_thread(self._send_command, ("command", ident, name, args, until))
                result = await fut
        except TimeoutError:  # (an OSError: first)
            raise GatewayError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"the drift detector did not answer within {COMMAND_TIMEOUT_S:g} s (or the call's deadline; it "
                "drops the command if it reaches it later)",
            ) from None
        except (OSError, ValueError) as e:
            raise GatewayError(ErrorCode.UNAVAILABLE, f"the drift detector is not reachable: {e}") from None
        finally:
            self._replies.pop(ident, None)
        model = str(args.get("model"))
        self.status_by_model.setdefault(model, {"model": model})["profile_id"] = result.get("profile_id")
        if name in ("reset", "rebaseline"):
            dm = self.metrics.drift(model)
            dm.active = dm.drifted = 0
            dm.detected = {}
            dm.quality = {}
            self.status_by_model[model].update(active=False, detected=[])
        return result


def _fail(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
