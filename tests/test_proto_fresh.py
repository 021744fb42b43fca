"""The committed gRPC stubs must be exactly what protoc generates from protos/."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.proto import generate


def test_generate_writes_every_stub(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.STUB_NAMES)
    assert all(p.parent == tmp_path for p in written)


@pytest.mark.parametrize("name", generate.STUB_NAMES)
def test_committed_stub_is_fresh(tmp_path: Path, name: str) -> None:
    generate.generate(tmp_path)
    fresh = (tmp_path / name).read_text()
    committed = (generate.STUB_DIR / name).read_text()
    assert fresh == committed, (
        f"fedcore/proto/{name} is stale: it differs from what protoc generates from "
        f"{generate.PROTO_FILE}; run `make proto` and commit the result"
    )


def test_stubs_import_from_fedcore_proto(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    grpc_stub = (tmp_path / "coordinator_pb2_grpc.py").read_text()
    assert "from fedcore.proto import coordinator_pb2" in grpc_stub
    assert "fedgrpc.v1 import" not in grpc_stub
