"""Helpers shared by the benchmarks in bench/: processes pinned to cores, the load tools
(h2load for gRPC, wrk for HTTP) and what they report, CPU accounting, and small utilities.

Each benchmark script (serving.py, batching.py) runs as ``python bench/<name>.py``, so this
module is imported as ``common`` from the script's own folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 60.0

# batchgate logs "... HTTP on H:P, gRPC on H:P, metrics on H:P|metrics off" when it is ready.
BATCHGATE_READY = re.compile(
    r"HTTP on (?P<http_host>\S+?):(?P<http>\d+), gRPC on (?P<grpc_host>\S+?):(?P<grpc>\d+),"
    r" metrics (?:on (?P<metrics_host>\S+?):(?P<metrics>\d+)|off)"
)
# The same with the metrics port: with --workers N each worker logs its own line first, with
# "metrics off" (the supervisor serves /metrics and logs the line to wait for).
BATCHGATE_READY_METRICS = re.compile(BATCHGATE_READY.pattern.replace("|off)", ")"))


class BenchError(RuntimeError):
    """A phase could not be measured, or its measurement cannot be trusted."""


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def grpc_frame(message: bytes) -> bytes:
    """gRPC length-prefixed message: 1 byte compressed flag (0), 4 bytes big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# ============================================================================ processes


@dataclass
class Pinning:
    server: list[str]  # command prefix that pins the server
    load: list[str]  # command prefix that pins the load tool
    note: str
    cores: list[str] = field(default_factory=list)  # [server core, load core] when pinned
    # Where a bench's second batchgate goes: a gateway in front of the server (bench/remote.py) and
    # an upstream behind it (bench/routing.py). On two cores both share the load tool's core;
    # BATCHGATE_BENCH_CORES gives them cores of their own on a larger machine.
    gateway: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)


CORES_ENV = "BATCHGATE_BENCH_CORES"  # e.g. "server=0;gateway=1;load=2-3;upstream=4" (taskset -c lists)


def choose_pinning(enabled: bool) -> Pinning:
    cores = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning([], [], "off (--no-pin)")
    if len(cores) < 2 or shutil.which("taskset") is None:
        return Pinning([], [], f"off: needs 2 cores and taskset (have {len(cores)} cores)")
    roles = {"server": str(cores[0]), "load": str(cores[1])}
    given = os.environ.get(CORES_ENV, "").strip()
    if given:
        try:
            named = dict(part.split("=", 1) for part in given.split(";") if part.strip())
        except ValueError:
            raise SystemExit(f"{CORES_ENV}: expected role=cores;... (roles server, gateway, load, upstream)") from None
        unknown = set(named) - {"server", "gateway", "load", "upstream"}
        if unknown or not all(re.fullmatch(r"[0-9,-]+", v) for v in named.values()):
            raise SystemExit(f"{CORES_ENV}: roles are server, gateway, load, upstream, each a taskset -c list")
        roles.update(named)
    roles.setdefault("gateway", roles["load"])
    roles.setdefault("upstream", roles["load"])

    def pin(role: str) -> list[str]:
        return ["taskset", "-c", roles[role]]

    note = ", ".join(f"{r} on core(s) {c}" for r, c in roles.items())
    first = [roles["server"].split(",")[0].split("-")[0], roles["load"].split(",")[0].split("-")[0]]
    return Pinning(pin("server"), pin("load"), note, first, pin("gateway"), pin("upstream"))


def serve_command(repo: str, *extra: str) -> list[str]:
    """``batchgate serve`` of ``repo`` on loopback, every port picked free, the admin listener off
    (the ports are read from the ready line, :data:`BATCHGATE_READY`)."""
    return [
        sys.executable, "-m", "batchgate.cli", "serve", "--model-repository", repo, "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--admin-port", "-1", "--admin-http-port", "-1", *extra,
    ]  # fmt: skip


