"""A no-train benchmark client: join, pull the model, send a fixed delta, until FINISHED.

It speaks the wire protocol directly through fedcore (stubs, manifests, codecs) instead of
running fedclient with a fake Task, because a benchmark of the coordinator should not measure
torch: fedclient would import torch (~0.5 s and hundreds of MB per process) and convert every
model to a state_dict and back, and 16 such clients on a 2-core machine would drown the
coordinator's own costs. This client keeps O(chunk) memory whatever the model size: it hashes
the model as it streams (the same version check fedclient makes) without keeping it, and its
delta is one pre-built chunk repeated, so its checksum is computed once.

    python -m bench.client --server 127.0.0.1:50051 --client-id bench-0 --stats out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from fedcore.codecs import get_codec
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import version_hasher
from fedcore.wire import CHANNEL_OPTIONS, manifest_from_proto, manifest_to_proto


class FixedUpdate:
    """A constant fp32 delta of `total_bytes`, as pre-built chunk messages and its sha256."""

    def __init__(self, total_bytes: int, chunk_size: int, value: float) -> None:
        pattern = np.full(chunk_size // 4, value, dtype="<f4").tobytes()
        self.full, rest = divmod(total_bytes, len(pattern))
        self.chunk = pb.UpdateChunk(data=pattern)
        self.tail = pb.UpdateChunk(data=pattern[:rest]) if rest else None
        h = hashlib.sha256()
        for _ in range(self.full):
            h.update(pattern)
        h.update(pattern[:rest])
        self.sha256 = h.hexdigest()
        self.total_bytes = total_bytes

    def stream(self, header: pb.UpdateHeader) -> Iterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=header)
        for _ in range(self.full):
            yield self.chunk
        if self.tail is not None:
            yield self.tail
        yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=self.sha256))


def run(server: str, client_id: str, value: float, poll: float = 30.0) -> dict[str, object]:
    channel = grpc.insecure_channel(server, options=list(CHANNEL_OPTIONS))
    stub = pb_grpc.CoordinatorStub(channel)
    join = stub.Join(
        pb.JoinRequest(client_id=client_id, properties={"kind": "bench"}),
        timeout=60,
        wait_for_ready=True,
    )
    codec = get_codec("fp32")
    known, down, up, rounds = "", 0, 0, 0
    update: FixedUpdate | None = None
    pull_seconds: list[float] = []
    push_seconds: list[float] = []
    while True:
        started = time.perf_counter()
        request = pb.GetGlobalModelRequest(
            client_id=client_id, known_version=known, wait_seconds=poll
        )
        header: pb.ModelHeader | None = None
        digest = None
        for msg in stub.GetGlobalModel(request, timeout=poll + 600):
            if header is None:
                header = msg.header
                if header.total_bytes:
                    digest = version_hasher(manifest_from_proto(header.manifest))
            elif digest is not None:
                digest.update(msg.data)
                down += len(msg.data)
        if header is None:
            raise RuntimeError("empty model stream")
        if header.state == pb.FINISHED:
            break
        if digest is not None:
            if digest.hexdigest() != header.model_version:
                raise RuntimeError("model bytes do not match the announced version")
            known = header.model_version
            pull_seconds.append(time.perf_counter() - started)
        if not header.selected or known != header.model_version:
            continue
        floats = manifest_from_proto(header.manifest).floats()
        wire = codec.wire_manifest(floats)
        if update is None or update.total_bytes != wire.total_bytes:
            update = FixedUpdate(wire.total_bytes, join.chunk_size, value)
        started = time.perf_counter()
        stub.SubmitUpdate(
            update.stream(
                pb.UpdateHeader(
                    client_id=client_id,
                    round=header.round,
                    base_version=known,
                    num_examples=1,
                    encoding=codec.name,
                    manifest=manifest_to_proto(wire),
                    total_bytes=wire.total_bytes,
                )
            ),
            timeout=600,
        )
        push_seconds.append(time.perf_counter() - started)
        up += wire.total_bytes
        rounds += 1
    channel.close()
    return {
        "client_id": client_id,
        "rounds": rounds,
        "down_bytes": down,
        "up_bytes": up,
        "pull_seconds": pull_seconds,
        "push_seconds": push_seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.client", description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--value", type=float, default=1e-4, help="every delta value (1e-4)")
    parser.add_argument("--stats", type=Path, help="write byte counts and timings here (JSON)")
    args = parser.parse_args(argv)
    stats = run(args.server, args.client_id, args.value)
    if args.stats:
        args.stats.write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
