"""The embedded engine's wire between the driver and its worker processes: length-prefixed
frames over the worker's stdin/stdout pipes, bytes and JSON only (no pickle).

A message is a frame count (u32, little-endian) and that many frames, each a u32 length and
its bytes. What travels is what a `fedclient` process exchanges over gRPC (ModelHeader bytes in,
UpdateHeader / EvaluationResult bytes and the encoded payload out) plus the client ids, and the
path of the round's model in shared memory — never the model itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from fedclient.virtual import Evaluated, Fitted

_U32 = struct.Struct("<I")


def pack(frames: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(frames))]
    for f in frames:
        parts += [_U32.pack(len(f)), bytes(f)]
    return b"".join(parts)


def read_blocking(stream: BinaryIO) -> list[bytes] | None:
    """One message from a pipe; None at end of file (the driver closed it: exit)."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    frames = []
    for _ in range(_U32.unpack(head)[0]):
        (n,) = _U32.unpack(_exact(stream, 4))
        frames.append(_exact(stream, n))
    return frames


def _exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("the driver's pipe closed in the middle of a message")
    return data


async def read_async(stream: asyncio.StreamReader) -> list[bytes]:
    """One message from a worker (asyncio.IncompleteReadError: the worker exited)."""
    (count,) = _U32.unpack(await stream.readexactly(4))
    frames = []
    for _ in range(count):
        (n,) = _U32.unpack(await stream.readexactly(4))
        frames.append(await stream.readexactly(n))
    return frames


def request(op: str, model: dict[str, Any], header: bytes, ids: Sequence[str]) -> bytes:
    """`model`: where the round's model is in shared memory (embedded.py), with the strategy's
    tensors (SCAFFOLD's c) after it, as in a GetGlobalModel stream."""
    return pack([op.encode(), json.dumps(model).encode(), header, json.dumps(list(ids)).encode()])


def parse_request(frames: list[bytes]) -> tuple[str, dict[str, Any], bytes, list[str]]:
    op, model, header, ids = frames
    return op.decode(), json.loads(model), header, json.loads(ids)


def results(out: Sequence[Fitted | Evaluated]) -> bytes:
    """Three frames per client: {id, digest, error}, then header/result bytes, then payload."""
    frames: list[bytes] = []
    for r in out:
        if isinstance(r, Fitted):
            meta = {"id": r.client_id, "digest": r.digest, "error": r.error, "pending": r.pending}
            payload = b"" if r.payload is None else np.ascontiguousarray(r.payload).tobytes()
            frames += [json.dumps(meta).encode(), r.header, payload]
        else:
            meta = {"id": r.client_id, "error": r.error}
            frames += [json.dumps(meta).encode(), r.result, b""]
    return pack(frames)


def parse_results(op: str, frames: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(frames), 3):
        meta = json.loads(frames[i])
        if op == "fit":
            payload = None if meta["error"] else np.frombuffer(frames[i + 2], dtype=np.uint8)
            fitted = Fitted(meta["id"], frames[i + 1], payload, meta["digest"], meta["error"])
            out.append(dataclasses.replace(fitted, pending=meta["pending"]))
        else:
            out.append(Evaluated(meta["id"], frames[i + 1], meta["error"]))
    return out
