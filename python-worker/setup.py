"""Generates the gRPC stubs from the repository's proto/ at build time.

The contract lives in ../proto/infergate/v1/*.proto; the stubs are never
checked in. Any build of this package (wheel, sdist install from the repo,
editable install) runs protoc from grpcio-tools first.
"""

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent / "proto"
OUT = HERE / "src"


class GenerateStubs(Command):
    description = "generate infergate.v1 gRPC stubs from ../proto"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        protos = sorted(PROTO_ROOT.glob("infergate/v1/*.proto"))
        if not protos:
            raise SystemExit(f"no .proto files under {PROTO_ROOT}/infergate/v1")
        from grpc_tools import protoc

        pkg = OUT / "infergate" / "v1"
        pkg.mkdir(parents=True, exist_ok=True)
        (OUT / "infergate" / "__init__.py").touch()
        (pkg / "__init__.py").touch()
        well_known = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + ", ".join(map(str, protos)))


class BuildPy(build_py):
    def run(self) -> None:
        self.run_command("generate_stubs")
        super().run()


setup(cmdclass={"generate_stubs": GenerateStubs, "build_py": BuildPy})
