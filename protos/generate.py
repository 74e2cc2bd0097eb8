"""Regenerate the Python stubs of the contract: ``python protos/generate.py [OUT_DIR]``.

Writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to each ``.proto`` under
``protos/`` (or under OUT_DIR, which the drift test uses to compare with the committed files).
The generator is grpcio-tools, pinned in pyproject.toml so the output is reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

__all__ = ["PROTO_ROOT", "generate"]

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Generate stubs for every .proto under PROTO_ROOT into out_dir; return the .proto files."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    rel = [str(p.relative_to(PROTO_ROOT)) for p in protos]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *rel,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return protos


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    for proto in generate(out):
        print(f"generated stubs for {proto.relative_to(PROTO_ROOT)} in {out}")
