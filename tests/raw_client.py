"""The test itself as one client over the raw gRPC stubs (no fedclient): join, pull, submit.

For tests that hand-craft what a real client would send (bad input, fuzzing, metrics at known
points). The coordinator they talk to is a real process from tests/procs.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import ChunkAssembler, FlatModel
from fedcore.wire import manifest_from_proto, manifest_to_proto
from tests.procs import free_port, start_coordinator, wait_serving


def pull(
    stub: pb_grpc.CoordinatorStub,
    client_id: str,
    wait_seconds: float = 10,
    timeout: float = 30,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[pb.ModelHeader, FlatModel | None]:
    """Long-poll GetGlobalModel and assemble the model (None when only a header came)."""
    header, assembler = None, None
    request = pb.GetGlobalModelRequest(client_id=client_id, wait_seconds=wait_seconds)
    for msg in stub.GetGlobalModel(request, timeout=timeout, metadata=metadata):
        if header is None:
            header = msg.header
            if header.total_bytes:
                manifest = manifest_from_proto(header.manifest)
                assembler = ChunkAssembler(manifest, header.model_checksum)
        elif assembler is not None and assembler.received < assembler.buffer.size:
            assembler.add(msg.data)
        else:  # a strategy's tensors after the model (SCAFFOLD's c): not this helper's concern
            assert header.strategy_bytes
    assert header is not None
    return header, assembler.finish(header.model_version) if assembler else None


def update_header(
    client: str, round_number: int, model: FlatModel, size: int, /, **overrides: object
) -> pb.UpdateHeader:
    """The header of a valid fp32 update of all `model`'s float tensors (`size` bytes);
    overrides (any UpdateHeader field, client_id and total_bytes too) break it."""
    fields: dict[str, object] = dict(
        client_id=client,
        round=round_number,
        base_version=model.version,
        num_examples=10,
        encoding="fp32",
        manifest=manifest_to_proto(model.manifest.floats().with_dtype("float32")),
        total_bytes=size,
    )
    fields.update(overrides)
    return pb.UpdateHeader(**fields)  # type: ignore[arg-type]


@dataclass
class Joined:
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub
    header: pb.ModelHeader  # of the round the client was selected for
    model: FlatModel  # that round's base model
    port: int = 0  # the coordinator's


@contextmanager
def lone_client(tmp: Path, client_id: str, *flags: str) -> Iterator[Joined]:
    """A coordinator (--min-clients 1, state in tmp/state) whose only client has joined and
    pulled the first round's model; the coordinator is killed on exit."""
    port = free_port()
    server = start_coordinator(tmp / "logs", port, tmp / "state", "--min-clients", "1", *flags)
    try:
        wait_serving(port, server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            stub.Join(pb.JoinRequest(client_id=client_id), timeout=10)
            header, model = pull(stub, client_id)
            assert header.selected and model is not None
            yield Joined(channel, stub, header, model, port)
    finally:
        server.kill()
