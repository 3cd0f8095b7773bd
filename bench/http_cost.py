"""What batchgate's HTTP infer path costs in Python, without sockets: a quieter gauge than
bench/serving.py for finding where the HTTP path's time goes.

The gateway is started in this process on the same one-model repository as bench/serving.py
(``tiny``: FP32 [1, 4] -> identity, run inline on the loop), and the same JSON infer request is
handed to its ASGI app again and again, one at a time, with a receive that has the whole body and
a send that keeps the messages: what is measured is the app's own work per request (admission,
decode, the model run and its bookkeeping, encode, access log), not uvicorn, the kernel or the
load tool. On the 2-core VM its rounds agree within about 5% where bench/serving.py's move by a
third, so it can tell two versions of the code apart (``--package-root`` runs another checkout's
code, e.g. a ``git worktree`` of an older commit, through the same driver).

    python bench/http_cost.py                       # 5 rounds of 20,000 requests, medians
    python bench/http_cost.py --profile             # one round under cProfile: the costliest functions
    python bench/http_cost.py --package-root /tmp/old/server   # another checkout's server/ folder
    python bench/http_cost.py --refusals            # an overload refusal instead of an answer
    python bench/http_cost.py --grpc --model mlp --bound   # the overload ceiling, below
    python bench/http_cost.py --cpu-clock ...       # the process's CPU time, on a machine busy elsewhere

``--grpc`` drives the h2 gRPC engine the same way: one connection's bytes (HPACK headers and the
whole request message, as a client frames them) handed to the engine a call at a time, each answer
written at its loop turn's end. ``--model mlp`` uses bench/overload.py's model and requests.

``--bound`` gauges an answer and an overload refusal in alternating rounds and reports what their
ratio r = refusal / answer allows at three times capacity on one core, for a server that reads (and
refuses) every request it does not answer: a goodput of f costs f + (3 - f) r of the core, so
f <= (1 - 3r) / (1 - r). bench/overload.py's target of 0.8 needs r <= 1/11 (0.091). Only a server
that leaves the excess unread (TCP backpressure) can do better.

Inside a serving process the same code takes longer per request than here (timed 2026-12-04:
two to three times while each answer was written as it was sent, about 1.6 times once answers
were written at the end of the loop's turn, transport/batched_writes.py): the kernel's TCP work
between requests leaves the caches cold. So this gauges the Python, not the throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import grpc_frame

HERE = Path(__file__).resolve().parent
MODELS = ("tiny", "mlp")  # bench/serving.py's identity model; the demo MLP of bench/overload.py


def workload(model: str) -> tuple[str, bytes, bytes]:
    """``model``'s HTTP infer path, its JSON request body and its gRPC ModelInfer request, the
    same requests as the benchmark that uses that model sends."""
    if model == "mlp":
        import overload

        return f"/v2/models/{overload.MODEL}/infer", overload.http_body(), overload.request_bytes()
    import serving

    return f"/v2/models/{serving.MODEL}/infer", serving.http_request_body(), serving.grpc_request_bytes()


def build(model: str, root: Path) -> Path:
    """A model repository serving ``model``."""
    if model == "mlp":
        repo = root / "models"
        subprocess.run([sys.executable, "-m", "batchgate.cli", "demo-repo", str(repo)], check=True, capture_output=True)
        return repo
    from serving import build_repository

    return build_repository(root, 4)


class _Transport:
    """Just enough of an asyncio transport for uvicorn's protocol: what it writes is counted."""

    def __init__(self) -> None:
        self.written = 0
        self.last = b""
        self.kept: bytearray | None = None  # everything written, while a check wants it

    def write(self, data: bytes) -> None:
        self.written += 1
        self.last = data
        if self.kept is not None:
            self.kept += data

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def refusal_round(gw, path: str, body: bytes):
    """µs per overload refusal, through the HTTP protocol itself: one connection's bytes handed
    to uvicorn's (guarded) protocol while the process is at its in-flight limit, so each request
    is refused from its request line (the quick path) and its answer written at the turn's end."""
    import asyncio

    raw = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    server = gw._http.server
    proto = server.config.http_protocol_class(
        config=server.config, server_state=server.server_state, app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = _Transport()
    proto.connection_made(transport)
    gw.dataplane.admission.max_inflight = 0  # every request is refused: the in-flight limit

    async def once() -> None:
        proto.data_received(raw)
        await asyncio.sleep(0)  # the turn ends: the answer is written

    return once, lambda: transport.last.startswith(b"HTTP/1.1 429 ")


class _GrpcClient:
    """One HTTP/2 connection's worth of client bytes for the h2 gRPC engine: the preface, then
    each call as a HEADERS frame (HPACK, as a client's encoder makes it) and a DATA frame with the
    whole request message, on stream ids that grow, as h2load or tritonclient sends them."""

    PATH = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self, message: bytes) -> None:
        import hpack

        from batchgate.transport import http2

        self._h2 = http2
        self._encoder = hpack.Encoder()
        self._message = grpc_frame(message)
        self._sid = 1
        self.headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", self.PATH),
            (":authority", "bench"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]

    def preface(self) -> bytes:
        """The preface, our SETTINGS (the largest window) and the connection's window opened
        all the way: the server never waits for credit to answer."""
        h2 = self._h2
        settings = h2.frame(h2.SETTINGS, 0, 0, (4).to_bytes(2, "big") + h2.MAX_WINDOW.to_bytes(4, "big"))
        credit = h2.frame(h2.WINDOW_UPDATE, 0, 0, (h2.MAX_WINDOW - h2.DEFAULT_WINDOW).to_bytes(4, "big"))
        return h2.PREFACE + settings + credit

    def calls(self, n: int) -> list[bytes]:
        """The bytes of ``n`` more calls (made before a round is timed)."""
        h2, out = self._h2, []
        for _ in range(n):
            sid, self._sid = self._sid, self._sid + 2
            block = self._encoder.encode(self.headers)
            out.append(
                h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block) + h2.frame(h2.DATA, h2.END_STREAM, sid, self._message)
            )
        return out


