"""Regenerate the committed gRPC stubs from protos/ (`make proto`).

The stubs are committed so that installing fedgrpc needs no protoc; tests/test_proto_fresh.py
regenerates them into a temporary folder and fails if the committed files differ.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_FILE = "fedgrpc/v1/coordinator.proto"
STUB_DIR = Path(__file__).resolve().parent
STUB_NAMES = ("coordinator_pb2.py", "coordinator_pb2.pyi", "coordinator_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on the contract and write importable stubs into `out_dir`."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        written = []
        for name in STUB_NAMES:
            text = (Path(tmp) / "fedgrpc" / "v1" / name).read_text()
            # protoc writes imports for the proto package path; the stubs live in fedcore.proto.
            text = text.replace("from fedgrpc.v1 import", "from fedcore.proto import")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
        return written


def main() -> int:
    for path in generate(STUB_DIR):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
