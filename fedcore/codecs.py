"""Update encodings: how a client's float32 delta vector becomes bytes on the wire and back.

Every codec is an encode/decode pair over the model's float vector (see tensors.float_vector).
Decoding is streaming: the coordinator feeds raw chunks as they arrive (chunk boundaries need not
align with values) and gets dense float32 pieces to fold into its accumulator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from fedcore.codec_base import (
    SLAB,
    Codec,
    FixedWidthDecoder,
    Piece,
    StreamDecoder,
    TwoPartDecoder,
    quantized_slabs,
)
from fedcore.codec_int4 import Int4Codec
from fedcore.he import CKKSCodec
from fedcore.limits import excerpt
from fedcore.tensors import (
    Manifest,
    ManifestError,
    TensorSpec,
    float32_to_bfloat16_bits,
)

__all__ = [
    "CODECS",
    "Codec",
    "ErrorFeedback",
    "Int4Codec",
    "Piece",
    "StreamDecoder",
    "get_codec",
]


# A float tensor's dtype on the wire under fp32: bfloat16 and float16 tensors travel as
# themselves (upcasting them would double the bytes for no precision the model can keep),
# everything else (float32, float64) as float32. Value: (numpy storage, is bfloat16).
_HALF = {"float16": ("<f2", False), "bfloat16": ("<u2", True)}
_F16_MAX = float(np.finfo(np.float16).max)


def _native(floats: Manifest) -> Manifest:
    return Manifest(
        tuple(
            t if t.dtype in _HALF else TensorSpec(t.name, "float32", t.shape)
            for t in floats.tensors
        )
    )


def _storage(dtype: str) -> np.dtype:
    """How a float tensor of `dtype` is stored on the wire under fp32 (see _HALF)."""
    return np.dtype(_HALF.get(dtype, ("<f4", False))[0])


def _clipped(values: np.ndarray, dtype: str) -> np.ndarray:
    """float16 values beyond its range clipped, not inf; other dtypes as they are."""
    return np.clip(values, -_F16_MAX, _F16_MAX) if dtype == "float16" else values


class Float32Codec(Codec):
    """Float32, or a half-precision tensor's own dtype (see _native): lossless for the model."""

    name = "fp32"

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return _native(floats)

    def bind(self, floats: Manifest) -> Codec:
        wire = _native(floats)
        if all(t.dtype == "float32" for t in wire.tensors):
            return self
        return _NativeFloatCodec(wire)

    def encode(self, delta: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(delta, dtype="<f4").view(np.uint8)

    def decoder(self, num_values: int) -> StreamDecoder:
        return FixedWidthDecoder(np.dtype("<f4"), num_values)


class _NativeFloatCodec(Float32Codec):
    """fp32 bound to a model with bfloat16/float16 tensors: runs of equal dtype, in order."""

    def __init__(self, wire: Manifest) -> None:
        self.runs: list[tuple[str, int, int]] = []  # (dtype, first value, count)
        pos = 0
        for t in wire.tensors:
            if self.runs and self.runs[-1][0] == t.dtype:
                dtype, start, count = self.runs[-1]
                self.runs[-1] = (dtype, start, count + t.numel)
            else:
                self.runs.append((t.dtype, pos, t.numel))
            pos += t.numel
        self.num_values = pos

    def encode(self, delta: np.ndarray) -> np.ndarray:
        x = np.asarray(delta, dtype=np.float32)
        if x.size != self.num_values:
            raise ValueError(f"delta has {x.size} values, the model's floats {self.num_values}")
        out = np.empty(sum(_storage(d).itemsize * c for d, _, c in self.runs), np.uint8)
        pos = 0
        for dtype, start, count in self.runs:
            dest = out[pos : pos + _storage(dtype).itemsize * count].view(_storage(dtype))
            for at in range(0, count, SLAB):  # temporaries of a slab, not of a run
                part = x[start + at : start + min(at + SLAB, count)]
                if dtype == "bfloat16":
                    dest[at : at + part.size] = float32_to_bfloat16_bits(part)
                else:  # float16 clipped to its range, float32 as is
                    dest[at : at + part.size] = _clipped(part, dtype)
            pos += dest.nbytes
        return out

    def decoder(self, num_values: int) -> StreamDecoder:
        if num_values != self.num_values:
            raise ManifestError(f"{num_values} values declared, the model has {self.num_values}")
        return _RunsDecoder(self.runs)


class _RunsDecoder(StreamDecoder):
    """Consecutive fixed-width runs (float32 / float16 / bfloat16), each decoded as it streams."""

    def __init__(self, runs: list[tuple[str, int, int]]) -> None:
        self.runs = runs
        self.index = 0
        self.current = self._open(0)

    def _open(self, index: int) -> FixedWidthDecoder | None:
        if index >= len(self.runs):
            return None
        dtype, _, count = self.runs[index]
        return FixedWidthDecoder(_storage(dtype), count, bf16=dtype == "bfloat16")

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        view = memoryview(data).cast("B")
        while True:
            run = self.current
            if run is None:
                if len(view):
                    raise ManifestError("update carries more bytes than its manifest declares")
                return
            start = self.runs[self.index][1]
            wanted = (run.expected - run.decoded) * run.dtype.itemsize - len(run._carry)
            for piece in run.feed(view[:wanted]):
                yield Piece(start + piece.offset, piece.values)
            view = view[wanted:]
            if run.decoded < run.expected:
                return  # the rest of this run is in the next chunk
            run.finish()
            self.index += 1
            self.current = self._open(self.index)

    def finish(self) -> None:
        if self.current is not None:
            self.current.finish()  # names how far the stream got
            raise ManifestError("update stream ended before its last tensors (truncated)")


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
        return FixedWidthDecoder(np.dtype("<u8"), num_values, as_float32=False)


class Float16Codec(Codec):
    """Half precision: half the bytes; values beyond float16's range are clipped, not inf."""

    name = "fp16"

    def wire_manifest(self, floats: Manifest) -> Manifest:
        return floats.with_dtype("float16")

    def encode(self, delta: np.ndarray) -> np.ndarray:
        x = np.asarray(delta).reshape(-1)
        out = np.empty(x.size, dtype="<f2")
        for start in range(0, x.size, SLAB):
            out[start : start + SLAB] = _clipped(x[start : start + SLAB], "float16")
        return out.view(np.uint8)

    def decoder(self, num_values: int) -> StreamDecoder:
        return FixedWidthDecoder(np.dtype("<f2"), num_values)


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
        x = np.asarray(delta, dtype=np.float32).reshape(-1)
        n, blocks = x.size, self._blocks(x.size)
        out = np.empty(4 * blocks + n, dtype=np.uint8)
        scales, values = out[: 4 * blocks].view("<f4"), out[4 * blocks :].view(np.int8)
        for start, block_scales, q in quantized_slabs(x, self.BLOCK, 127):
            first = start // self.BLOCK
            scales[first : first + block_scales.size] = block_scales
            end = min(n, start + q.size)
            values[start:end] = q[: end - start]
        return out

    def decoder(self, num_values: int) -> StreamDecoder:
        codec = self

        class _Decoder(TwoPartDecoder):
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
        x = np.asarray(delta, dtype=np.float32).reshape(-1)
        if x.size >= 2**31:
            raise ValueError("top-k positions are int32: the model has too many values")
        top = _largest(x, self.k(x.size))
        return np.concatenate([top.view(np.uint8), x[top].astype("<f4").view(np.uint8)])

    def decoder(self, num_values: int) -> StreamDecoder:
        class _Decoder(TwoPartDecoder):
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


def _largest(x: np.ndarray, k: int) -> np.ndarray:
    """Positions (int32, increasing) of the k largest |x|, NaN counting as the largest (sent,
    so the coordinator refuses it by name) and ties at the threshold taken first by position.
    One float32 copy of |x| for the threshold (np.argpartition's int64 positions of every
    value were two more), then the positions slab by slab."""
    if k == 0:
        return np.zeros(0, dtype="<i4")
    magnitudes = np.abs(x)
    magnitudes.partition(x.size - k)  # in place; NaN sorts above every number
    threshold = magnitudes[x.size - k]
    del magnitudes
    if np.isnan(threshold):
        threshold = np.float32(np.inf)
    above: list[np.ndarray] = []
    ties: list[np.ndarray] = []
    tied = 0
    for start in range(0, x.size, SLAB):
        m = np.abs(x[start : start + SLAB])
        np.copyto(m, np.inf, where=np.isnan(m))
        above.append((np.flatnonzero(m > threshold) + start).astype("<i4"))
        if tied < k:  # a constant delta ties everywhere: keep no more than could be sent
            ties.append((np.flatnonzero(m == threshold)[: k - tied] + start).astype("<i4"))
            tied += ties[-1].size
    chosen = np.concatenate(above)
    return np.sort(np.concatenate([chosen, np.concatenate(ties)[: k - chosen.size]]))


class ErrorFeedback:
    """Client-side memory of what a lossy codec left out, added to the next round's delta."""

    def __init__(self) -> None:
        self.residual: np.ndarray | None = None

    def encode(self, codec: Codec, delta: np.ndarray) -> np.ndarray:
        if not codec.error_feedback:
            return codec.encode(delta)
        # v = delta + residual, computed into the residual's memory (or a copy of delta), then
        # turned into the next residual in place, piece by decoded piece: one model-sized
        # vector kept between rounds, and no other (decode() would allocate two more).
        v = np.asarray(delta, dtype=np.float32).reshape(-1)
        kept = self.residual
        if kept is not None and kept.size == v.size:
            # Into the residual's memory unless it cannot take it (one loaded from disk may not).
            in_place = kept.flags.writeable and kept.dtype == np.float32
            v = np.add(kept, v, out=kept if in_place else None)
        else:
            v = v.copy()
        payload = codec.encode(v)
        for piece in codec.pieces(payload, v.size):
            if piece.indices is None:
                sent = v[piece.offset : piece.offset + piece.values.size]
                np.subtract(sent, piece.values, out=sent)
            else:
                v[piece.indices] -= piece.values
        self.residual = v
        return payload


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Float32Codec(),
        Float16Codec(),
        Int8Codec(),
        Int4Codec(),
        TopKCodec(),
        MaskedRingCodec(),
    )
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
