"""One generator process: its own event loop, connections and HdrHistograms.

The coordinator (runner.py) starts several of these, hands each its share of a step's load
and a common start time on the system-wide monotonic clock, and merges what they report.

Open loop: requests are dispatched at the times the schedule says (constant spacing or
Poisson arrivals, at a rate that may follow a shape), whether or not earlier ones have been
answered. A request that has to wait for a free connection or stream slot waits *after*
dispatch: that wait is the server's back-pressure, counted in the corrected latency and not
in the generator's lag. Closed loop: ``concurrency`` callers, each sending its next request
when the previous one is answered (intended time = send time, so nothing is corrected).

Samples go into the window of their intended send time; a window's report is a delta, sent
as soon as there is something new, so answers that arrive late still land where they belong.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from .payload import GRPC_INFER, GRPC_STREAM, SYNTHETIC_HEADER, Encoded, with_id
from .results import HIGHEST_US, histogram
from .secure import Secure
from .stream_errors import stream_status

_mono = time.monotonic_ns

# Outcomes that are the request's deadline running out: gRPC's code (ours or the server's), the
# HTTP client's own timeout, and HTTP 504 (a V2 server's answer to an expired deadline).
TIMEOUTS = frozenset({"DEADLINE_EXCEEDED", "timeout", "504"})

# The outcome of a request a gRPC stream ended without answering, when the server ended the stream
# with status OK (or its answers could not be read): no code to give it, and it did not time out.
STREAM_ENDED = "stream ended unanswered"


class StreamEnded(Exception):
    """The stream a request was written on ended before its answer came."""


class _NotSent(Exception):
    """The stream had ended (after the check that it had not) before the request was written."""


@dataclass
class Transport:
    """How a worker reaches the server (fixed for the worker's life)."""

    target: str  # host:port
    protocol: str  # grpc | http
    model: str
    grpc_stream: bool = False  # ModelStreamInfer instead of unary ModelInfer
    channels: int = 1  # gRPC channels (HTTP/2 connections) per worker
    streams_per_channel: int = 0  # requests in flight per channel; 0 = no limit of ours
    connections: int = 64  # HTTP keep-alive connections per worker (one request in flight each)
    secure: Secure = field(default_factory=Secure)  # API key, TLS


@dataclass
class Plan:
    """One worker's share of one step."""

    step: int
    mode: str  # open | closed
    start_ns: int  # measurement start, system-wide monotonic clock
    warmup_s: float
    duration_s: float
    window_s: float
    deadline_s: float
    segments: list[tuple[float, float, float, float]] = field(default_factory=list)  # (t0, t1, r0, r1), req/s
    arrival: str = "constant"  # constant | poisson
    offset: float = 0.0  # fraction of an interval this worker's constant schedule is shifted by
    concurrency: int = 0
    seed: int = 0
    late_ms: float = 10.0  # a dispatch later than this counts as late
    precise: bool = False  # spin through the last millisecond before each send


def rate_at(segments, t: float) -> float:
    """The scheduled rate at ``t`` seconds from the measurement start (warm-up: the first rate)."""
    if not segments:
        return 0.0
    if t < segments[0][0]:
        return segments[0][2]
    for t0, t1, r0, r1 in segments:
        if t0 <= t < t1:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r0
    return segments[-1][3]


class Schedule:
    """The integral of the scheduled rate from the start of the warm-up, and its inverse.

    Arrival ``k`` comes when the integral reaches ``k`` (plus the worker's offset) on a unit-rate
    clock. Each arrival is found from that absolute target, in closed form within the linear
    piece it falls in, so rounding never adds up from one arrival to the next: a constant rate
    R over D seconds schedules exactly R x D arrivals in the measurement."""

    def __init__(self, segments, start_s: float, end_s: float):
        cuts = sorted({start_s, end_s, *(t for seg in segments for t in seg[:2] if start_s < t < end_s)})
        self.pieces: list[tuple[float, float, float, float]] = []  # (from, to, rate there, rate at the end)
        self.before: list[float] = []  # the integral up to each piece
        total = 0.0
        for a, b in zip(cuts, cuts[1:]):
            ra, rb = _rates_over(segments, a, b)
            self.pieces.append((a, b, ra, rb))
            self.before.append(total)
            total += (b - a) * (ra + rb) / 2
        self.total = total

    def time_of(self, target: float) -> float | None:
        """Seconds from the measurement start at which the integral reaches ``target`` (None: not
        before the end)."""
        if target >= self.total:
            return None
        i = max(0, bisect.bisect_right(self.before, target) - 1)
        while i + 1 < len(self.pieces) and self.before[i + 1] <= target:  # (pieces of zero rate)
            i += 1
        a, b, ra, rb = self.pieces[i]
        need = target - self.before[i]
        slope = (rb - ra) / (b - a)
        if need <= 0:  # (the piece's start: a ramp up from 0 would divide 0 by 0)
            x = 0.0
        elif slope == 0:
            x = need / ra if ra > 0 else 0.0
        else:  # ra x + slope x^2 / 2 = need, in the form that keeps its digits when slope is small
            x = 2 * need / (ra + math.sqrt(max(0.0, ra * ra + 2 * slope * need)))
        return min(b, a + x)


def _left(plan: Plan, schedule: Schedule, k: int, target: float, constant: bool) -> int:
    """How many of the measurement's arrivals lie from arrival ``k`` (at ``target`` on the unit-rate
    clock) on: exact for constant spacing, the expected number for Poisson arrivals."""
    warm = Schedule(plan.segments, -plan.warmup_s, 0.0).total if plan.warmup_s > 0 else 0.0
    if constant:  # arrivals k' + offset in [warm, total)
        return max(0, math.ceil(schedule.total - plan.offset) - max(k, math.ceil(warm - plan.offset)))
    return (target >= warm) + round(max(0.0, schedule.total - max(target, warm)))


def _rates_over(segments, a: float, b: float) -> tuple[float, float]:
    """The rate at ``a`` and, approaching it, at ``b``: [a, b) lies within one linear piece."""
    for t0, t1, r0, r1 in segments:
        if t0 <= a < t1:
            slope = (r1 - r0) / (t1 - t0)
            return r0 + slope * (a - t0), r0 + slope * (b - t0)
    r = rate_at(segments, a)
    return r, r


class _Acc:
    __slots__ = ("sent", "ok", "errors", "late", "corrected", "uncorrected", "lag", "cpu_s", "overflow", "dirty")

    def __init__(self):
        self.sent = self.ok = self.late = self.overflow = 0
        self.errors: dict[str, int] = {}
        self.corrected, self.uncorrected, self.lag = histogram(), histogram(), histogram()
        self.cpu_s = 0.0
        self.dirty = False


class Worker:
    def __init__(self, index: int, transport: Transport, payloads: list[Encoded], out):
        self.index = index
        self.t = transport
        self.payloads = payloads
        self.out = out  # multiprocessing queue to the coordinator
        self.windows: dict[int, _Acc] = {}
        self.inflight: set[asyncio.Task] = set()
        self._k = 0
        self._cpu = 0.0  # process CPU seconds at the last booking

    # ------------------------------------------------------------------ connections
    async def connect(self) -> None:
        t = self.t
        if t.protocol == "grpc":
            import grpc

            opts = [
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1),
            ]  # one real connection per channel
            if t.secure.tls:
                creds = t.secure.grpc_credentials()
                self.channels = [
                    grpc.aio.secure_channel(t.target, creds, options=opts) for _ in range(max(1, t.channels))
                ]
            else:
                self.channels = [grpc.aio.insecure_channel(t.target, options=opts) for _ in range(max(1, t.channels))]
            for ch in self.channels:
                await ch.channel_ready()
            self.calls = [
                ch.unary_unary(GRPC_INFER, request_serializer=None, response_deserializer=None) for ch in self.channels
            ]
            self.slots = [
                asyncio.Semaphore(t.streams_per_channel) if t.streams_per_channel else None for _ in self.channels
            ]
            self.metadata = ((SYNTHETIC_HEADER, "1"), *t.secure.metadata())
            self.streams: list = [None] * len(self.channels)
            if t.grpc_stream:
                # The streams are set up here, before the first step, not by its first requests:
                # that was done on the event loop in the measured window (the reader's import of
                # the protocol's messages alone took ~0.1 s), and a short run read INVALID for
                # the dispatch lag it caused. A stream that ends is opened again as it is needed.
                from tritonclient.grpc import service_pb2  # noqa: F401

                self.streams = [_Stream(ch, self.metadata) for ch in self.channels]
                await asyncio.sleep(0)  # (their readers start)
        else:
            import aiohttp

            tls = t.secure.ssl_context() if t.secure.tls else False
            conn = aiohttp.TCPConnector(limit=max(1, t.connections), force_close=False, keepalive_timeout=60, ssl=tls)
            # (the key rides on the session: every request's headers are the payload's own, unchanged)
            self.session = aiohttp.ClientSession(connector=conn, auto_decompress=False, headers=t.secure.headers())
            self.url = f"{t.secure.scheme}://{t.target}/v2/models/{t.model}/infer"
            self.slots = [asyncio.Semaphore(max(1, t.connections))]

    async def close(self) -> None:
        if self.t.protocol == "grpc":
            for s in self.streams:
                if s is not None:
                    s.cancel()
            for ch in self.channels:
                await ch.close()
        else:
            await self.session.close()

    # ------------------------------------------------------------------ one request
    async def _call(self, k: int, timeout: float) -> str:
        """Send request ``k``; its outcome: OK, a gRPC code name, an HTTP status, or why it failed."""
        payload = self.payloads[k % len(self.payloads)]
        if self.t.protocol == "grpc":
            import grpc

            c = k % len(self.channels)
            try:
                if self.t.grpc_stream:
                    await self._stream_call(c, payload, timeout, k)
                else:
                    await self.calls[c](payload.body, timeout=timeout, metadata=self.metadata)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name
            except TimeoutError:
                return "DEADLINE_EXCEEDED"
            except StreamEnded:
                return STREAM_ENDED
        import aiohttp

        try:
            async with self.session.post(
                self.url, data=payload.body, headers=payload.headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                return "OK" if resp.status == 200 else str(resp.status)
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as e:
            return f"connection error ({type(e).__name__})"

    async def _stream_call(self, c: int, payload: Encoded, timeout: float, k: int) -> None:
        rid = f"w{self.index}-{k}"
        body = with_id(payload.body, rid)
        for _ in range(2):
            stream = self.streams[c]
            if stream is None or stream.done():
                stream = self.streams[c] = _Stream(self.channels[c], self.metadata)
            try:
                await stream.call(body, rid, timeout)
                return
            except _NotSent:
                # The stream ended between the check and the write (its reader had not yet run):
                # the request never left, and goes on a new stream, as it would have a moment
                # later. It was counted "client error (InvalidStateError)", the harness's fault.
                if self.streams[c] is stream:
                    self.streams[c] = None
        raise StreamEnded()  # (a new stream that ended before its first write: not reached in practice)

    async def _send(self, intended: int, dispatched: int, k: int, plan: Plan, window: int) -> None:
        slot = self.slots[k % len(self.slots)]
        if slot is not None:
            await slot.acquire()  # back-pressure: waits for a free connection or stream slot
        try:
            actual = _mono()
            remaining = plan.deadline_s - (actual - dispatched) / 1e9
            try:
                code = await self._call(k, max(0.001, remaining)) if remaining > 0 else "DEADLINE_EXCEEDED"
            except Exception as e:  # noqa: BLE001 - whatever happens, the request is counted
                code = f"client error ({type(e).__name__})"
        finally:
            if slot is not None:
                slot.release()
        done = _mono()
        acc = self._acc(window)
        # An answer's latency is what a user waited for it; a timeout waited out its deadline, so
        # it enters at that. Any other error is counted by its kind and kept out: a refusal or a
        # refused connection answers in microseconds, and shedding load would read as getting faster.
        if code == "OK" or code in TIMEOUTS:
            uncorrected = done - actual
            if code in TIMEOUTS:
                # A timeout enters at its timeout. The deadline is counted from the dispatch, so after
                # a wait for a free slot a request leaves with what is left of it (or not at all), and
                # timed from its send it read as answered in those few ms: a 50 ms server's
                # uncorrected p50 read 5 ms. It enters at the deadline, as a tool timing from the send
                # waits it out (never above the corrected value: a server may give up sooner).
                uncorrected = max(uncorrected, min(round(plan.deadline_s * 1e9), done - intended))
            for hist, value in ((acc.corrected, done - intended), (acc.uncorrected, uncorrected)):
                us = max(1, value // 1000)
                if us > HIGHEST_US:
                    acc.overflow += 1
                    us = HIGHEST_US
                hist.record_value(us)
        if code == "OK":
            acc.ok += 1
        else:
            acc.errors[code] = acc.errors.get(code, 0) + 1
        acc.dirty = True

    def _acc(self, window: int) -> _Acc:
        acc = self.windows.get(window)
        if acc is None:
            acc = self.windows[window] = _Acc()
        return acc

    def _window(self, plan: Plan, t_ns: int) -> int:
        return math.floor((t_ns - plan.start_ns) / (plan.window_s * 1e9))

    def _dispatch(self, intended: int, plan: Plan) -> None:
        now = _mono()
        window = self._window(plan, intended)
        lag = max(0, now - intended)
        acc = self._acc(window)
        acc.lag.record_value(max(1, min(HIGHEST_US, lag // 1000)))
        late = lag > plan.late_ms * 1e6
        # Sent on time: counted in its own window. Late: where it really left, which for a
        # generator falling behind is past the measurement, so it lowers the achieved rate; and
        # counted late there too, so that a window's late sends are some of its sends (booked in
        # the window it was meant for, they read over 100% of a window's sends).
        sent = self._acc(self._window(plan, now)) if late else acc
        sent.sent += 1
        sent.late += late
        sent.dirty = True
        acc.dirty = True
        task = asyncio.get_running_loop().create_task(self._send(intended, now, self._k, plan, window))
        self._k += 1
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    # ------------------------------------------------------------------ loads
    async def _open(self, plan: Plan) -> int:
        """Send on the schedule. Arrivals are drawn on a unit-rate clock (constant spacing 1 from the
        worker's offset, or exponential gaps for Poisson) and mapped through the integral of the
        shape's rate, so a ramp, a step or a stretch at rate 0 gets exactly the load it describes."""
        rng = random.Random(plan.seed)
        schedule = Schedule(plan.segments, -plan.warmup_s, plan.duration_s)
        end = plan.start_ns + round(plan.duration_s * 1e9)
        give_up = end + round(max(1.0, plan.deadline_s) * 1e9)
        constant = plan.arrival == "constant"
        k, target = 0, (plan.offset if constant else rng.expovariate(1.0))
        scheduled = 0
        while True:
            at = schedule.time_of(target)
            if at is None:
                return scheduled
            t = plan.start_ns + round(at * 1e9)
            if t >= end:
                return scheduled
            if _mono() >= give_up:
                # Still behind well past the end of the measurement (a deadline, at least 1 s):
                # the rest is not sent, and is still scheduled, so the step is INVALID. Sending it
                # all took as long again: a generator far behind ran out the coordinator's
                # patience, and the step was lost. (A little behind at the end, the last requests
                # still leave, late: counted as sent after the measurement, answered in it.)
                return scheduled + _left(plan, schedule, k, target, constant)
            # The event loop's timers have a 1 ms resolution, so a sleep may wake up to ~1 ms
            # late (that shows as lag). With ``precise`` the last ~1 ms is spent yielding
            # instead, which keeps dispatch within tens of microseconds at the price of a busy core.
            # Never early: a request sent before its time would look faster than it was.
            waited = False
            while (ahead := t - _mono()) > 0:
                waited = True
                if not plan.precise:
                    await asyncio.sleep(ahead / 1e9)
                elif ahead > 1_500_000:
                    await asyncio.sleep((ahead - 1_200_000) / 1e9)
                else:
                    await asyncio.sleep(0)
            self._dispatch(t, plan)
            if not waited:
                # Behind the schedule: let the request just dispatched leave (and the answers and the
                # CPU report run) before the next. Without this turn a generator that fell behind
                # dispatched the rest of the step without sending any of it, and those requests then
                # expired here, recorded as the server's DEADLINE_EXCEEDED.
                await asyncio.sleep(0)
            if t >= plan.start_ns:
                scheduled += 1
            k += 1
            target = k + plan.offset if constant else target + rng.expovariate(1.0)

    async def _closed(self, plan: Plan) -> int:
        end = plan.start_ns + int(plan.duration_s * 1e9)

        async def caller():
            while True:
                now = _mono()
                if now >= end:
                    return
                window = self._window(plan, now)
                acc = self._acc(window)
                acc.sent += 1
                acc.lag.record_value(1)
                k = self._k
                self._k += 1
                await self._send(now, now, k, plan, window)

        wait = (plan.start_ns - int(plan.warmup_s * 1e9) - _mono()) / 1e9
        if wait > 0:
            await asyncio.sleep(wait)
        await asyncio.gather(*(caller() for _ in range(plan.concurrency)))
        return 0

    async def run_step(self, plan: Plan) -> None:
        self.windows.clear()
        self._cpu = time.process_time()
        reporter = asyncio.get_running_loop().create_task(self._report_loop(plan))
        wait = (plan.start_ns - int(plan.warmup_s * 1e9) - _mono()) / 1e9 - 0.001
        if wait > 0:
            await asyncio.sleep(wait)
        scheduled = await (self._open(plan) if plan.mode == "open" else self._closed(plan))
        if self.inflight:  # never drop what is in flight: each answer (or timeout) is recorded
            await asyncio.gather(*list(self.inflight), return_exceptions=True)
        reporter.cancel()
        self._book_cpu(plan)  # (what the reporter had not booked yet: all of it, had it never run)
        self._flush(plan)
        self.out.put(("done", self.index, plan.step, scheduled))

    async def _report_loop(self, plan: Plan) -> None:
        every = min(0.25, plan.window_s / 4)
        while True:
            await asyncio.sleep(every)
            self._book_cpu(plan)
            self._flush(plan)

    def _book_cpu(self, plan: Plan) -> None:
        """Book the CPU used since the last booking in the window now running."""
        now_cpu = time.process_time()
        self._acc(self._window(plan, _mono())).cpu_s += now_cpu - self._cpu
        self._cpu = now_cpu

    def _flush(self, plan: Plan) -> None:
        for index, acc in list(self.windows.items()):
            if not acc.dirty and not acc.cpu_s:
                continue
            self.out.put(
                (
                    "window",
                    self.index,
                    plan.step,
                    index,
                    acc.sent,
                    acc.ok,
                    dict(acc.errors),
                    acc.late,
                    acc.corrected.encode(),
                    acc.uncorrected.encode(),
                    acc.lag.encode(),
                    acc.cpu_s,
                    acc.overflow,
                )
            )
            self.windows[index] = _Acc()


class _Stream:
    """One ModelStreamInfer stream: requests written as they come, answers matched by id."""

    def __init__(self, channel, metadata):
        self.call_ = channel.stream_stream(GRPC_STREAM, request_serializer=None, response_deserializer=None)(
            metadata=metadata
        )
        self.pending: dict[str, asyncio.Future] = {}
        self.lock = asyncio.Lock()  # one write at a time on a stream
        self.reader = asyncio.get_running_loop().create_task(self._read())

    def done(self) -> bool:
        return self.reader.done()

    def cancel(self) -> None:
        self.call_.cancel()

    async def call(self, body: bytes, rid: str, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            async with self.lock:  # a write is never cancelled half-way: that would end the stream
                try:
                    await asyncio.shield(self.call_.write(body))
                except asyncio.InvalidStateError:  # (grpc.aio: "RPC already finished")
                    raise _NotSent() from None
            await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(rid, None)
            # The reader gives the stream's error to every request waiting, this one too when its
            # write failed first: retrieved here, or asyncio printed a traceback for each such
            # request when the server went away (dozens a second).
            if fut.done() and not fut.cancelled():
                fut.exception()

    async def _read(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2 as pb

        try:
            async for raw in self.call_:
                resp = pb.ModelStreamInferResponse.FromString(raw)
                rid = resp.infer_response.id
                if not rid and resp.error_message:  # an error the server could not tie to a request
                    rid = next((k for k, f in self.pending.items() if not f.done()), "")  # oldest waiting
                fut = self.pending.get(rid)
                if fut is not None and not fut.done():
                    if resp.error_message:  # (an in-band error has no code: read from its words)
                        code = grpc.StatusCode[stream_status(resp.error_message)]
                        fut.set_exception(grpc.aio.AioRpcError(code, None, None, resp.error_message))
                    else:
                        fut.set_result(None)
        except grpc.aio.AioRpcError as e:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(e)
        finally:
            # Ended with status OK (a server may close a stream so), or on an answer that could not
            # be read: what is still waiting gets no answer on this stream. Left pending, each waited
            # out its deadline and was counted as a timeout at it, which the server never had.
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(StreamEnded())


def end_with_the_coordinator() -> None:
    """Exit at once when the coordinator process is gone. A coordinator ended by SIGTERM or
    SIGKILL (``timeout``, a CI job cancelled, a pod evicted) runs no clean-up, and its workers
    went on loading the server to the end of the step with nobody measuring, then waited for
    its next command for good. The parent's sentinel (a pipe the coordinator holds open) ends
    when it does."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)  # (nobody is left to report to; the sockets close with the process)

    threading.Thread(target=watch, name="coordinator-watch", daemon=True).start()


def main(index: int, transport: Transport, payloads: list[Encoded], commands, out) -> None:
    """Process entry point: connect, say ready, then run the steps the coordinator sends."""
    # A Ctrl-C reaches the whole process group: the coordinator handles it (keeps what was
    # measured, then ends the workers); here it only printed a traceback per worker. So does a
    # SIGTERM sent to the group; the coordinator's end ends them anyway (end_with_the_coordinator).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_with_the_coordinator()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

    async def serve():
        w = Worker(index, transport, payloads, out)
        try:
            await w.connect()
        except Exception as e:  # noqa: BLE001 - report any failure to connect to the coordinator
            out.put(("error", index, f"cannot connect to {transport.target}: {type(e).__name__}: {e}"))
            return
        out.put(("ready", index))
        loop = asyncio.get_running_loop()
        while True:
            plan = await loop.run_in_executor(None, commands.get)
            if plan is None:
                break
            await w.run_step(plan)
        await w.close()

    asyncio.run(serve())
