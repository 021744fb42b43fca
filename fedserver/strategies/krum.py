"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

With n updates of which at most f are Byzantine, update i scores the sum of squared distances
to its n - f - 2 nearest other updates. Krum takes the update with the lowest score; Multi-Krum
averages the m lowest-scoring ones (unweighted; scores computed once, as in Flower and
El Mhamdi et al. 2018). The guarantee needs n > 2f + 2: settings under which a round could
close with fewer are refused at start-up (`min_updates`, coordinator/assembly.py). The scores
still shrink the neighbourhood to at least one for fewer (Bulyan's later selections need it).
"""

from __future__ import annotations

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import (
    AggregateInput,
    Strategy,
    UpdateSet,
    add_to_floats,
    require,
    require_updates,
)


class Krum(Strategy):
    name = "krum"
    needs_all_updates = True

    def __init__(self, krum_byzantine: int = 1, multi_krum_m: int = 1) -> None:
        require(krum_byzantine >= 0, f"--krum-byzantine must be >= 0, got {krum_byzantine}")
        require(multi_krum_m >= 1, f"--multi-krum-m must be >= 1, got {multi_krum_m}")
        self.byzantine = int(krum_byzantine)
        self.m = int(multi_krum_m)

    def params(self) -> dict[str, float]:
        return {"krum_byzantine": self.byzantine, "multi_krum_m": self.m}

    def min_updates(self) -> tuple[int, str]:
        f = self.byzantine
        return 2 * f + 3, f"Krum's n > 2f + 2 with --krum-byzantine {f}; a smaller f needs fewer"

    def select(self, updates: UpdateSet) -> np.ndarray:
        """Row indices of the chosen updates, best score first (ties: lower index)."""
        scores = krum_scores(pairwise_sq_distances(updates), self.byzantine)
        return np.argsort(scores, kind="stable")[: min(self.m, updates.count)]

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        updates = require_updates(agg, self.name)
        chosen = np.sort(self.select(updates))
        delta = np.empty(updates.vectors.shape[1], dtype=np.float32)
        for cols, block in updates.blocks():
            delta[cols] = block[chosen].mean(axis=0, dtype=np.float32)
        return add_to_floats(global_model, delta)


def krum_scores(dist: np.ndarray, byzantine: int) -> np.ndarray:
    """Each update's score from the (n, n) squared distances: the sum over its
    max(1, n - f - 2) nearest other updates (0 for a lone update)."""
    neighbours = max(1, dist.shape[0] - byzantine - 2)
    # Each row's own zero distance sorts first; skip it and sum the nearest others.
    return np.sort(dist, axis=1)[:, 1 : 1 + neighbours].sum(axis=1)


def pairwise_sq_distances(updates: UpdateSet) -> np.ndarray:
    """(n, n) squared L2 distances, accumulated block by block in float64."""
    n = updates.count
    dist = np.zeros((n, n), dtype=np.float64)
    for _, block in updates.blocks():
        b = block.astype(np.float64)
        sq = (b * b).sum(axis=1)
        dist += sq[:, None] + sq[None, :] - 2.0 * (b @ b.T)
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)
