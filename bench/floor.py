"""The floor a round is compared with: what Python gRPC and numpy can do on this machine.

`serve` runs a bare grpc.aio server with two generic methods that move raw bytes (identity
serializers, pre-built 1 MiB chunks, no protobuf, no hashing, no disk): Down streams K chunks to
the caller, Up swallows a client stream. `grpc_seconds` moves the same bytes as a round — N
concurrent downloads of the model, then N concurrent uploads of a delta, one channel per client —
and `accumulate_seconds` times folding N float32 vectors into one with numpy. Their sum is the
floor: a federated round cannot be cheaper than moving its bytes plus adding its deltas.

    python -m bench.floor --port 50099      # the server half (bench.round_overhead starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np

from fedcore.wire import CHANNEL_OPTIONS

CHUNK = 1 << 20
_DOWN = "/bench.Floor/Down"
_UP = "/bench.Floor/Up"


def _ident(b: bytes) -> bytes:
    return b


async def serve(port: int) -> None:
    chunk = bytes(CHUNK)

    async def down(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        (total,) = struct.unpack("<Q", request)
        full, rest = divmod(total, CHUNK)
        for _ in range(full):
            yield chunk
        if rest:
            yield chunk[:rest]

    async def up(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        total = 0
        async for data in requests:
            total += len(data)
        return struct.pack("<Q", total)

    handler = grpc.method_handlers_generic_handler(
        "bench.Floor",
        {
            "Down": grpc.unary_stream_rpc_method_handler(down, _ident, _ident),
            "Up": grpc.stream_unary_rpc_method_handler(up, _ident, _ident),
        },
    )
    server = grpc.aio.server(options=list(CHANNEL_OPTIONS))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _grpc_seconds(address: str, clients: int, nbytes: int) -> tuple[float, float]:
    channels = [
        grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS)) for _ in range(clients)
    ]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 60)
        chunk = bytes(CHUNK)

        async def pull(ch: grpc.aio.Channel) -> int:
            call = ch.unary_stream(_DOWN, request_serializer=_ident, response_deserializer=_ident)
            got = 0
            async for data in call(struct.pack("<Q", nbytes)):
                got += len(data)
            return got

        async def chunks() -> AsyncIterator[bytes]:
            full, rest = divmod(nbytes, CHUNK)
            for _ in range(full):
                yield chunk
            if rest:
                yield chunk[:rest]

        async def push(ch: grpc.aio.Channel) -> int:
            call = ch.stream_unary(_UP, request_serializer=_ident, response_deserializer=_ident)
            return int(struct.unpack("<Q", await call(chunks()))[0])

        started = time.perf_counter()
        got = await asyncio.gather(*(pull(ch) for ch in channels))
        middle = time.perf_counter()
        sent = await asyncio.gather(*(push(ch) for ch in channels))
        ended = time.perf_counter()
        if set(got) != {nbytes} or set(sent) != {nbytes}:
            raise RuntimeError(f"floor transfer lost bytes: {got} {sent}")
        return middle - started, ended - middle
    finally:
        for ch in channels:
            await ch.close()


def grpc_seconds(address: str, clients: int, nbytes: int) -> tuple[float, float]:
    """(download, upload) seconds for `clients` concurrent streams of `nbytes` each way."""
    return asyncio.run(_grpc_seconds(address, clients, nbytes))


def accumulate_seconds(clients: int, num_values: int) -> float:
    """Seconds to add `clients` float32 vectors of `num_values` into one accumulator in place."""
    total = np.zeros(num_values, dtype=np.float32)
    delta = np.full(num_values, 1e-4, dtype=np.float32)
    np.add(total, delta, out=total)  # touch the pages first: we time the adding, not page faults
    started = time.perf_counter()
    for _ in range(clients):
        np.add(total, delta, out=total)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.floor", description="bare gRPC byte server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
