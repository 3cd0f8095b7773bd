"""Does a change regress serving speed? Two commits' benchmarks, alternated, compared.

Runs bench/serving.py and/or bench/batching.py for a BEFORE and an AFTER commit, one after the
other, for several rounds, and compares the medians over the rounds of the figures each benchmark
states against its own baseline measured in the same run (the bare echo servers; for batching also
batching off). Ratios, not raw requests/s: the machine's speed drifts, the ratio to a baseline
measured seconds apart drifts much less. Round 1 runs before then after, round 2 after then before,
and so on, so a slow drift of the machine does not favour either side.

    python bench/compare.py --before HEAD~1                    # after = HEAD, both benches, 5 rounds
    python bench/compare.py --before v1 --after v2 --bench serving --rounds 7
    python bench/compare.py --before HEAD~5 --bench serving --rounds 1 --quick   # smoke test (~2 min)
    python bench/compare.py --before HEAD~1 -- --duration 12   # arguments after -- go to every bench
    python bench/compare.py --before HEAD~1 --serving-args "--only grpc" --batching-args "--no-extras"
    make bench-compare BEFORE=HEAD~1 [AFTER=HEAD] [COMPARE_ARGS="--bench serving --rounds 7"]

REVs are anything ``git rev-parse`` takes (a sha, a tag, HEAD~3, a branch). The default AFTER is
HEAD, a commit: uncommitted changes in the working tree are NOT measured; commit them first (a
throw-away branch will do). Each commit is checked out with ``git worktree add --detach`` under
.cache/compare/<short-sha> (reused when present, refused when it has local changes) and gets a
venv under .cache/compare/<short-sha>-venv that reuses the main .venv's installed dependencies (a
.pth file naming its site-packages; nothing is downloaded) with only batchgate itself installed
from that worktree (``pip install --no-deps --no-build-isolation --no-index -e``). Before any run
the script checks that ``import batchgate`` in that venv resolves to the worktree's server/ (the
main .venv holds an editable finder pointing at this checkout's server/, which must not win) and
stops otherwise.

Each commit runs its own bench script (from its worktree) with its own venv's python. When the
script's interface differs between the two commits (the options its --help lists), or the BEFORE
commit has no such script, the AFTER commit's script is run for both, each with its own venv (so
each serves its own batchgate code); the report says which. Force either with --bench-script.

Figures compared (all ratios of throughput, higher is better):

- serving.py: batchgate's median successful requests/s over the bare grpc.aio echo's (gRPC, h2load)
  and over the bare ASGI echo's (HTTP/JSON, wrk): the benchmark's own ``verdicts.<proto>.ratio``.
- batching.py, at its headline load (64 concurrent single-row gRPC clients, main MLP): each server
  configuration's requests/s over the bare grpc.aio echo's of the same run -- batching off, the
  Triton policy, the work-conserving policy and the near-zero model (the gateway's own per-request
  path) -- and the batching speed-ups, Triton and work-conserving over batching off (the
  benchmark's ``verdicts.main.<policy>.ratio``; with the default, non-quick run also the HTTP/JSON
  ones, ``verdicts.http``).

For each figure the report gives the before and after medians over the rounds, after/before, and
the spread of each side (min-max; the interquartile range from 4 rounds on). Verdict per figure:
"no regression beyond noise" when the after median is at least the smallest before value (inside
the before spread, or above it), else "REGRESSION". With one round the spread is a point: a smoke
test, not a verdict.

One round is two runs of each chosen bench. Measured on the 2-core development machine:
serving.py ~2.5 min by default, ~25 s with --quick; batching.py ~4.5 min by default, ~35 s with
--quick. So the default comparison (5 rounds, both benches) takes about 70 minutes, --quick about
10. Run it on a quiet machine: the benches pin the server and the load tool to two cores.

Writes bench/results/compare-<before>-<after>.{json,md,png} (short shas; a -serving or -batching
suffix when only one bench ran); each run's own JSON, plot and log are kept under
.cache/compare/runs/. Exit status: 0 when every figure was measured on both sides and none
regressed, 1 when one regressed, 2 when a run failed or a figure is missing on one side (and
nothing regressed), 3 when the set-up failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = ROOT / ".cache" / "compare"
RESULTS = HERE / "results"
MAIN_VENV = ROOT / ".venv"
BENCHES = ("serving", "batching")
PTH_NAME = "_batchgate_compare_deps.pth"
STAMP_NAME = ".compare-ready.json"

# figure key -> (bench, label shown in the report)
FIGURES = {
    "serving.grpc": ("serving", "serving gRPC: batchgate / grpc.aio echo"),
    "serving.http": ("serving", "serving HTTP/JSON: batchgate / ASGI echo"),
    "batching.off/echo": ("batching", "batching 64 clients: batching off / grpc.aio echo"),
    "batching.triton/echo": ("batching", "batching 64 clients: Triton policy / grpc.aio echo"),
    "batching.work_conserving/echo": ("batching", "batching 64 clients: work-conserving / grpc.aio echo"),
    "batching.trivial/echo": ("batching", "batching 64 clients: near-zero model / grpc.aio echo"),
    "batching.triton/off": ("batching", "batching 64 clients: Triton policy / batching off"),
    "batching.work_conserving/off": ("batching", "batching 64 clients: work-conserving / batching off"),
    "batching.http.triton/off": ("batching", "batching HTTP 64 conns: Triton policy / batching off"),
    "batching.http.work_conserving/off": ("batching", "batching HTTP 64 conns: work-conserving / batching off"),
}


class SetupError(RuntimeError):
    """A commit could not be checked out or given a venv that serves its own code."""


def say(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git(*args: str, cwd: Path = ROOT) -> str:
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SetupError(f"git {' '.join(args)} (in {cwd}) failed: {p.stderr.strip()}")
    return p.stdout.strip()


def clean_env(venv: Path | None = None) -> dict:
    """The environment for a child: no PYTHONPATH or other venv leaking in; ``venv`` active."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")
    }
    env["PYTHONNOUSERSITE"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


# ============================================================================ commits and venvs


@dataclass
class Rev:
    role: str  # before | after
    spec: str  # as given
    sha: str
    short: str
    subject: str
    tree: Path = Path()
    venv: Path = Path()
    batchgate_file: str = ""

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def resolve(role: str, spec: str) -> Rev:
    sha = git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    short = git("rev-parse", "--short", sha)
    subject = git("log", "-1", "--format=%s", sha)
    return Rev(role, spec, sha, short, subject)


def ensure_worktree(rev: Rev) -> None:
    path = CACHE / rev.short
    if path.exists():
        # inside this checkout, so a plain folder would answer for the main repository: ask for
        # its own top level
        top = Path(git("rev-parse", "--show-toplevel", cwd=path)).resolve()
        if top != path.resolve():
            raise SetupError(f"{path} exists but is not a git worktree; remove it (it is under .cache/)")
        head = git("rev-parse", "HEAD", cwd=path)
        if head != rev.sha:
            raise SetupError(
                f"worktree {path} is at {head[:10]}, not {rev.sha[:10]}; "
                f"remove it with `git worktree remove --force {path}`"
            )
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=path)
        if dirty:
            raise SetupError(
                f"worktree {path} has local changes, so it is not {rev.short}:\n{dirty}\n"
                f"remove it with `git worktree remove --force {path}`"
            )
        say(f"{rev.role} {rev.short}: reusing worktree {path.relative_to(ROOT)}")
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(path), rev.sha)
        say(f"{rev.role} {rev.short}: worktree {path.relative_to(ROOT)} added")
    rev.tree = path