def grpc_rounds(gw, message: bytes, refusals: bool):
    """The h2 gRPC engine's ModelInfer path: one connection of the gateway's gRPC server fed a
    call's bytes at a time; each answer (or refusal, at the in-flight limit) written at the end of
    its loop turn before the next call is read. Returns (make, once, ok): ``make(n)`` readies the
    next ``n`` calls, ``once()`` serves the next one."""
    import asyncio

    from batchgate.transport.grpc_h2_connection import _Connection

    client = _GrpcClient(message)
    transport = _Transport()
    conn = _Connection(gw._grpc)
    conn.connection_made(transport)
    conn.data_received(client.preface())
    if refusals:
        gw.dataplane.admission.max_inflight = 0
    pending: list[bytes] = []

    def make(n: int) -> None:
        pending[:] = client.calls(n)
        pending.reverse()

    async def once() -> None:
        conn.data_received(pending.pop())
        while conn.calls:  # (an answer may take a few turns: the handler's task, the model's run)
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the turn ends: the answer is written

    transport.kept = bytearray()  # (for the check after the warm-up: then no more)
    want = b"8" if refusals else b"0"  # RESOURCE_EXHAUSTED, OK

    def ok() -> bool:
        statuses = grpc_statuses(bytes(transport.kept or b""))
        transport.kept = None
        return bool(statuses) and all(s == want for s in statuses)

    return make, once, ok


def grpc_statuses(written: bytes) -> list[bytes]:
    """The grpc-status of every call answered in a server's bytes (each header block decoded in
    order, as a client must, the HPACK table being shared)."""
    import hpack

    from batchgate.transport import http2

    decoder, out, pos = hpack.Decoder(), [], 0
    while pos + 9 <= len(written):
        n = int.from_bytes(written[pos : pos + 3], "big")
        kind, payload = written[pos + 3], written[pos + 9 : pos + 9 + n]
        pos += 9 + n
        if kind == http2.HEADERS:  # (the engine's answers fit one frame each)
            out += [v for k, v in decoder.decode(payload, raw=True) if k == b"grpc-status"]
    return out


