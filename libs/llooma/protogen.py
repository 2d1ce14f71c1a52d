"""Regenerate (or check) the committed protobuf code from proto/llooma/v1."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
OUTPUT_ROOT = REPO_ROOT / "libs"
GENERATED_DIR = Path("llooma") / "v1"


def _generate(into: Path) -> None:
    sources = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / GENERATED_DIR).glob("*.proto")
    )
    include = str(Path(protoc.__file__).parent / "_proto")
    mypy_plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--python_out={into}",
        f"--mypy_out={into}",
    ]
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")


def _generated_files(root: Path) -> dict[str, Path]:
    folder = root / GENERATED_DIR
    return {p.name: p for p in folder.glob("*_pb2.py*")}


def generate() -> None:
    _generate(OUTPUT_ROOT)


def check() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        _generate(Path(scratch))
        fresh = _generated_files(Path(scratch))
        committed = _generated_files(OUTPUT_ROOT)
        stale = sorted(
            name
            for name in fresh.keys() | committed.keys()
            if name not in fresh
            or name not in committed
            or not filecmp.cmp(fresh[name], committed[name], shallow=False)
        )
    if stale:
        print(f"generated protobuf code is stale, run `make proto`: {', '.join(stale)}")
        return 1
    print("generated protobuf code is current")
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "check"
    if command == "generate":
        generate()
    else:
        sys.exit(check())
