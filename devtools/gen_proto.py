"""Generates the Python code of Herald's gRPC API from proto/ into pipeline/proto
(``make proto``). The generated files are committed, so a checkout, an installed package and
mypy need no code generator; tests/unit/test_proto.py regenerates them into a temporary
directory and fails when the committed ones differ.

    python -m devtools.gen_proto            write pipeline/proto
    python -m devtools.gen_proto OUT_DIR    write OUT_DIR instead

grpcio-tools is pinned in the dev extra: its protoc writes its own version into the files, so
another version would make them differ. protoc writes ``from herald.v1 import ...`` into the
service module, an import only a top-level ``herald`` package could satisfy; it is rewritten
to a relative import, so the package can live under ``pipeline``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from pipeline.settings import project_root

__all__ = ["PROTO_FILES", "generate"]

PROTO_ROOT = project_root() / "proto"
PROTO_FILES = ("herald/v1/notifications.proto",)
DEFAULT_OUT = project_root() / "pipeline" / "proto"

INIT = '"""Generated from proto/ by devtools/gen_proto.py (make proto). Do not edit."""\n'


class GenerationError(RuntimeError):
    """protoc refused a .proto file (its messages are on stderr)."""


def generate(out: Path) -> list[Path]:
    """Write the messages (``*_pb2.py``, ``*_pb2.pyi``) and services (``*_pb2_grpc.py``) of
    every file in PROTO_FILES under ``out``, with the packages' ``__init__.py``; returns
    the files written."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise GenerationError(f"protoc failed on {', '.join(PROTO_FILES)}")
    written: list[Path] = []
    for proto in PROTO_FILES:
        package = Path(proto).parent
        stem = Path(proto).stem
        services = out / package / f"{stem}_pb2_grpc.py"
        absolute = f"from {'.'.join(package.parts)} import {stem}_pb2 "
        services.write_text(services.read_text().replace(absolute, f"from . import {stem}_pb2 "))
        written += [out / package / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi")]
        written.append(services)
        for directory in (out, *(out / p for p in _prefixes(package))):
            init = directory / "__init__.py"
            init.write_text(INIT)
            if init not in written:
                written.append(init)
    return sorted(written)


def _prefixes(package: Path) -> list[Path]:
    """herald/v1 -> [herald, herald/v1]."""
    return [Path(*package.parts[: i + 1]) for i in range(len(package.parts))]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
