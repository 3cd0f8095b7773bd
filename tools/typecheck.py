"""Run mypy on the batchgate package as it is installed: ``python tools/typecheck.py [mypy args]``.

setuptools' ``package-dir`` maps ``server/`` to ``batchgate`` (and ``converters/``, ``loadtest/``
under it); the editable install finds them with an import hook, which mypy does not follow, and
mypy names a module after its folders (``server.core.types``). So this lays the package out as
installed, one symlink per entry, under the ``mypy_path`` that pyproject.toml's ``[tool.mypy]``
names, runs mypy there with that configuration, and prints the paths of the source tree
(``server/core/types.py``) rather than the links'.
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def lay_out(package_dir: dict[str, str], out: Path) -> dict[str, str]:
    """Symlink each mapped package's entries into ``out`` at its import path; return the
    prefixes to print back: link folder -> source folder, both relative to ROOT."""
    if out.exists():
        shutil.rmtree(out)
    prefixes: dict[str, str] = {}
    for package, source in sorted(package_dir.items()):  # a package before its subpackages
        src = ROOT / source
        dest = out / package.replace(".", "/")
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(src.iterdir()):
            if entry.name == "__pycache__" or f"{package}.{entry.name}" in package_dir:
                continue  # a mapped subpackage is laid out from its own folder
            (dest / entry.name).symlink_to(os.path.relpath(entry, dest))
        prefixes[f"{dest.relative_to(ROOT)}/"] = f"{Path(source)}/"
    return prefixes


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    with open("pyproject.toml", "rb") as f:
        tool = tomllib.load(f)["tool"]
    package_dir = tool["setuptools"]["package-dir"]
    mypy_path = tool["mypy"]["mypy_path"]  # one folder
    prefixes = lay_out(package_dir, ROOT / mypy_path)
    stdout, stderr, status = api.run(argv)
    for link, source in sorted(prefixes.items(), key=lambda p: -len(p[0])):  # deepest first
        stdout = stdout.replace(link, source)
        stderr = stderr.replace(link, source)
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
