"""A self-contained kit that runs bench/workers.py on a larger machine without registry access.

    python bench/workers_kit.py                      # writes bench/results/workers-kit.tar.gz
    python bench/workers_kit.py --python 3.10,3.11,3.12

The kit holds:
- ``wheels/``: batchgate's own wheel and every wheel it needs to serve (plus matplotlib for the
  plot), for each Python version asked (x86_64 Linux, manylinux);
- ``tools/``: ``h2load`` and ``wrk`` from this machine with the shared libraries they need but glibc
  and the C++ runtime (so the target needs glibc >= 2.34 and a libstdc++ of GCC 12 or later, as
  Ubuntu 22.04 and Debian 12 have; a system h2load / wrk is used first when present);
- ``bench/``: workers.py and what it imports;
- ``run.sh``: makes a virtual environment from the wheels alone (``pip --no-index``), then runs
  ``bench/workers.py --workers 2,4,8`` (``WORKERS=...``, ``CONNECTIONS=...``, ``ARGS=...`` change
  it) and packs the results into ``workers-results.tar.gz`` next to it.

On the target: ``tar xzf workers-kit.tar.gz && cd workers-kit && ./run.sh``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
# Shared libraries the target brings itself (bundling them would tie the kit to this glibc).
SYSTEM_LIBS = ("linux-vdso", "libc.so", "libm.so", "libpthread", "libdl.so", "librt.so", "ld-linux", "libstdc++",
               "libgcc_s")  # fmt: skip
EXTRA = ("matplotlib>=3.8,<4",)

RUN_SH = """#!/bin/sh
# Run bench/workers.py from this kit: no registry access needed.
set -eu
cd "$(dirname "$0")"
KIT=$(pwd)
PY=${PYTHON:-python3}
VER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ ! -d "wheels/$VER" ]; then
  echo "this kit has wheels for: $(ls wheels); $PY is $VER (set PYTHON=...)" >&2; exit 2
fi
if [ ! -x venv/bin/python ]; then
  echo "==> virtual environment from wheels/$VER (no registry access)"
  $PY -m venv venv
  venv/bin/pip install --no-index --find-links "wheels/$VER" --quiet batchgate @EXTRA@
fi
for tool in h2load wrk; do
  if ! command -v $tool >/dev/null 2>&1; then
    export PATH="$KIT/tools/bin:$PATH" LD_LIBRARY_PATH="$KIT/tools/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if ldd "$KIT/tools/bin/$tool" | grep -q 'not found'; then
      echo "tools/bin/$tool misses libraries here:" >&2; ldd "$KIT/tools/bin/$tool" | grep 'not found' >&2; exit 2
    fi
  fi
done
echo "==> $(nproc) cores; h2load: $(command -v h2load); wrk: $(command -v wrk)"
mkdir -p results
venv/bin/python bench/workers.py --workers "${WORKERS:-2,4,8}" --connections "${CONNECTIONS:-256}" \\
  --out results --plot results/bench-workers.png ${ARGS:-}
tar czf workers-results.tar.gz results
echo "==> results in $KIT/workers-results.tar.gz (bring it back for the closing note)"
"""


def say(msg: str) -> None:
    print(f"[kit] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    say(" ".join(cmd)[:200])
    subprocess.run(cmd, check=True, **kw)


def libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].strip().startswith("/"):
            path = parts[1].split("(")[0].strip()
            if not any(os.path.basename(path).startswith(s) for s in SYSTEM_LIBS):
                libs.append(path)
    return libs


def build(kit: Path, versions: list[str]) -> None:
    wheels = kit / "wheels"
    with tempfile.TemporaryDirectory() as d:
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", d, str(ROOT)])
        own = next(Path(d).glob("batchgate-*.whl"))
        for v in versions:
            dest = wheels / v
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(own, dest)
            plat = [x for p in PLATFORMS for x in ("--platform", p)]
            run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", v,
                 *plat, "-d", str(dest), str(own), *EXTRA])  # fmt: skip
    (kit / "tools" / "bin").mkdir(parents=True)
    (kit / "tools" / "lib").mkdir()
    for tool in ("h2load", "wrk"):
        path = shutil.which(tool)
        if path is None:
            raise SystemExit(f"{tool} is not installed here (make bench-tools installs it)")
        shutil.copy(path, kit / "tools" / "bin" / tool)
        for lib in libraries(path):
            shutil.copy(lib, kit / "tools" / "lib" / os.path.basename(lib))
    (kit / "bench").mkdir()
    for f in ("workers.py", "common.py", "wrk_post.lua"):
        shutil.copy(HERE / f, kit / "bench" / f)
    script = kit / "run.sh"
    script.write_text(RUN_SH.replace("@EXTRA@", " ".join(f"'{e}'" for e in EXTRA)))
    script.chmod(0o755)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                    help="Python versions to bring wheels for, comma-separated (default: this one)")  # fmt: skip
    ap.add_argument("--out", default=str(HERE / "results" / "workers-kit.tar.gz"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        kit = Path(d) / "workers-kit"
        build(kit, [v.strip() for v in args.python.split(",") if v.strip()])
        with tarfile.open(out, "w:gz") as tar:
            tar.add(kit, arcname="workers-kit")
    say(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB): tar xzf it on the target, then workers-kit/run.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
