"""Update encodings: how a client's float32 delta vector becomes bytes on the wire and back.

Every codec is an encode/decode pair over the model's float vector (see tensors.float_vector).
Decoding is streaming: the coordinator feeds raw chunks as they arrive (chunk boundaries need not
align with values) and gets dense float32 pieces to fold into its accumulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedcore.tensors import Manifest, ManifestError


@dataclass(frozen=True)
class Piece:
    """Decoded values for the float vector starting at element `offset`."""

    offset: int
    values: np.ndarray


class StreamDecoder(ABC):
    @abstractmethod
    def feed(self, data: bytes | memoryview) -> Iterator[Piece]: ...

    @abstractmethod
    def finish(self) -> None:
        """Raise ManifestError if the stream ended before the whole vector was decoded."""


class Codec(ABC):
    name: str

    @abstractmethod
    def wire_manifest(self, floats: Manifest) -> Manifest:
        """The manifest an update header must declare for a model whose floats are `floats`."""

    @abstractmethod
    def encode(self, delta: np.ndarray) -> np.ndarray:
        """float32 delta vector -> 1-D uint8 payload."""

    @abstractmethod
    def decoder(self, num_values: int) -> StreamDecoder: ...


class _FixedWidthDecoder(StreamDecoder):
    """Values of one fixed-width little-endian dtype back to back; carries split values."""

    def __init__(self, dtype: np.dtype, num_values: int, as_float32: bool = True) -> None:
        self.dtype = dtype
        self.as_float32 = as_float32
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
            if self.as_float32 and values.dtype != np.float32:
                values = values.astype(np.float32)
            yield Piece(self.decoded, values)
            self.decoded += n

    def finish(self) -> None:
        if self._carry or self.decoded != self.expected:
            raise ManifestError(
                f"update stream ended after {self.decoded} of {self.expected} values (truncated)"
            )


class Float32Codec(Codec):
    name = "fp32"

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return floats.with_dtype("float32")

    def encode(self, delta: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(delta, dtype="<f4").view(np.uint8)

    def decoder(self, num_values: int) -> StreamDecoder:
        return _FixedWidthDecoder(np.dtype("<f4"), num_values)


class MaskedRingCodec(Codec):
    """Secure aggregation: masked fixed-point ring elements of Z_2^64 (fedcore/secagg).

    encode() takes the already-masked uint64 vector; pieces stay uint64 so the coordinator can sum
    them modulo 2^64. The manifest declares int64 (same bits, two's complement).
    """

    name = "masked-u64"

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return floats.with_dtype("int64")

    def encode(self, delta: np.ndarray) -> np.ndarray:
        if delta.dtype != np.uint64:
            raise ValueError("masked-u64 encodes masked uint64 ring elements, not floats")
        return np.ascontiguousarray(delta, dtype="<u8").view(np.uint8)

    def decoder(self, num_values: int) -> StreamDecoder:
        return _FixedWidthDecoder(np.dtype("<u8"), num_values, as_float32=False)


CODECS: dict[str, Codec] = {c.name: c for c in (Float32Codec(), MaskedRingCodec())}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ManifestError(
            f"unknown update encoding {name!r}; supported: {', '.join(CODECS)}"
        ) from None
