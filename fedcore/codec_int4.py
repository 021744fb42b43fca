"""The int4 update encoding: 4-bit values with one float32 scale per block of 64, two per byte.

About 1/7 of fp32 (1/8 for the values, 1/64 for the scales). Lossy enough that clients carry
what it rounded away into the next round (error feedback, as for top-k: fedcore/codecs.py's
ErrorFeedback), so the rounding error does not accumulate over rounds.
"""

from __future__ import annotations

import numpy as np

from fedcore.codec_base import Codec, Piece, StreamDecoder, TwoPartDecoder, quantized_slabs
from fedcore.tensors import Manifest, ManifestError, TensorSpec

LEVELS = 7  # symmetric: q in -7..7, value = q x scale, scale = max|x| / 7 over the block


class Int4Codec(Codec):
    """Wire layout: all block scales (float32), then ceil(n/2) bytes of values; value 2i in
    the low nibble of byte i, 2i+1 in the high one, each stored as q + 8 (an odd n leaves the
    last high nibble unused). Symmetric rounding to nearest: |error| <= scale / 2 per value."""

    name = "int4"
    BLOCK = 64
    error_feedback = True

    def _blocks(self, n: int) -> int:
        return -(-n // self.BLOCK)

    def wire_manifest(self, floats: Manifest) -> Manifest:
        n = sum(t.numel for t in floats.tensors)
        return Manifest(
            (
                TensorSpec("int4.scales", "float32", (self._blocks(n),)),
                TensorSpec("int4.values", "uint8", (-(-n // 2),)),
            )
        )

    def encode(self, delta: np.ndarray) -> np.ndarray:
        x = np.asarray(delta, dtype=np.float32).reshape(-1)
        n, blocks = x.size, self._blocks(x.size)
        out = np.empty(4 * blocks + -(-n // 2), dtype=np.uint8)
        scales, packed = out[: 4 * blocks].view("<f4"), out[4 * blocks :]
        for start, block_scales, q in quantized_slabs(x, self.BLOCK, LEVELS):
            first = start // self.BLOCK  # SLAB is a multiple of BLOCK, so even: whole bytes
            scales[first : first + block_scales.size] = block_scales
            nibbles = (q + 8).astype(np.uint8)  # padded to whole blocks: an even count
            both = nibbles[0::2] | (nibbles[1::2] << 4)
            end = min(packed.size, (start + q.size) // 2)
            packed[start // 2 : end] = both[: end - start // 2]
        return out

    def decoder(self, num_values: int) -> StreamDecoder:
        block = self.BLOCK

        class _Decoder(TwoPartDecoder):
            def _check_head(self, head: np.ndarray) -> None:
                # A NaN, infinite or negative scale is never what encode() makes.
                if not (np.isfinite(head).all() and (head >= 0).all()):
                    raise ManifestError("int4 block scales must be finite and >= 0")

            def _piece(self, raw: Piece) -> Piece:
                assert self.head is not None
                packed = raw.values
                start = 2 * raw.offset  # first value this piece's bytes hold
                values = np.empty(2 * packed.size, dtype=np.float32)
                values[0::2] = packed & 0x0F
                values[1::2] = packed >> 4
                values -= 8
                values = values[: min(values.size, num_values - start)]  # odd n: padding nibble
                first = start // block
                last = (start + values.size - 1) // block
                scales = np.repeat(self.head[first : last + 1], block)
                skip = start - first * block
                values *= scales[skip : skip + values.size]
                return Piece(start, values)

        return _Decoder("<f4", self._blocks(num_values), "u1", -(-num_values // 2))
