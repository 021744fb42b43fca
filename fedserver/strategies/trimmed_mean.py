"""Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the k largest and
k smallest client values, k = floor(trim_fraction * n), and average the rest (unweighted, since
num_examples is self-reported). Tolerates up to k arbitrary updates.
"""

from __future__ import annotations

import math

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import (
    AggregateInput,
    Strategy,
    add_to_floats,
    coordinatewise,
    require,
)


class TrimmedMean(Strategy):
    name = "trimmed_mean"
    needs_all_updates = True

    def __init__(self, trim_fraction: float = 0.2) -> None:
        require(
            0 <= trim_fraction < 0.5, f"--trim-fraction must be in [0, 0.5), got {trim_fraction}"
        )
        self.trim_fraction = float(trim_fraction)

    def trimmed(self, n: int) -> int:
        """Values dropped at each end; always leaves at least one."""
        return min(math.floor(self.trim_fraction * n), (n - 1) // 2)

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        def trim(block: np.ndarray) -> np.ndarray:
            k = self.trimmed(block.shape[0])
            ordered = np.sort(block, axis=0)
            return ordered[k : block.shape[0] - k].mean(axis=0, dtype=np.float32)

        return add_to_floats(global_model, coordinatewise(agg, self.name, trim))

    def params(self) -> dict[str, float]:
        return {"trim_fraction": self.trim_fraction}