def main_site_packages(deps_venv: Path) -> Path:
    py = deps_venv / "bin" / "python"
    if not py.exists():
        raise SetupError(f"no {py}: build the main venv first (`make install`)")
    p = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd="/",
    )
    if p.returncode != 0:
        raise SetupError(f"{py} does not run: {p.stderr.strip()}")
    return Path(p.stdout.strip())


VERIFY = (
    "import json, sys, batchgate, batchgate.cli, batchgate.demo\n"
    "print(json.dumps({'batchgate': batchgate.__file__, 'cli': batchgate.cli.__file__, "
    "'demo': batchgate.demo.__file__, 'prefix': sys.prefix}))"
)


def verify_venv(rev: Rev) -> str | None:
    """None when ``batchgate`` (and the modules the benches use) import from the worktree's
    server/ in the commit's venv, from the folders the benches run in; else what is wrong."""
    want = (rev.tree / "server").resolve()
    for cwd in (rev.tree, rev.tree / "bench", ROOT):
        if not cwd.is_dir():
            continue
        p = subprocess.run(
            [str(rev.python), "-c", VERIFY], cwd=cwd, capture_output=True, text=True, env=clean_env(rev.venv)
        )
        if p.returncode != 0:
            return f"import batchgate fails (cwd {cwd}): {p.stderr.strip()[-1500:]}"
        got = json.loads(p.stdout.strip().splitlines()[-1])
        for mod in ("batchgate", "cli", "demo"):
            f = Path(got[mod]).resolve()
            if not f.is_relative_to(want):
                return f"{mod} imports from {f}, not from {want} (cwd {cwd})"
        rev.batchgate_file = got["batchgate"]
    return None


