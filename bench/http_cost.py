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

HERE = Path(__file__).resolve().parent
MODEL = "tiny"
PATH = f"/v2/models/{MODEL}/infer"


class _Transport:
    """Just enough of an asyncio transport for uvicorn's protocol: what it writes is counted."""

    def __init__(self) -> None:
        self.written = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.written += 1
        self.last = data

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


def refusal_round(gw):
    """µs per overload refusal, through the HTTP protocol itself: one connection's bytes handed
    to uvicorn's (guarded) protocol while the process is at its in-flight limit, so each request
    is refused from its request line (the quick path) and its answer written at the turn's end."""
    import asyncio

    from serving import http_request_body

    body = http_request_body()
    raw = (
        f"POST {PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
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


def drive(repo: str, requests: int, rounds: int, profile: bool, refusals: bool = False) -> list[float]:
    """µs per request of each round (in this process, with whatever ``batchgate`` imports)."""
    import uvloop

    from batchgate.app import Gateway
    from batchgate.config import ConfigError, load_settings

    sys.path.insert(0, str(HERE))
    from serving import http_request_body

    body = http_request_body()
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
                "path": PATH,
                "raw_path": PATH.encode(),
                "query_string": b"",
                "headers": headers,
                "state": {},
            }
            if early is not None:  # admitted as the protocol would, from the head
                early("POST", PATH, scope)
            await app(scope, receive, send)
            if len(sent) > 64:
                del sent[:-2]

        ok = lambda: sent[0].get("status") == 200  # noqa: E731
        if refusals:
            once, ok = refusal_round(gw)
        for _ in range(5000):  # warm-up: the model is timed and runs inline from here on
            await once()
        if not ok():
            raise SystemExit(f"the benchmark request was not answered as expected: {sent[:2]}")
        out = []
        for r in range(rounds):
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            t = time.perf_counter()
            for _ in range(requests):
                await once()
            out.append((time.perf_counter() - t) / requests * 1e6)
            if profile:
                prof.disable()
                stats = pstats.Stats(prof, stream=sys.stderr)
                stats.sort_stats(os.environ.get("HTTP_COST_SORT", "tottime"))
                stats.print_stats(int(os.environ.get("HTTP_COST_TOP", "30")))
            print(f"[http_cost] round {r + 1}/{rounds}: {out[-1]:.1f} µs a request", file=sys.stderr, flush=True)
        await gw.stop()
        return out

    return uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests a round (default 20,000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5); the median is reported")
    ap.add_argument("--profile", action="store_true", help="one round under cProfile, its costliest functions")
    ap.add_argument(
        "--refusals",
        action="store_true",
        help="gauge an overload refusal instead (the HTTP protocol's quick path, at the in-flight limit)",
    )
    ap.add_argument("--package-root", help="import batchgate from this folder (another checkout's server/)")
    ap.add_argument("--output", default=str(HERE / "results" / "http_cost.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # (the measuring process: a repository path)
    args = ap.parse_args(argv)
    if args.child:
        rounds = 1 if args.profile else args.rounds
        print(json.dumps(drive(args.child, args.requests, rounds, args.profile, args.refusals)))
        return 0
    sys.path.insert(0, str(HERE))
    from serving import build_repository

    with tempfile.TemporaryDirectory(prefix="bench-http-cost-") as tmp:
        repo = build_repository(Path(tmp), 4)
        env = dict(os.environ)
        if args.package_root:  # a folder named batchgate pointing at that server/ tree, first on the path
            link = Path(tmp) / "pkg" / "batchgate"
            link.parent.mkdir()
            link.symlink_to(Path(args.package_root).resolve())
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link.parent), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--child", str(repo), "--requests", str(args.requests)]
        cmd += ["--rounds", str(args.rounds)] + (["--profile"] if args.profile else [])
        cmd += ["--refusals"] if args.refusals else []
        if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
            cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]  # one core, as a server has
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        rounds = json.loads(done.stdout.strip().splitlines()[-1])
    median = statistics.median(rounds)
    result = {"code": args.package_root or str(HERE.parent / "server"), "us_per_request": median, "rounds": rounds}
    result["what"] = "overload refusal" if args.refusals else "answer"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"HTTP infer path in process ({result['what']}): {median:.1f} µs a request (median of {len(rounds)} rounds: "
        f"{', '.join(f'{r:.1f}' for r in rounds)}); wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
