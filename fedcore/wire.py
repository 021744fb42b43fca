"""Conversions between the protobuf messages and fedcore's types, and the stream framings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import DEFAULT_CHUNK_SIZE, Manifest, ManifestError, TensorSpec, iter_chunks

# gRPC's default 4 MiB message cap is fine for 1 MiB chunks; we set it explicitly so a peer that
# sends oversized messages is refused by the transport with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def manifest_to_proto(manifest: Manifest) -> pb.Manifest:
    return pb.Manifest(
        tensors=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape) for t in manifest.tensors]
    )


def manifest_from_proto(msg: pb.Manifest) -> Manifest:
    """Raises ManifestError with a readable reason for unknown dtypes, bad shapes, duplicates."""
    return Manifest(tuple(TensorSpec(t.name, t.dtype, tuple(t.shape)) for t in msg.tensors))


def model_stream(
    header: pb.ModelHeader, buffer: object | None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.ModelChunk]:
    yield pb.ModelChunk(header=header)
    if buffer is not None:
        for chunk in iter_chunks(buffer, chunk_size):
            yield pb.ModelChunk(data=bytes(chunk))


def update_stream(
    header: pb.UpdateHeader, payload: object, sha256: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=header)
    for chunk in iter_chunks(payload, chunk_size):
        yield pb.UpdateChunk(data=bytes(chunk))
    yield pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=sha256))


def metrics_dict(metrics: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items()}


__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "ManifestError",
    "manifest_from_proto",
    "manifest_to_proto",
    "metrics_dict",
    "model_stream",
    "update_stream",
]