def drive(
    repo: str,
    requests: int,
    rounds: int,
    profile: bool,
    refusals: bool = False,
    grpc: bool = False,
    model: str = "tiny",
) -> list[float]:
    """µs per request of each round (in this process, with whatever ``batchgate`` imports);
    ``grpc``: through the h2 gRPC engine instead of the HTTP app."""
    import uvloop

    from batchgate.app import Gateway
    from batchgate.config import ConfigError, load_settings

    path, body, message = workload(model)
    flags = {
        "model_repository": repo,
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "metrics_port": -1,
        "admin_port": -1,
        "admin_http_port": -1,
        "infer_threads": 4,
        "log_level": "warning",
        "access_log_file": os.devnull,
        "grpc_engine": "h2",
        "grpc_overload_refusals_per_s": 1 << 30,  # (no holds: a hold only stops the reading)
        "overload_refusals_per_s": 1 << 30,
        "inline_execution_max_us": 1000,  # inline from the first timed runs, as in a warm server
    }
    while True:  # an older checkout knows fewer settings: leave out those it does not know
        try:
            settings = load_settings(None, flags, environ={})
            break
        except ConfigError as e:
            unknown = str(e).split("'")[1] if "unknown setting" in str(e) else None
            if unknown not in flags:
                raise
            del flags[unknown]
    headers = [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    sent: list[dict] = []

    async def main() -> list[float]:
        gw = Gateway(settings)
        await gw.start()
        listener = gw._http
        app = listener.app if hasattr(listener, "app") else listener.config.app
        early = getattr(app, "admit_early", None)

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        async def once():
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "server": ("127.0.0.1", 8000),
                "client": ("127.0.0.1", 5555),
                "scheme": "http",
                "method": "POST",
                "root_path": "",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "headers": headers,
                "state": {},
            }
            if early is not None:  # admitted as the protocol would, from the head
                early("POST", path, scope)
            await app(scope, receive, send)
            if len(sent) > 64:
                del sent[:-2]

        ok = lambda: sent[0].get("status") == 200  # noqa: E731
        make = lambda n: None  # noqa: E731  (readies a round's requests, untimed)
        if grpc:
            make, once, ok = grpc_rounds(gw, message, refusals)
        elif refusals:
            once, ok = refusal_round(gw, path, body)
        make(5000)
        for _ in range(5000):  # warm-up: the model is timed and runs inline from here on
            await once()
        if not ok():
            raise SystemExit(f"the benchmark request was not answered as expected: {sent[:2]}")
        out = []
        # --cpu-clock: the process's CPU time (all its threads), not the wall clock: on a machine
        # shared with other work, the time this process was not running is not counted
        clock = time.process_time if os.environ.get("HTTP_COST_CLOCK") == "cpu" else time.perf_counter
        for r in range(rounds):
            make(requests)
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            t = clock()
            for _ in range(requests):
                await once()
            out.append((clock() - t) / requests * 1e6)
            if profile:
                prof.disable()
                stats = pstats.Stats(prof, stream=sys.stderr)
                stats.sort_stats(os.environ.get("HTTP_COST_SORT", "tottime"))
                stats.print_stats(int(os.environ.get("HTTP_COST_TOP", "30")))
            print(f"[http_cost] round {r + 1}/{rounds}: {out[-1]:.1f} µs a request", file=sys.stderr, flush=True)
        await gw.stop()
        return out

    return uvloop.run(main())