def ensure_venv(rev: Rev, deps_site: Path) -> None:
    rev.venv = CACHE / f"{rev.short}-venv"
    stamp = rev.venv / STAMP_NAME
    want = {"sha": rev.sha, "tree": str(rev.tree), "deps_site": str(deps_site)}
    if stamp.exists():
        try:
            ok = json.loads(stamp.read_text()) == want
        except ValueError:
            ok = False
        if ok and verify_venv(rev) is None:
            say(
                f"{rev.role} {rev.short}: reusing venv {rev.venv.relative_to(ROOT)} (batchgate from "
                f"{Path(rev.batchgate_file).relative_to(ROOT)})"
            )
            return
    if rev.venv.exists():
        # only ever a folder this script made, under .cache/compare
        assert rev.venv.resolve().is_relative_to(CACHE.resolve()), rev.venv
        shutil.rmtree(rev.venv)
    say(f"{rev.role} {rev.short}: creating venv {rev.venv.relative_to(ROOT)} on the main venv's dependencies")
    # The main venv's python makes a venv on the same base interpreter (same version, same ABI).
    # Without pip: ensurepip would also bring its own, older setuptools, which would shadow the
    # main venv's (the build backend pyproject.toml asks for); pip itself comes from there too.
    subprocess.run(
        [str(MAIN_VENV / "bin" / "python"), "-m", "venv", "--without-pip", str(rev.venv)], check=True, env=clean_env()
    )
    p = subprocess.run(
        [str(rev.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env=clean_env(rev.venv),
        cwd="/",
    )
    own_site = Path(p.stdout.strip())
    # A plain path line: the main site-packages joins sys.path after the venv's own, and its .pth
    # files (among them the editable finder for this checkout's batchgate) are not run. pip (the
    # main venv's) installs into this venv, sys.prefix, and leaves the main venv's batchgate alone:
    # it never uninstalls outside the running environment.
    (own_site / PTH_NAME).write_text(f"{deps_site}\n")
    cmd = [
        str(rev.python),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "-e",
        str(rev.tree),
    ]
    p = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(rev.venv), cwd=rev.tree
    )
    if p.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}")
    problem = verify_venv(rev)
    if problem:
        raise SetupError(f"{rev.role} {rev.short}: the venv does not serve the worktree's code: {problem}")
    stamp.write_text(json.dumps(want))
    say(f"{rev.role} {rev.short}: batchgate imports from {Path(rev.batchgate_file).relative_to(ROOT)}")


def check_main_venv_untouched(deps_venv: Path) -> None:
    """The main venv must still resolve batchgate to this checkout (nothing here may change it)."""
    p = subprocess.run(
        [str(deps_venv / "bin" / "python"), "-c", "import batchgate; print(batchgate.__file__)"],
        capture_output=True,
        text=True,
        env=clean_env(deps_venv),
        cwd="/",
    )
    if p.returncode != 0 or not Path(p.stdout.strip()).resolve().is_relative_to((ROOT / "server").resolve()):
        say(f"warning: the main venv's batchgate now resolves to {p.stdout.strip() or p.stderr.strip()[-300:]}")


# ============================================================================ bench scripts


