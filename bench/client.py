"""A no-train benchmark client: join, pull the model, send a fixed delta, until FINISHED.

It speaks the wire protocol directly through fedcore (stubs, manifests, codecs) instead of
running fedclient with a fake Task, because a benchmark of the coordinator should not measure
torch: fedclient would import torch (~0.5 s and hundreds of MB per process) and convert every
model to a state_dict and back, and 16 such clients on a 2-core machine would drown the
coordinator's own costs. This client keeps O(chunk) memory whatever the model size: it hashes
the model as it streams (the same version check fedclient makes) without keeping it, and its
delta is one pre-built chunk repeated, so its checksum is computed once. Model chunks are read
and upload chunks sent without protobuf copies (fedcore.wire.ModelCalls), as fedclient does.

    python -m bench.client --server 127.0.0.1:50051 --client-id bench-0 --stats out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from fedcore import checksums
from fedcore.codecs import get_codec
from fedcore.proto import coordinator_pb2 as pb
from fedcore.proto import coordinator_pb2_grpc as pb_grpc
from fedcore.tensors import download_check
from fedcore.wire import (
    CHANNEL_OPTIONS,
    ModelCalls,
    data_message,
    manifest_from_proto,
    manifest_to_proto,
    model_data,
    update_trailer,
)


class FixedUpdate:
    """A constant fp32 delta of `total_bytes`, as pre-serialized chunk messages and its
    checksum (the one the coordinator offered, as fedclient sends)."""

    def __init__(self, total_bytes: int, chunk_size: int, value: float, checksum: str) -> None:
        # No bigger than the update: 2,500 virtual clients of a 40 kB model each held a 1 MiB
        # pattern (2.5 GB per bench process) before this and fixed_update()'s sharing.
        pattern = np.full(min(chunk_size, total_bytes) // 4, value, dtype="<f4").tobytes()
        self.full, rest = divmod(total_bytes, len(pattern))
        self.chunk = data_message(pattern)
        self.tail = data_message(pattern[:rest]) if rest else None
        h = checksums.new_hasher(checksum)
        for _ in range(self.full):
            h.update(pattern)
        h.update(pattern[:rest])
        self.digest = h.hexdigest()
        self.total_bytes = total_bytes
        self.checksum = checksum

    def stream(self, header: pb.UpdateHeader) -> Iterator[bytes]:
        """Serialized UpdateChunks for ModelCalls.submit."""
        yield pb.UpdateChunk(header=header).SerializeToString()
        for _ in range(self.full):
            yield self.chunk
        if self.tail is not None:
            yield self.tail
        yield update_trailer(header, self.digest).SerializeToString()


@functools.lru_cache(maxsize=8)
def fixed_update(total_bytes: int, chunk_size: int, value: float, checksum: str) -> FixedUpdate:
    """One FixedUpdate per size, shared by every client of a process (it is immutable)."""
    return FixedUpdate(total_bytes, chunk_size, value, checksum)


class BenchClient:
    """One bench client's protocol steps, shared by this sync client and the asyncio virtual
    clients of bench/many_clients.py: `request()`, feed every message of the GetGlobalModel
    stream to `take()`, then `outcome()` says whether to stop, poll again or submit
    `upload()`. Model bytes are hashed as they stream (the version check fedclient makes)
    and never kept."""

    FINISHED, POLL, SUBMIT = "finished", "poll", "submit"

    def __init__(
        self,
        client_id: str,
        chunk_size: int,
        value: float,
        poll: float,
        checksum: str = checksums.DEFAULT,
    ) -> None:
        self.client_id = client_id
        self.checksum = checksum  # checksums.choose(JoinReply.checksums)
        self.chunk_size = chunk_size
        self.value = value
        self.poll = poll
        self.codec = get_codec("fp32")
        self.known = ""
        self.down_bytes = self.up_bytes = 0
        self._update: FixedUpdate | None = None
        self._header: pb.ModelHeader | None = None
        self._digest: checksums.Hasher | None = None
        self._expected = ""  # the digest the model's bytes must have

    def request(self) -> pb.GetGlobalModelRequest:
        self._header, self._digest = None, None
        return pb.GetGlobalModelRequest(
            client_id=self.client_id, known_version=self.known, wait_seconds=self.poll
        )

    def take(self, msg: pb.ModelChunk | memoryview) -> None:
        if self._header is None:
            if not isinstance(msg, pb.ModelChunk) or msg.WhichOneof("payload") != "header":
                raise RuntimeError("model stream did not start with a header")
            self._header = msg.header
            if self._header.total_bytes:
                # fedclient's check (fedcore.tensors.ChunkAssembler does the same).
                manifest = manifest_from_proto(self._header.manifest)
                self._digest, expected = download_check(manifest, self._header.model_checksum)
                self._expected = expected or self._header.model_version
        elif self._digest is not None:
            data = model_data(msg)
            if data is None:
                raise RuntimeError("unexpected message in the model stream")
            self._digest.update(data)
            self.down_bytes += len(data)

    def outcome(self) -> str:
        """FINISHED, POLL (nothing to do) or SUBMIT; raises if the model failed its check."""
        header = self._header
        if header is None:
            raise RuntimeError("empty model stream")
        if header.state == pb.FINISHED:
            return self.FINISHED
        if self._digest is not None:
            if self._digest.hexdigest() != self._expected:
                raise RuntimeError("model bytes do not match the announced checksum")
            self.known = header.model_version
        if not header.selected or self.known != header.model_version:
            return self.POLL
        return self.SUBMIT

    def downloaded(self) -> bool:
        """The last pull carried model bytes."""
        return self._digest is not None

    def upload(self) -> Iterator[bytes]:
        header = self._header
        assert header is not None
        wire = self.codec.wire_manifest(manifest_from_proto(header.manifest).floats())
        if self._update is None or self._update.total_bytes != wire.total_bytes:
            self._update = fixed_update(
                wire.total_bytes, self.chunk_size, self.value, self.checksum
            )
        self.up_bytes += wire.total_bytes
        return self._update.stream(
            pb.UpdateHeader(
                client_id=self.client_id,
                round=header.round,
                base_version=self.known,
                num_examples=1,
                encoding=self.codec.name,
                manifest=manifest_to_proto(wire),
                total_bytes=wire.total_bytes,
                checksum=self.checksum,
            )
        )


def run(server: str, client_id: str, value: float, poll: float = 30.0) -> dict[str, object]:
    channel = grpc.insecure_channel(server, options=list(CHANNEL_OPTIONS))
    stub = pb_grpc.CoordinatorStub(channel)
    calls = ModelCalls(channel)
    join = stub.Join(
        pb.JoinRequest(client_id=client_id, properties={"kind": "bench"}),
        timeout=60,
        wait_for_ready=True,
    )
    client = BenchClient(client_id, join.chunk_size, value, poll, checksums.choose(join.checksums))
    rounds = 0
    pull_seconds: list[float] = []
    push_seconds: list[float] = []
    while True:
        started = time.perf_counter()
        for msg in calls.pull(client.request(), timeout=poll + 600):
            client.take(msg)
        outcome = client.outcome()
        if outcome == client.FINISHED:
            break
        if client.downloaded():
            pull_seconds.append(time.perf_counter() - started)
        if outcome != client.SUBMIT:
            continue
        started = time.perf_counter()
        calls.submit(client.upload(), timeout=600)
        push_seconds.append(time.perf_counter() - started)
        rounds += 1
    channel.close()
    return {
        "client_id": client_id,
        "rounds": rounds,
        "down_bytes": client.down_bytes,
        "up_bytes": client.up_bytes,
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
