"""The float32 accumulator: verified updates folded into one running weighted sum,
per tensor, read back from their spills in blocks (memory O(model))."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcore.codecs import Piece
from fedcore.durable import page_aligned_zeros
from fedcore.selection import Selection
from fedserver.updates.receiver import StagedUpdate

FOLD_STEP = 1 << 15  # values scaled at a time (128 KiB: stays in the L2 cache for the add)


class Accumulator:
    """Running example-weighted sum of update vectors: the only O(model) state per round.

    Weights are kept per tensor (`tensor_sizes`, the model's float tensors in order) so partial
    updates (fedcore/selection.py) fold into the same sum: each tensor is averaged over the
    updates that carried it, and a tensor nobody sent gets a zero mean delta (it stays frozen).
    """

    def __init__(
        self,
        num_values: int,
        tensor_sizes: Sequence[int] | None = None,
        reuse: np.ndarray | None = None,
    ) -> None:
        """`reuse`: float32 memory of `num_values` to sum into, its contents stale (a retired
        model's pages: fedcore.durable.PageRecycler); the first fold overwrites it."""
        sizes = list(tensor_sizes) if tensor_sizes is not None else [num_values]
        if sum(sizes) != num_values:
            raise ValueError(f"tensor sizes add up to {sum(sizes)}, not {num_values}")
        if reuse is not None and (reuse.dtype != np.float32 or reuse.shape != (num_values,)):
            raise ValueError(f"memory to reuse must be {num_values} float32 values")
        # Page-aligned: under FedAvg the sum becomes the new model, whose checkpoint is then
        # written with O_DIRECT straight from it (fedcore.durable).
        self.total = reuse if reuse is not None else page_aligned_zeros(num_values, np.float32)
        self._stale = reuse is not None  # total holds old values, not zeros, until a fold
        self.weight = 0.0
        self.count = 0
        self._bounds = np.cumsum([0, *sizes])
        self.tensor_weight = np.zeros(len(sizes), dtype=np.float64)
        self._scratch = np.empty(FOLD_STEP, dtype=np.float32)
        self._averaged = False

    def fold(
        self,
        update: StagedUpdate,
        weight: float,
        selection: Selection | None = None,
        scale: float = 1.0,
    ) -> None:
        """Add weight x scale x update; a partial update's pieces are mapped through `selection`.

        `scale` shrinks the values without counting in the mean's weight: the DP re-clip
        (fedcore.privacy.clip_factor; 1.0 exactly, i.e. no change, for an update within C).
        """
        if self._averaged:
            raise ValueError("cannot fold into an accumulator whose mean was taken")
        factor = np.float32(weight * scale)
        # Transient pieces: views of the spill's page cache, each used before the next is taken.
        pieces = update.pieces(transient=True)
        if selection is not None:
            pieces = selection.to_full(pieces)
        # Over stale memory, dense pieces in order are written, not added; from the first
        # that is not (a gap, a sparse piece), or after the last, the rest is zeroed.
        written = 0 if self._stale else None
        try:
            for piece in pieces:
                if written is not None and (piece.indices is not None or piece.offset != written):
                    self.total[written:] = 0.0
                    written = None
                if written is not None:
                    written = self._write(piece.offset, piece.values, factor)
                else:
                    self._add(piece, factor)
                # Let the spill's mapped window go before the next one is mapped: held until
                # the loop rebinds it, two windows counted in the coordinator's RSS at once.
                del piece
        finally:
            if written is not None:
                self.total[written:] = 0.0
            self._stale = False
        if selection is None:
            self.tensor_weight += weight
        else:
            self.tensor_weight[list(selection.indices)] += weight
        self.weight += weight
        self.count += 1

    def _write(self, offset: int, values: np.ndarray, factor: np.float32) -> int:
        """total[offset:...] = factor x values + 0.0: what adding them to zeros gives, to the
        bit (x + 0.0 turns a -0.0 into +0.0, as 0.0 + x does). Returns where the piece ends."""
        target = self.total[offset : offset + values.size]
        zero = np.float32(0.0)
        if factor == 1:
            np.add(values, zero, out=target)
        else:
            for start in range(0, values.size, FOLD_STEP):
                t = target[start : start + FOLD_STEP]
                np.multiply(values[start : start + t.size], factor, out=t)
                np.add(t, zero, out=t)
        return offset + values.size

    def _add(self, piece: Piece, factor: np.float32) -> None:
        values = piece.values
        if piece.indices is not None:  # sparse (top-k): positions are unique
            self.total[piece.indices] += values * factor
            return
        target = self.total[piece.offset : piece.offset + values.size]
        if factor == 1:  # exact either way; one pass over the bytes instead of two
            np.add(target, values, out=target)
            return
        # Scaled in cache-sized steps, so the add reads the scaled values from the cache.
        for start in range(0, values.size, FOLD_STEP):
            part = values[start : start + FOLD_STEP]
            scaled = np.multiply(part, factor, out=self._scratch[: part.size])
            t = target[start : start + part.size]
            np.add(t, scaled, out=t)

    def mean(self) -> np.ndarray:
        """The weighted mean, computed in place: the sum is consumed (no second model-sized
        vector at aggregation time), so call it once, when the round is closed."""
        if self.count == 0 or self.weight <= 0:
            raise ValueError("no updates to average")
        if not self._averaged:
            if np.all(self.tensor_weight == self.weight):  # every update carried every tensor
                np.divide(self.total, np.float32(self.weight), out=self.total)
            else:
                for i, w in enumerate(self.tensor_weight):
                    part = self.total[self._bounds[i] : self._bounds[i + 1]]
                    if w > 0:
                        np.divide(part, np.float32(w), out=part)
                    else:
                        part[...] = 0.0
            self._averaged = True
        return self.total