def bench_options(python: Path, script: Path, venv: Path) -> set[str] | None:
    """The options a bench script's --help lists, or None when it has none or fails."""
    if not script.exists():
        return None
    p = subprocess.run(
        [str(python), str(script), "--help"],
        cwd=script.parent.parent,
        capture_output=True,
        text=True,
        env=clean_env(venv),
        timeout=120,
    )
    if p.returncode != 0:
        return None
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", p.stdout)) - {"--help"}


def choose_scripts(bench: str, revs: dict[str, Rev], mode: str, bench_args: list[str]) -> dict:
    """Which script each commit runs: {'mode': own|after, 'why': ..., 'script': {role: Path}}."""
    opts = {role: bench_options(r.python, r.tree / "bench" / f"{bench}.py", r.venv) for role, r in revs.items()}
    if opts["after"] is None:
        raise SetupError(
            f"the after commit {revs['after'].short} has no working bench/{bench}.py (`{bench}.py --help` failed)"
        )
    if mode == "own" and opts["before"] is None:
        raise SetupError(
            f"--bench-script own, but the before commit {revs['before'].short} has no working bench/{bench}.py"
        )
    if mode == "auto":
        if opts["before"] is None:
            mode, why = "after", f"the before commit has no working bench/{bench}.py"
        elif opts["before"] != opts["after"]:
            diff = sorted(opts["before"] ^ opts["after"])
            mode, why = "after", f"the script's options differ between the commits ({', '.join(diff)})"
        else:
            mode, why = "own", "same options on both commits"
    else:
        why = f"--bench-script {mode}"
    script = {
        role: (r.tree if mode == "own" else revs["after"].tree) / "bench" / f"{bench}.py" for role, r in revs.items()
    }
    needed = {a.split("=", 1)[0] for a in bench_args if a.startswith("--")} | {"--output"}
    for role in revs:
        have = opts[role] if mode == "own" else opts["after"]
        missing = needed - have
        if missing:
            raise SetupError(
                f"bench/{bench}.py of the {role if mode == 'own' else 'after'} commit has no "
                f"{', '.join(sorted(missing))}"
            )
    return {"mode": mode, "why": why, "script": script}


# ============================================================================ figures


def serving_figures(doc: dict) -> tuple[dict, dict]:
    figs, info = {}, {}
    for proto, v in (doc.get("verdicts") or {}).items():
        if v.get("ratio") is not None:
            figs[f"serving.{proto}"] = float(v["ratio"])
    for r in doc.get("results") or []:
        if r.get("median"):
            info[f"{r['protocol']} {'echo' if r['baseline'] else 'batchgate'} req/s"] = r["median"]["rps"]
    return figs, info


def batching_figures(doc: dict) -> tuple[dict, dict]:
    figs, info = {}, {}
    head = str((doc.get("meta") or {}).get("headline_clients", 64))
    main = (doc.get("summary") or {}).get("main") or {}

    def rps(cfg: str) -> float | None:
        e = (main.get(cfg) or {}).get(head)
        return e["rps"] if e and e.get("valid") and e.get("rps") else None

    echo = rps("echo")
    for cfg in ("off", "triton", "work_conserving", "trivial", "echo"):
        if rps(cfg) is not None:
            info[f"{cfg} req/s"] = rps(cfg)
        if echo and cfg != "echo" and rps(cfg) is not None:
            figs[f"batching.{cfg}/echo"] = rps(cfg) / echo
    verdicts = doc.get("verdicts") or {}
    for case, prefix in (("main", "batching."), ("http", "batching.http.")):
        for cfg in ("triton", "work_conserving"):
            r = (verdicts.get(case) or {}).get(cfg, {}).get("ratio")
            if r is not None:
                figs[f"{prefix}{cfg}/off"] = float(r)
    return figs, info


def figures_of(bench: str, doc: dict) -> tuple[dict, dict]:
    return serving_figures(doc) if bench == "serving" else batching_figures(doc)


# ============================================================================ runs


@dataclass
class RunRecord:
    round: int
    bench: str
    role: str
    sha: str
    position: int  # 0: first of the pair in its round, 1: second
    exit_code: int | None = None
    wall_s: float = 0.0
    figures: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    error: str | None = None
    folder: str = ""