class Server:
    """A server process whose stderr goes to a log file that is watched for its ready line."""

    def __init__(self, name: str, cmd: list[str], ready: re.Pattern, log_path: Path, own_session: bool = False):
        """``own_session``: start it in a session of its own, so that (with the kernel's autogroup
        scheduling) all its threads together get an equal share of a core it shares with another
        such server (see :func:`corun`)."""
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - the server writes it until stop() closes it
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(HERE.parent),
            start_new_session=own_session,
        )
        self.match = self._wait_ready(ready)

    def _wait_ready(self, ready: re.Pattern) -> re.Match:
        t_end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < t_end:
            m = ready.search(self.log_path.read_text(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.name} did not start; its log ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)
        self._log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (every thread), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen, sig: int, wait_s: float = 15) -> None:
    """Ask ``proc`` to stop with ``sig``; killed if it has not within ``wait_s``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def autogroup_note() -> str:
    """Whether the kernel shares a core between sessions (autogroup) rather than between threads."""
    try:
        on = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        on = False
    return "autogroup on" if on else "autogroup OFF: a server's share of the core follows its thread count"


class CpuGroup:
    """A cgroup (v1 ``cpu`` controller) of its own for one process (its threads, not children it
    started before): with two such groups on one core, each gets half of it even when one of the
    processes has a busy child elsewhere (under autogroup alone, a server whose drift detector
    works on the other core was seen to take most of the shared core). Does nothing (``ok``
    False) where the controller cannot be written; ``close()`` moves the process back."""

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, pid: int, name: str):
        self.pid, self.path, self.ok = pid, self.ROOT / f"batchgate-bench-{os.getpid()}-{name}", False
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / "cgroup.procs").write_text(str(pid))
            self.ok = True
        except OSError:
            self.close()

    def close(self) -> None:
        try:
            if self.ok:
                (self.ROOT / "cgroup.procs").write_text(str(self.pid))
        except OSError:
            pass  # (it has ended)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def corun(drives: list) -> list:
    """Run every ``drive()`` at once, each in a thread of its own, started together; their results
    in order (the first exception, if any, is raised once all have ended).

    The co-run method: two servers pinned to the same core, each in its own session (see
    :class:`Server`), each driven by its own load tool on the other core over the same window. The
    kernel gives each server half the core, so their throughputs compare their costs a request,
    and whatever slows the machine during the window (steal, other tenants, frequency) slows both
    alike: a ratio within one co-run is far steadier than one between runs taken one after the
    other. Measure the method with a control pair (the same set-up twice)."""
    import threading

    results: list = [None] * len(drives)
    errors: list[BaseException] = []
    go = threading.Barrier(len(drives))

    def one(i: int) -> None:
        try:
            go.wait()
            results[i] = drives[i]()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(drives))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def core_jiffies(cores: list[str]) -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies of each listed core since boot, from /proc/stat. Busy includes
    the kernel's softirq time, where most of the loopback TCP work is charged."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:] in cores:
                v = [int(x) for x in vals]
                idle = v[3] + v[4]  # idle + iowait
                out[name[3:]] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def thread_times(pid: int) -> dict[int, tuple[str, int, int]]:
    """Each thread of ``pid``: its name, and the nanoseconds it has run on a core and waited for
    one while runnable (``/proc/PID/task/TID/schedstat``); empty where /proc lacks them."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait = f.read().split()[:2]
        except (OSError, ValueError):  # (a thread that ended meanwhile)
            continue
        out[int(tid)] = (name, int(run), int(wait))
    return out