def measure(args, refusals: bool) -> list[float]:
    """One child process's rounds: µs a request (answers, or overload refusals)."""
    with tempfile.TemporaryDirectory(prefix="bench-http-cost-") as tmp:
        repo = build(args.model, Path(tmp))
        env = dict(os.environ)
        if args.package_root:  # a folder named batchgate pointing at that server/ tree, first on the path
            link = Path(tmp) / "pkg" / "batchgate"
            link.parent.mkdir()
            link.symlink_to(Path(args.package_root).resolve())
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link.parent), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--child", str(repo), "--requests", str(args.requests)]
        cmd += ["--rounds", str(args.rounds), "--model", args.model] + (["--profile"] if args.profile else [])
        cmd += (["--refusals"] if refusals else []) + (["--grpc"] if args.grpc else [])
        if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
            cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]  # one core, as a server has
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def goodput_bound(answer_us: float, refusal_us: float, load: float = 3.0) -> float:
    """The largest share of its capacity a server on one core can still answer at ``load`` times
    that capacity when it reads, and refuses, every request beyond what it answers: a goodput of
    f costs f answers' time and (load - f) refusals' of each capacity's worth of requests, within
    one core's second: f + (load - f) * r <= 1 with r = refusal / answer."""
    r = refusal_us / answer_us
    return max(0.0, (1 - load * r) / (1 - r))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests a round (default 20,000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5); the median is reported")
    ap.add_argument("--profile", action="store_true", help="one round under cProfile, its costliest functions")
    ap.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time the rounds by the process's CPU time, not the wall clock (a machine busy with other work)",
    )
    ap.add_argument(
        "--refusals",
        action="store_true",
        help="gauge an overload refusal instead (the quick path, at the in-flight limit)",
    )
    ap.add_argument("--grpc", action="store_true", help="the h2 gRPC engine's ModelInfer instead of the HTTP app")
    ap.add_argument(
        "--model",
        choices=MODELS,
        default="tiny",
        help="tiny (bench/serving.py's, the default) or mlp (bench/overload.py's)",
    )
    ap.add_argument(
        "--bound",
        action="store_true",
        help="gauge both an answer and a refusal (alternating, --rounds each) and the goodput at 3x "
        "capacity that their ratio allows a server that reads every request",
    )
    ap.add_argument("--package-root", help="import batchgate from this folder (another checkout's server/)")
    ap.add_argument("--output", default=str(HERE / "results" / "http_cost.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # (the measuring process: a repository path)
    args = ap.parse_args(argv)
    if args.cpu_clock:  # (read by the measuring child, which inherits the environment)
        os.environ["HTTP_COST_CLOCK"] = "cpu"
    if args.child:
        rounds = 1 if args.profile else args.rounds
        print(json.dumps(drive(args.child, args.requests, rounds, args.profile, args.refusals, args.grpc, args.model)))
        return 0
    protocol = "gRPC (h2 engine)" if args.grpc else "HTTP"
    result: dict = {"code": args.package_root or str(HERE.parent / "server"), "protocol": protocol, "model": args.model}
    if args.bound:
        answers: list[float] = []
        refusals: list[float] = []
        for _ in range(args.rounds):  # alternating, so that a slower minute weighs on both
            answers += measure(argparse.Namespace(**{**vars(args), "rounds": 1}), False)
            refusals += measure(argparse.Namespace(**{**vars(args), "rounds": 1}), True)
        a, c = statistics.median(answers), statistics.median(refusals)
        result.update(answer_us=a, refusal_us=c, answers=answers, refusals=refusals)
        result.update(refusal_over_answer=c / a, goodput_bound_at_3x=goodput_bound(a, c))
        summary = (
            f"{protocol} on {args.model} in process: answer {a:.1f} µs, refusal {c:.1f} µs (medians of "
            f"{args.rounds} alternating rounds), ratio {c / a:.3f}: at 3x capacity a server that reads every "
            f"request answers at most {goodput_bound(a, c):.2f} of its capacity"
        )
    else:
        rounds = measure(args, args.refusals)
        median = statistics.median(rounds)
        result.update(us_per_request=median, rounds=rounds, what="overload refusal" if args.refusals else "answer")
        summary = (
            f"{protocol} infer path in process ({result['what']}, {args.model}): {median:.1f} µs a request (median "
            f"of {len(rounds)} rounds: {', '.join(f'{r:.1f}' for r in rounds)})"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{summary}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
