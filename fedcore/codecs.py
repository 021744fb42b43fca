"""Update encodings: how a client's float32 delta vector becomes bytes on the wire and back.

Every codec is an encode/decode pair over the model's float vector (see tensors.float_vector).
Decoding is streaming: the coordinator feeds raw chunks as they arrive (chunk boundaries need not
align with values) and gets dense float32 pieces to fold into its accumulator.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator

import numpy as np

from fedcore.codec_base import Codec, Piece, StreamDecoder
from fedcore.he import CKKSCodec
from fedcore.limits import excerpt
from fedcore.tensors import Manifest, ManifestError, TensorSpec

__all__ = ["CODECS", "Codec", "ErrorFeedback", "Piece", "StreamDecoder", "get_codec"]


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
    secure_only = True

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return floats.with_dtype("int64")

    def encode(self, delta: np.ndarray) -> np.ndarray:
        if delta.dtype != np.uint64:
            raise ValueError("masked-u64 encodes masked uint64 ring elements, not floats")
        return np.ascontiguousarray(delta, dtype="<u8").view(np.uint8)

    def decoder(self, num_values: int) -> StreamDecoder:
        return _FixedWidthDecoder(np.dtype("<u8"), num_values, as_float32=False)


class Float16Codec(Codec):
    """Half precision: half the bytes; values beyond float16's range are clipped, not inf."""

    name = "fp16"
    _MAX = float(np.finfo(np.float16).max)

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return floats.with_dtype("float16")

    def encode(self, delta: np.ndarray) -> np.ndarray:
        clipped = np.clip(delta, -self._MAX, self._MAX)
        return clipped.astype("<f2").view(np.uint8)

    def decoder(self, num_values: int) -> StreamDecoder:
        return _FixedWidthDecoder(np.dtype("<f2"), num_values)


class _TwoPartDecoder(StreamDecoder):
    """A small header array (kept whole, O(values / block)) followed by streamed values."""

    def __init__(self, head_dtype: str, head_count: int, dtype: str, num_values: int) -> None:
        self.head_dtype = np.dtype(head_dtype)
        self.head_bytes = head_count * self.head_dtype.itemsize
        self._head = bytearray()
        self.head: np.ndarray | None = None
        self.values = _FixedWidthDecoder(np.dtype(dtype), num_values, as_float32=False)

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        data = memoryview(data).cast("B")
        if self.head is None:
            take = self.head_bytes - len(self._head)
            self._head += data[:take]
            data = data[take:]
            if len(self._head) < self.head_bytes:
                return
            self.head = np.frombuffer(bytes(self._head), dtype=self.head_dtype)
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


