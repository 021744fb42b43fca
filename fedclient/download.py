"""Reading one GetGlobalModel stream: the header, then the model's bytes (checked against
`model_checksum`, or `model_version` from an older coordinator) and the strategy's tensors
after them (SCAFFOLD's c, checked likewise), each into one preallocated buffer. No RPCs
here: session.py pulls."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedclient.retry import PermanentError
from fedcore.proto import coordinator_pb2 as pb
from fedcore.tensors import ChunkAssembler, FlatModel
from fedcore.wire import manifest_from_proto, model_data


@dataclass(frozen=True)
class Pulled:
    header: pb.ModelHeader
    model: FlatModel | None  # None: no model bytes came (the client holds the version, or idle)
    strategy_tensors: FlatModel | None  # ModelHeader.strategy_manifest's tensors, if any


def read_model_stream(
    stream: Iterable[Any], before_model: Callable[[int], np.ndarray | None] = lambda _: None
) -> Pulled:
    """`before_model(nbytes)` runs before a model's buffer is allocated: the session drops the
    model it holds, and may hand back a free uint8 buffer of `nbytes` to download into.
    PermanentError for a stream that breaks the protocol's shape; ManifestError (pull again) for
    bytes that overflow, fall short or do not hash to their announced version."""
    header: pb.ModelHeader | None = None
    model: ChunkAssembler | None = None
    extra: ChunkAssembler | None = None
    for msg in stream:
        if header is None:
            header = msg.header
            if header.total_bytes:
                manifest = manifest_from_proto(header.manifest)
                model = ChunkAssembler(
                    manifest, header.model_checksum, before_model(manifest.total_bytes)
                )
            if header.strategy_bytes:
                extra = ChunkAssembler(
                    manifest_from_proto(header.strategy_manifest), header.strategy_checksum
                )
            continue
        data = model_data(msg)
        if data is None:
            raise PermanentError("coordinator sent a second header in a model stream")
        # The strategy's tensors come in chunks of their own once the model's bytes are in.
        model_done = model is None or model.received == model.buffer.size
        target = extra if model_done else model
        if target is None:
            raise PermanentError("coordinator sent more bytes than its header announced")
        target.add(data)
    if header is None:
        raise PermanentError("coordinator sent an empty model stream")
    return Pulled(
        header,
        model.finish(header.model_version) if model is not None else None,
        extra.finish(header.strategy_version) if extra is not None else None,
    )
