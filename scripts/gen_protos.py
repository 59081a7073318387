"""Regenerate the committed protobuf/gRPC Python modules and their stubs from ``protos/**/*.proto``.

Usage: ``python scripts/gen_protos.py [OUT_DIR]`` (default: the repository root, in place).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc with the repository root as include path, so modules import as ``protos.offsite.v1.*``."""
    out.mkdir(parents=True, exist_ok=True)
    plugins = Path(sys.executable).parent  # protoc-gen-mypy lives next to the interpreter
    args = ["grpc_tools.protoc", f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}"]
    args += [f"-I{ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
             f"--mypy_out={out}", f"--mypy_grpc_out={out}", *[str(ROOT / p) for p in PROTO_FILES]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out.rglob("*") if p.is_file() and "_pb2" in p.name)


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
