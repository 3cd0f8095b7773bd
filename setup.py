"""The build compiles batchgate's own protos (proto/batchgate/...) with grpcio-tools into the
package (server/admin/v1/*_pb2*.py, not committed); everything else is in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = ["batchgate/admin/v1/admin.proto"]


def compile_protos() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    with tempfile.TemporaryDirectory() as out:
        for proto in PROTOS:
            args = ["protoc", f"-I{os.path.join(HERE, 'proto')}", f"-I{include}"]
            args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", proto]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        # batchgate/... (the proto package) lands in server/ (the Python package batchgate)
        generated = os.path.join(out, "batchgate")
        for root, _, files in os.walk(generated):
            target = os.path.join(HERE, "server", os.path.relpath(root, generated))
            os.makedirs(target, exist_ok=True)
            for name in files:
                shutil.copyfile(os.path.join(root, name), os.path.join(target, name))


class BuildPy(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPy})