def thread_shares(before: dict, after: dict, pid: int, seconds: float) -> dict:
    """Over ``seconds`` between two :func:`thread_times`: the fraction of the time the main
    thread (an asyncio server's event loop) ran, and waited, runnable, for a core; and the time
    the other threads ran together. On a core shared by the loop and a model's threads, the
    loop's wait is time in which a request that has arrived cannot be read, whatever the loop's
    own work."""
    if seconds <= 0 or pid not in after:
        return {}
    shares = {"other_threads_running": 0.0}
    for tid, (name, run, wait) in after.items():
        _, run0, wait0 = before.get(tid, (name, 0, 0))
        if tid == pid:
            shares["loop_running"] = (run - run0) / 1e9 / seconds
            shares["loop_waiting_for_core"] = (wait - wait0) / 1e9 / seconds
        else:
            shares["other_threads_running"] += (run - run0) / 1e9 / seconds
    return {k: round(v, 3) for k, v in shares.items()}


def busy_fraction(before: dict, after: dict, core: str) -> float:
    if core not in before or core not in after:
        return float("nan")
    busy = after[core][0] - before[core][0]
    total = after[core][1] - before[core][1]
    return busy / total if total else float("nan")


def run_tool(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[str, float]:
    """Run a load tool to completion; return its output and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stdout[-3000:]}")
    return p.stdout, cpu


def foreign_cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of every user-space process that is neither this one nor one of its
    children (kernel threads such as ksoftirqd are left out: they work for our traffic too)."""
    me, tck = os.getpid(), os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        if pid != me and ppid != me and pid != 2 and ppid != 2:
            out[pid] = (int(fields[11]) + int(fields[12])) / tck
    return out


def http_call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# ============================================================================ load tools


def h2load(
    pin: Pinning,
    port: int,
    frame_file: Path,
    clients: int,
    streams: int,
    seconds: float,
    log_file: Path | None,
    threads: int = 1,
    method: str = "ModelInfer",
) -> dict:
    cmd = [
        *pin.load,
        "h2load",
        "-t",
        str(threads),
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-D",
        f"{max(1, round(seconds * 1000))}ms",
        "-d",
        str(frame_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    cmd.append(f"http://127.0.0.1:{port}/inference.GRPCInferenceService/{method}")
    out, cpu = run_tool(cmd, timeout=seconds + 60)
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    r = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (m and r and s):
        raise BenchError(f"cannot read h2load's output:\n{out}")
    elapsed = float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}.get(m.group(2), 1.0)
    done, ok, failed, errored, timeouts = (int(r.group(i)) for i in (3, 4, 5, 6, 7))
    started = int(r.group(2))
    res = {
        "elapsed_s": elapsed,
        "done": done,
        "cut_off": started - done,
        "ok": ok,
        "errors": failed + errored + timeouts,
        "non_2xx": int(s.group(2)) + int(s.group(3)) + int(s.group(4)),
        "tool_cpu_s": cpu,
        "raw": out,
    }
    if log_file is not None:
        lat = np.loadtxt(log_file, usecols=2, dtype=np.int64, ndmin=1) if log_file.stat().st_size else np.zeros(0)
        if lat.size:
            res["latency_us"] = {
                "p50": float(np.percentile(lat, 50)),
                "p90": float(np.percentile(lat, 90)),
                "p99": float(np.percentile(lat, 99)),
                "p999": float(np.percentile(lat, 99.9)),
                "mean": float(lat.mean()),
                "max": float(lat.max()),
            }
    return res


def wrk(
    pin: Pinning, port: int, path: str, body_file: Path, connections: int, seconds: float, threads: int = 1
) -> dict:
    """POST the body in ``body_file`` to ``path`` with wrk (bench/wrk_post.lua)."""
    # wrk takes whole seconds
    cmd = [
        *pin.load,
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(HERE / "wrk_post.lua"),
        f"http://127.0.0.1:{port}{path}",
    ]
    out, cpu = run_tool(cmd, timeout=seconds + 60, env={"BENCH_BODY": str(body_file)})
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    j = json.loads(line[len("BENCH_JSON ") :])
    errors = sum(j["errors"][k] for k in ("connect", "read", "write", "timeout"))
    non_2xx = j["errors"]["status"]
    return {
        "elapsed_s": j["duration_us"] / 1e6,
        "done": j["requests"],
        "ok": j["requests"] - non_2xx,
        "errors": errors,
        "non_2xx": non_2xx,
        "latency_us": {k: float(v) for k, v in j["latency_us"].items()},
        "tool_cpu_s": cpu,
        "raw": out,
    }


# ============================================================================ small utilities


def finite(o):
    """NaN (a figure that could not be measured) becomes null: JSON has no NaN."""
    if isinstance(o, float):
        return o if o == o and abs(o) != float("inf") else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [finite(v) for v in o]
    return o


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def grpc_infer_raw(port: int, payload: bytes):
    """Send one serialized ModelInferRequest through a real gRPC client and return the
    ModelInferResponse; BenchError if the call fails."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            return call(payload, timeout=10)
        except grpc.RpcError as e:
            raise BenchError(f"the benchmark request fails over gRPC: {e.code().name}: {e.details()}") from None


def dataplane_rounds(
    repo: Path,
    cfg: Path,
    names: list[str],
    feed: tuple[str, np.ndarray],
    rounds: int,
    n: int,
    cpu: dict[str, list[float]] | None = None,
    detector_apart: bool = False,
) -> dict[str, list[float]]:
    """Microseconds a request through one in-process gateway's data plane (admit, infer,
    release: no transport), for each model name in turn, the order reversed every other round;
    this process pinned to one core while it runs (as a served gateway is). ``feed`` is the one
    FP32 input (name, [rows, features]): the requests take one row each, in turn. ``cpu`` gets
    this process's CPU microseconds a request (its threads; not a drift detector's, a child);
    ``detector_apart`` moves a drift detector process to another core (else it shares ours)."""
    import asyncio
    import threading

    from batchgate.app import Gateway
    from batchgate.config import load_settings
    from batchgate.core.types import RequestLimits, Tensor, new_request

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:1])
    flags = {"model_repository": str(repo), "host": "127.0.0.1", "http_port": 0, "grpc_port": 0}
    flags |= {"metrics_port": -1, "admin_port": -1, "admin_http_port": -1, "infer_threads": 1}
    settings = load_settings(str(cfg), flags, environ={})
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(600)

    gw = Gateway(settings)
    call(gw.start())
    dp = gw.dataplane
    limits = RequestLimits()
    if detector_apart and gw.drift is not None and len(cores) > 1:
        end = time.monotonic() + 30
        while gw.drift.detector_pid is None and time.monotonic() < end:
            time.sleep(0.1)
        if gw.drift.detector_pid is not None:
            os.sched_setaffinity(gw.drift.detector_pid, cores[1:2])

    async def run(name: str) -> float:
        rows = [feed[1][i : i + 1] for i in range(feed[1].shape[0])]
        reqs = [
            new_request(name, "", [Tensor(feed[0], "FP32", r.shape, r)], None, "", None, {}, 0.0, "grpc", limits)
            for r in rows
        ]
        t0 = time.perf_counter()
        for i in range(n):
            served = dp.admit(name, "", header=lambda k: None)
            try:
                await dp.infer(served, reqs[i % len(reqs)])
            finally:
                dp.release(served)
        return (time.perf_counter() - t0) / n * 1e6

    got: dict[str, list[float]] = {m: [] for m in names}
    try:
        for m in names:  # a round not counted: every model warm, its execution path settled
            call(run(m))
        for i in range(rounds):
            for m in names if i % 2 == 0 else list(reversed(names)):
                c0 = time.process_time()
                got[m].append(call(run(m)))
                if cpu is not None:
                    time.sleep(0.1)  # the sender and reader threads' share of what was just sampled
                    cpu.setdefault(m, []).append((time.process_time() - c0) / n * 1e6)
            say(f"  round {i + 1}: " + ", ".join(f"{m} {got[m][-1]:.1f} µs" for m in names) + " a request")
    finally:
        call(gw.stop(1.0))
        loop.call_soon_threadsafe(loop.stop)
        os.sched_setaffinity(0, cores)
    return got
