"""What every update encoding is: a Codec (encode / streaming decode) yielding Pieces.

The base types and the stream decoders codecs share, so that codecs.py (the registry of
encodings), codec_int4.py and he.py (the CKKS encoding) build on them without import cycles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedcore.tensors import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    ManifestError,
    bfloat16_bits_to_float32,
    iter_chunks,
)

# Values encoded at a time (a multiple of every codec's block): a codec's temporaries are a
# few slabs, not a few models (int4 of a 600M-value delta held ~5 models' worth before).
SLAB = 1 << 20


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

    def bind(self, floats: Manifest) -> Codec:
        """This codec for one model's float tensors (or for their wire manifest: the same
        answer). Itself, unless its wire format follows the tensors' dtypes: fp32 sends a
        bfloat16 or float16 tensor at its own dtype, so encode/decode must know where each is."""
        return self

    def max_bytes(self, num_values: int) -> int | None:
        """For encodings whose size varies (ciphertexts): the most an update may take.
        None: the size is exactly wire_manifest(...).total_bytes."""
        return None

    def decode(self, payload: np.ndarray | bytes, num_values: int) -> np.ndarray:
        """The whole dense float32 vector a payload stands for (what the coordinator folds)."""
        out = np.zeros(num_values, dtype=np.float32)
        for piece in self.pieces(payload, num_values):
            if piece.indices is None:
                out[piece.offset : piece.offset + piece.values.size] = piece.values
            else:
                out[piece.indices] = piece.values
        return out

    def pieces(self, payload: np.ndarray | bytes, num_values: int) -> Iterator[Piece]:
        """A whole payload decoded as the coordinator decodes a stream: chunk by chunk, so each
        piece (and its temporaries) is a chunk's worth, not the model's."""
        decoder = self.decoder(num_values)
        view = memoryview(payload).cast("B")
        for chunk in iter_chunks(view, DEFAULT_CHUNK_SIZE) if len(view) else [view]:
            yield from decoder.feed(chunk)  # (an empty payload is fed once: it may be whole)
        decoder.finish()


class FixedWidthDecoder(StreamDecoder):
    """Values of one fixed-width little-endian dtype back to back; carries split values."""

    def __init__(
        self, dtype: np.dtype, num_values: int, as_float32: bool = True, bf16: bool = False
    ) -> None:
        self.dtype = dtype
        self.as_float32 = as_float32
        self.bf16 = bf16  # uint16 storage holding bfloat16 bit patterns
        self.expected = num_values
        self.decoded = 0
        self._carry = b""

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        if self._carry:
            data = self._carry + bytes(data)
        width = self.dtype.itemsize
        usable = len(data) - len(data) % width
        self._carry = bytes(data[usable:])
        n = usable // width
        if self.decoded + n > self.expected:
            raise ManifestError(f"update carries more than the {self.expected} values declared")
        if n:
            values = np.frombuffer(data, dtype=self.dtype, count=n)
            if self.bf16:
                values = bfloat16_bits_to_float32(values)
            elif self.as_float32 and values.dtype != np.float32:
                values = values.astype(np.float32)
            yield Piece(self.decoded, values)
            self.decoded += n

    def finish(self) -> None:
        if self._carry or self.decoded != self.expected:
            raise ManifestError(
                f"update stream ended after {self.decoded} of {self.expected} values (truncated)"
            )


class TwoPartDecoder(StreamDecoder):
    """A small header array (kept whole, O(values / block)) followed by streamed values."""

    def __init__(self, head_dtype: str, head_count: int, dtype: str, num_values: int) -> None:
        # Filled in place as it arrives: a 600M-value int4 update's scales are 37.5 MB, which a
        # bytearray and its bytes() copy held twice over.
        self._head = np.empty(head_count, dtype=np.dtype(head_dtype))
        self._head_bytes = self._head.view(np.uint8)
        self._filled = 0
        self.head: np.ndarray | None = None
        self.values = FixedWidthDecoder(np.dtype(dtype), num_values, as_float32=False)

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        data = memoryview(data).cast("B")
        if self.head is None:
            take = min(len(data), self._head_bytes.size - self._filled)
            self._head_bytes[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled < self._head_bytes.size:
                return
            self.head = self._head
            self._check_head(self.head)
        for piece in self.values.feed(data):
            yield self._piece(piece)

    def finish(self) -> None:
        if self.head is None:
            raise ManifestError("update stream ended inside its header part (truncated)")
        self.values.finish()

    def _check_head(self, head: np.ndarray) -> None:
        pass

    @abstractmethod
    def _piece(self, raw: Piece) -> Piece: ...


def quantized_slabs(
    x: np.ndarray, block: int, levels: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Symmetric block quantization of float32 `x`, SLAB values at a time: per slab (first
    value, block scales = max|x| / levels, q = round(x / scale) clipped to ±levels as float32,
    zero-padded to whole blocks). Memory is O(SLAB) whatever the size of `x`."""
    for start in range(0, x.size, SLAB):
        part = x[start : start + SLAB]
        blocks = -(-part.size // block)
        if part.size != blocks * block:
            padded = np.zeros(blocks * block, dtype=np.float32)
            padded[: part.size] = part
            part = padded
        grid = part.reshape(blocks, block)
        scales = np.abs(grid).max(axis=1) / np.float32(levels)
        safe = np.where(scales > 0, scales, np.float32(1))
        yield start, scales, np.clip(np.rint(grid / safe[:, None]), -levels, levels).reshape(-1)