class Int8Codec(Codec):
    """int8 with one float32 scale per block of BLOCK values: ~4x smaller than fp32.

    Wire layout: all block scales (float32), then all values (int8); value = q * scale[block],
    scale = max|x| / 127 over the block, q rounded to nearest.
    """

    name = "int8"
    BLOCK = 256

    def _blocks(self, n: int) -> int:
        return -(-n // self.BLOCK)

    def wire_manifest(self, floats: Manifest) -> Manifest:
        n = sum(t.numel for t in floats.tensors)
        return Manifest(
            (
                TensorSpec("int8.scales", "float32", (self._blocks(n),)),
                TensorSpec("int8.values", "int8", (n,)),
            )
        )

    def encode(self, delta: np.ndarray) -> np.ndarray:
        x = np.asarray(delta, dtype=np.float32)
        n, blocks = x.size, self._blocks(x.size)
        padded = np.zeros(blocks * self.BLOCK, dtype=np.float32)
        padded[:n] = x
        padded = padded.reshape(blocks, self.BLOCK)
        scales = np.abs(padded).max(axis=1) / np.float32(127)
        safe = np.where(scales > 0, scales, np.float32(1))
        q = np.clip(np.rint(padded / safe[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
        return np.concatenate([scales.astype("<f4").view(np.uint8), q.view(np.uint8)])

    def decoder(self, num_values: int) -> StreamDecoder:
        codec = self

        class _Decoder(_TwoPartDecoder):
            def _piece(self, raw: Piece) -> Piece:
                assert self.head is not None
                first, last = raw.offset // codec.BLOCK, (raw.offset + raw.values.size - 1)
                scales = np.repeat(self.head[first : last // codec.BLOCK + 1], codec.BLOCK)
                start = raw.offset - first * codec.BLOCK
                values = raw.values.astype(np.float32)
                values *= scales[start : start + values.size]
                return Piece(raw.offset, values)

        return _Decoder("<f4", self._blocks(num_values), "i1", num_values)


class TopKCodec(Codec):
    """The `fraction` largest-magnitude values and their positions; the rest count as zero.

    Wire layout: k int32 positions (strictly increasing), then their k float32 values. Lossy by
    design, so clients keep what was left out and add it to the next round's delta
    (error feedback, Stich et al. 2018): nothing is lost, only delayed.
    """

    error_feedback = True
    DEFAULT_FRACTION = 0.1

    def __init__(self, fraction: float = DEFAULT_FRACTION) -> None:
        if not 0 < fraction <= 1:
            raise ManifestError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.name = "topk" if fraction == self.DEFAULT_FRACTION else f"topk:{fraction:g}"

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.fraction * n))) if n else 0

    def wire_manifest(self, floats: Manifest) -> Manifest:
        k = self.k(sum(t.numel for t in floats.tensors))
        return Manifest(
            (
                TensorSpec("topk.indices", "int32", (k,)),
                TensorSpec("topk.values", "float32", (k,)),
            )
        )

    def encode(self, delta: np.ndarray) -> np.ndarray:
        x = np.asarray(delta, dtype=np.float32)
        if x.size >= 2**31:
            raise ValueError("top-k positions are int32: the model has too many values")
        k = self.k(x.size)
        top = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]).astype("<i4")
        return np.concatenate([top.view(np.uint8), x[top].astype("<f4").view(np.uint8)])

    def decoder(self, num_values: int) -> StreamDecoder:
        class _Decoder(_TwoPartDecoder):
            def _check_head(self, head: np.ndarray) -> None:
                if head.size and (
                    head[0] < 0 or head[-1] >= num_values or np.any(np.diff(head) <= 0)
                ):
                    raise ManifestError(
                        "top-k positions must be strictly increasing and within the model"
                    )

            def _piece(self, raw: Piece) -> Piece:
                assert self.head is not None
                idx = self.head[raw.offset : raw.offset + raw.values.size].astype(np.int64)
                return Piece(raw.offset, raw.values, idx)

        k = self.k(num_values)
        return _Decoder("<i4", k, "<f4", k)


class ErrorFeedback:
    """Client-side memory of what a lossy codec left out, added to the next round's delta."""

    def __init__(self) -> None:
        self.residual: np.ndarray | None = None

    def encode(self, codec: Codec, delta: np.ndarray) -> np.ndarray:
        if not codec.error_feedback:
            return codec.encode(delta)
        v = np.asarray(delta, dtype=np.float32)
        if self.residual is not None and self.residual.size == v.size:
            v = v + self.residual
        payload = codec.encode(v)
        self.residual = v - codec.decode(payload, v.size)
        return payload


CODECS: dict[str, Codec] = {
    c.name: c for c in (Float32Codec(), Float16Codec(), Int8Codec(), TopKCodec(), MaskedRingCodec())
}


def get_codec(name: str) -> Codec:
    """A codec by name; `topk:F` picks top-k with fraction F (plain `topk` is 10%)."""
    if name in CODECS:
        return CODECS[name]
    if name == "he-ckks":
        return CKKSCodec()
    kind, _, arg = name.partition(":")
    if kind == "topk" and arg:
        try:
            return TopKCodec(float(arg))
        except ValueError as e:
            raise ManifestError(f"bad top-k encoding {excerpt(name)}: {e}") from None
    raise ManifestError(
        f"unknown update encoding {excerpt(name)}; supported: {', '.join(CODECS)}, "
        "topk:FRACTION, he-ckks"
    )
