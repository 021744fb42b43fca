"""What every update encoding is: a Codec (encode / streaming decode) yielding Pieces.

The base types only, so that codecs.py (the registry of encodings) and he.py (the CKKS
encoding) can both build on them without importing each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedcore.tensors import Manifest


@dataclass(frozen=True)
class Piece:
    """Decoded values for the float vector starting at element `offset` (dense), or, when
    `indices` is set, for the (strictly increasing) positions `indices` (sparse, e.g. top-k)."""

    offset: int
    values: np.ndarray
    indices: np.ndarray | None = None


class StreamDecoder(ABC):
    @abstractmethod
    def feed(self, data: bytes | memoryview) -> Iterator[Piece]: ...

    @abstractmethod
    def finish(self) -> None:
        """Raise ManifestError if the stream ended before the whole vector was decoded."""


class Codec(ABC):
    name: str
    # Encodings that only a secure-aggregation protocol can sum (masked ring values, ciphertexts).
    secure_only = False
    # Lossy codecs whose error the client should carry into the next round (see ErrorFeedback).
    error_feedback = False

    @abstractmethod
    def wire_manifest(self, floats: Manifest) -> Manifest:
        """The manifest an update header must declare for a model whose floats are `floats`."""

    @abstractmethod
    def encode(self, delta: np.ndarray) -> np.ndarray:
        """float32 delta vector -> 1-D uint8 payload."""

    @abstractmethod
    def decoder(self, num_values: int) -> StreamDecoder: ...

    def max_bytes(self, num_values: int) -> int | None:
        """For encodings whose size varies (ciphertexts): the most an update may take.
        None: the size is exactly wire_manifest(...).total_bytes."""
        return None

    def decode(self, payload: np.ndarray | bytes, num_values: int) -> np.ndarray:
        """The whole dense float32 vector a payload stands for (what the coordinator folds)."""
        out = np.zeros(num_values, dtype=np.float32)
        decoder = self.decoder(num_values)
        for piece in decoder.feed(memoryview(payload).cast("B")):
            if piece.indices is None:
                out[piece.offset : piece.offset + piece.values.size] = piece.values
            else:
                out[piece.indices] = piece.values
        decoder.finish()
        return out