def run_bench(rec: RunRecord, rev: Rev, script: Path, bench_args: list[str], folder: Path, stream: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rec.folder = str(folder.relative_to(ROOT))
    cmd = [str(rev.python), str(script), *bench_args, "--output", str(folder)]
    log_path = folder / "log.txt"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        if stream:
            p = subprocess.Popen(
                cmd,
                cwd=script.parent.parent,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=clean_env(rev.venv),
            )
            for line in p.stdout:
                log.write(line)
                sys.stderr.write("    " + line)
            p.wait()
            rc = p.returncode
        else:
            rc = subprocess.run(
                cmd, cwd=script.parent.parent, stdout=log, stderr=subprocess.STDOUT, env=clean_env(rev.venv)
            ).returncode
    rec.wall_s = round(time.monotonic() - t0, 1)
    rec.exit_code = rc
    out = folder / f"{rec.bench}.json"
    if not out.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        rec.error = f"no {out.name} written (exit {rc}); log {rec.folder}/log.txt ends with:\n{tail}"
        return
    try:
        rec.figures, rec.info = figures_of(rec.bench, json.loads(out.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        rec.error = f"cannot read {out}: {e!r}"
        return
    if rc != 0:
        rec.error = f"exit {rc}: some measurement was invalid (see {rec.folder}/log.txt)"


# ============================================================================ statistics and report


def spread(vals: list[float]) -> dict | None:
    if not vals:
        return None
    s = {"n": len(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
    if len(vals) >= 4:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
        s.update(q1=q1, q3=q3, iqr=q3 - q1)
    return s


def summarize(records: list[RunRecord], figure_keys: list[str]) -> dict:
    out = {}
    for key in figure_keys:
        side = {
            role: spread([r.figures[key] for r in records if r.role == role and key in r.figures])
            for role in ("before", "after")
        }
        if side["before"] is None and side["after"] is None:
            continue
        b, a = side["before"], side["after"]
        if b is None or a is None:
            verdict, ratio = "INCOMPLETE", None
        else:
            ratio = a["median"] / b["median"] if b["median"] else None
            if b["n"] < 2:
                verdict = "no verdict: one before value, no spread"
            elif a["median"] >= b["min"]:
                verdict = "no regression beyond noise"
            else:
                verdict = "REGRESSION"
        # paired per round: after / before of the same round
        paired = []
        for rnd in sorted({r.round for r in records}):
            pair = {r.role: r.figures.get(key) for r in records if r.round == rnd and r.bench == FIGURES[key][0]}
            if pair.get("before") and pair.get("after") is not None:
                paired.append(pair["after"] / pair["before"])
        out[key] = {
            "label": FIGURES[key][1],
            "bench": FIGURES[key][0],
            "before": b,
            "after": a,
            "after_over_before": ratio,
            "paired_after_over_before": spread(paired),
            "verdict": verdict,
            "improved_beyond_noise": bool(a and b and b["n"] >= 2 and a["median"] > b["max"]),
        }
    return out


def fmt_spread(s: dict | None) -> str:
    if s is None:
        return "-"
    txt = f"{s['min']:.3f}-{s['max']:.3f}"
    if "iqr" in s:
        txt += f"; IQR {s['q1']:.3f}-{s['q3']:.3f}"
    return txt + f" (n={s['n']})"


def short_subject(s: str, n: int = 100) -> str:
    return s if len(s) <= n else s[: n - 3].rstrip() + "..."


def markdown(doc: dict) -> str:
    m = doc["meta"]
    b, a = m["revs"]["before"], m["revs"]["after"]
    args_txt = ", ".join(f"{k}.py `{shlex.join(v) or '(defaults)'}`" for k, v in m["bench_args"].items())
    lines = [
        f"## Benchmark comparison: {b['short']} -> {a['short']}",
        "",
        f"- before: `{b['short']}` ({b['spec']}) {short_subject(b['subject'])}",
        f"- after: `{a['short']}` ({a['spec']}) {short_subject(a['subject'])}",
        f"- {m['rounds_done']} of {m['rounds']} round(s), alternated (odd rounds before first, even rounds "
        f"after first); bench arguments: {args_txt}",
        *(
            f"- {bench}.py: {s['mode']} script"
            f"{' (the after commit’s, for both)' if s['mode'] == 'after' else ' of each commit'}"
            f" - {s['why']}"
            for bench, s in m["scripts"].items()
        ),
        f"- {m['cpu_model']}, {m['cpus']} CPUs; load average at start {m['loadavg_start']}; {m['wall_s']:.0f} s",
        "",
        "| figure | before median | before spread | after median | after spread | after/before "
        "| paired after/before per round: median (min-max) | verdict |",
        "|---|---:|---|---:|---|---:|---|---|",
    ]
    for f in doc["figures"].values():
        bm = f"{f['before']['median']:.3f}" if f["before"] else "-"
        am = f"{f['after']['median']:.3f}" if f["after"] else "-"
        ratio = f"{f['after_over_before']:.3f}" if f["after_over_before"] is not None else "-"
        verdict = f["verdict"] if f["verdict"] != "REGRESSION" else "**REGRESSION**"
        if f["improved_beyond_noise"]:
            verdict += " (improved beyond noise)"
        p = f["paired_after_over_before"]
        paired = f"{p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f})" if p else "-"
        lines.append(
            f"| {f['label']} | {bm} | {fmt_spread(f['before'])} | {am} | {fmt_spread(f['after'])} | "
            f"{ratio} | {paired} | {verdict} |"
        )
    lines += ["", f"**{doc['verdict']}**"]
    if m["rounds_done"] < 5:
        lines.append(f"\n({m['rounds_done']} round(s): the issue asks for at least 5 before a verdict is quoted)")
    if doc["failed_runs"]:
        lines += ["", "Failed or partly invalid runs:"]
        lines += [
            f"- round {r['round']} {r['bench']} {r['role']}: {r['error'].splitlines()[0]}" for r in doc["failed_runs"]
        ]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = doc["figures"]
    if not figs:
        return
    n = len(figs)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    colors = {"before": "#8a939c", "after": "#2f6fb3"}
    runs = doc["runs"]
    for ax, (key, f) in zip(axes.flat, figs.items()):
        for x, role in enumerate(("before", "after")):
            pts = [(r["round"], r["figures"][key]) for r in runs if r["role"] == role and key in r["figures"]]
            if not pts:
                continue
            k = len(pts)
            xs = [x + (i - (k - 1) / 2) * (0.3 / max(k - 1, 1)) for i in range(k)]
            ax.scatter(xs, [p[1] for p in pts], color=colors[role], s=22, zorder=3, alpha=0.85)
            s = f[role]
            ax.hlines(s["median"], x - 0.3, x + 0.3, color=colors[role], lw=2.5, zorder=4)
            ax.text(x + 0.32, s["median"], f"{s['median']:.3f}", va="center", fontsize=7)
            if "q1" in s:
                ax.add_patch(
                    plt.Rectangle(
                        (x - 0.22, s["q1"]), 0.44, s["q3"] - s["q1"], color=colors[role], alpha=0.15, zorder=1
                    )
                )
        vals = [v for role in ("before", "after") if f[role] for v in f[role]["values"]]
        lo, hi = min(vals), max(vals)
        mid = statistics.median(vals)
        pad = max(0.05 * abs(mid), 0.15 * (hi - lo), 1e-3)  # +-5% at least: noise should look like noise
        ax.set_ylim(lo - pad, hi + pad)
        if f["before"] and f["before"]["n"] >= 2:
            ax.axhline(f["before"]["min"], color=colors["before"], ls=":", lw=1, zorder=2)
        ax.set_xticks(
            [0, 1],
            [f"before\n{doc['meta']['revs']['before']['short']}", f"after\n{doc['meta']['revs']['after']['short']}"],
            fontsize=8,
        )
        ax.set_xlim(-0.6, 1.8)
        ratio = f"after/before {f['after_over_before']:.3f}" if f["after_over_before"] is not None else "incomplete"
        color = "#b3261e" if f["verdict"] == "REGRESSION" else "#1b7f3b" if f["verdict"].startswith("no") else "black"
        ax.set_title(f"{f['label']}\n{ratio}: {f['verdict']}", fontsize=8, color=color)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = doc["meta"]
    fig.suptitle(
        f"ratios to each bench's baseline, per round (dots), medians (bars), IQR (shaded, >= 4 rounds),\n"
        f"smallest before value (dotted: an after median under it is a regression); "
        f"{m['rounds_done']} round(s), alternated\n{m['cpu_model']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


# ============================================================================ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        description="Alternate two commits' benchmark runs; compare the medians and spread of the ratios to the "
        "bare echo (and to batching off). Arguments after -- go to every bench run.",
        epilog="Example: python bench/compare.py --before HEAD~1 --bench serving --rounds 5",
    )
    ap.add_argument("--before", required=True, help="the commit before the change (any git rev)")
    ap.add_argument(
        "--after",
        default="HEAD",
        help="the commit with the change (default HEAD; uncommitted changes are not measured)",
    )
    ap.add_argument("--bench", choices=("serving", "batching", "both"), default="both", help="default both")
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds; each runs every chosen bench once per commit (default 5; the issue asks >= 5)",
    )
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benches (smoke test)")
    ap.add_argument("--serving-args", default="", help="extra arguments for serving.py only (one string)")
    ap.add_argument("--batching-args", default="", help="extra arguments for batching.py only (one string)")
    ap.add_argument(
        "--bench-script",
        choices=("auto", "own", "after"),
        default="auto",
        help="auto (default): each commit runs its own bench script unless the script's options differ "
        "between them, then the after commit's for both; own / after: force it",
    )
    ap.add_argument(
        "--deps-venv",
        type=Path,
        default=MAIN_VENV,
        help="the venv whose installed packages the commits' venvs reuse (default .venv)",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the report goes (default bench/results)")
    ap.add_argument("--stream", action="store_true", help="show the benches' own progress too")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.extra = extra
    if any(
        a == "--output" or a.startswith("--output=")
        for a in extra + shlex.split(args.serving_args) + shlex.split(args.batching_args)
    ):
        ap.error("--output is set by compare.py (each run writes under .cache/compare/runs/); use --results")
    if any(a == "--rounds" or a.startswith("--rounds=") for a in extra):
        say(
            "note: --rounds after -- sets the benches' own rounds inside each run; compare.py's rounds are "
            f"--rounds before -- ({args.rounds})"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()
    benches = list(BENCHES) if args.bench == "both" else [args.bench]
    missing = [t for t in ("h2load", "wrk") if shutil.which(t) is None]
    if missing:
        say(f"missing load tools: {', '.join(missing)}; install them with `make bench-tools`")
        return 3
    bench_args = {}
    for bench in benches:
        own = shlex.split(args.serving_args if bench == "serving" else args.batching_args)
        bench_args[bench] = (["--quick"] if args.quick else []) + args.extra + own
    try:
        revs = {"before": resolve("before", args.before), "after": resolve("after", args.after)}
        if revs["before"].sha == revs["after"].sha:
            say(
                f"warning: before and after are the same commit ({revs['before'].short}): an A/A run, "
                "which measures the noise"
            )
        deps_site = main_site_packages(args.deps_venv.resolve())
        for rev in revs.values():  # the same commit twice (an A/A run) reuses one worktree and venv
            ensure_worktree(rev)
            ensure_venv(rev, deps_site)
        check_main_venv_untouched(args.deps_venv.resolve())
        scripts = {b: choose_scripts(b, revs, args.bench_script, bench_args[b]) for b in benches}
    except (SetupError, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        say(f"set-up failed: {e}")
        return 3
    for bench, s in scripts.items():
        what = (
            "each commit runs its own"
            if s["mode"] == "own"
            else f"the after commit's ({revs['after'].short}) script for both"
        )
        say(f"{bench}.py: {what} ({s['why']}); args: {shlex.join(bench_args[bench]) or '(defaults)'}")

    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    say(
        f"load average {loadavg}; {args.rounds} round(s) of {', '.join(benches)}, "
        f"{revs['before'].short} (before) vs {revs['after'].short} (after)"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_dir = CACHE / "runs" / f"{revs['before'].short}-{revs['after'].short}-{stamp}"
    records: list[RunRecord] = []
    total = args.rounds * len(benches) * 2
    rounds_done = 0
    interrupted = False
    t_runs = time.monotonic()
    try:
        for rnd in range(1, args.rounds + 1):
            order = ("before", "after") if rnd % 2 == 1 else ("after", "before")
            for bench in benches:
                for pos, role in enumerate(order):
                    rev = revs[role]
                    rec = RunRecord(rnd, bench, role, rev.sha, pos)
                    records.append(rec)
                    run_bench(
                        rec,
                        rev,
                        scripts[bench]["script"][role],
                        bench_args[bench],
                        runs_dir / f"r{rnd}-{bench}-{pos}-{role}-{rev.short}",
                        args.stream,
                    )
                    figs = ", ".join(f"{k.split('.', 1)[1]} {v:.3f}" for k, v in rec.figures.items()) or "no figures"
                    left = total - len(records)
                    mean = (time.monotonic() - t_runs) / len(records)
                    say(
                        f"round {rnd}/{args.rounds} {bench:8s} {role:6s} {rev.short}: {figs} "
                        f"({rec.wall_s:.0f} s, exit {rec.exit_code})"
                        f"{' -- ' + rec.error.splitlines()[0] if rec.error else ''}"
                        f"{f'; ~{left * mean / 60:.0f} min left' if left else ''}"
                    )
            rounds_done = rnd
    except KeyboardInterrupt:
        interrupted = True
        records = [r for r in records if r.exit_code is not None]
        say("interrupted: reporting the runs that finished")

    keys = [k for k in FIGURES if FIGURES[k][0] in benches]
    figures = summarize(records, keys)
    failed = [r for r in records if r.error]
    if any(f["verdict"] == "REGRESSION" for f in figures.values()):
        bad = [f["label"] for f in figures.values() if f["verdict"] == "REGRESSION"]
        verdict, code = "REGRESSION: " + "; ".join(bad), 1
    elif not figures or failed or interrupted or any(f["verdict"] == "INCOMPLETE" for f in figures.values()):
        verdict, code = "no regression beyond noise in what was measured, but the comparison is incomplete", 2
    elif any(f["verdict"].startswith("no verdict") for f in figures.values()):
        verdict, code = "no verdict: one round gives no spread to judge noise by (the issue asks for >= 5)", 2
    else:
        verdict, code = "no regression beyond noise", 0
    per_run = {}
    for bench in benches:
        for mode in ("before", "after"):
            w = [r.wall_s for r in records if r.bench == bench and r.role == mode and r.exit_code is not None]
            if w:
                per_run[f"{bench} {mode}"] = statistics.median(w)
    doc = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join(["bench/compare.py", *(sys.argv[1:] if argv is None else argv)]),
            "revs": {
                role: {
                    "spec": r.spec,
                    "sha": r.sha,
                    "short": r.short,
                    "subject": r.subject,
                    "worktree": str(r.tree.relative_to(ROOT)),
                    "venv": str(r.venv.relative_to(ROOT)),
                    "batchgate_imported_from": r.batchgate_file,
                }
                for role, r in revs.items()
            },
            "benches": benches,
            "rounds": args.rounds,
            "rounds_done": rounds_done,
            "interrupted": interrupted,
            "order": "odd rounds: before then after; even rounds: after then before",
            "bench_args": bench_args,
            "scripts": {
                b: {
                    "mode": s["mode"],
                    "why": s["why"],
                    "script": {role: str(p.relative_to(ROOT)) for role, p in s["script"].items()},
                }
                for b, s in scripts.items()
            },
            "median_run_wall_s": per_run,
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "loadavg_start": loadavg,
            "runs_dir": str(runs_dir.relative_to(ROOT)),
            "wall_s": round(time.monotonic() - t_start, 1),
            "verdict_rule": "per figure: no regression beyond noise when the after median >= the smallest "
            "before value, else REGRESSION (all figures: higher is better)",
        },
        "figures": figures,
        "verdict": verdict,
        "failed_runs": [{"round": r.round, "bench": r.bench, "role": r.role, "error": r.error} for r in failed],
        "runs": [r.__dict__ for r in records],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = "" if len(benches) == 2 else f"-{benches[0]}"
    base = args.results / f"compare-{revs['before'].short}-{revs['after'].short}{suffix}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    base.with_suffix(".md").write_text(md)
    try:
        plot(doc, base.with_suffix(".png"))
    except Exception as e:  # the JSON and the table are the result; the plot is a nicety
        say(f"could not draw the plot: {e!r}")
    print(md)
    say(f"wrote {base.with_suffix('.json')}, .md and .png in {doc['meta']['wall_s']:.0f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
