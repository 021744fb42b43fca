"""Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML 2018), as Flower's `Bulyan` with Krum as its first rule.

With n >= 4f + 3 updates of which at most f are Byzantine:

1. selection of θ = n - 2f updates S. `krum` (the paper's, and Flower's legacy Bulyan): θ
   times, run Krum (krum.py's score: the sum of squared distances to the r - f - 2 nearest
   others, r the updates not yet chosen) on the updates not yet chosen and move the winner to
   S. `multikrum` (Flower's Message-API Bulyan): score all n once, take the θ lowest;
2. aggregation: per coordinate, the mean of the β = θ - 2f values of S closest to S's median.

The β values closest to the median are a window of β consecutive values of the sorted column,
so step 2 sorts each block once (like trimmed_mean.py) and picks, per coordinate, the window of
the 2f + 1 candidates whose farther end is nearest the median: memory stays O(clients x block),
with no per-value index arrays. The weights w_i are ignored (num_examples is self-reported).
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
from fedserver.strategies.krum import krum_scores, pairwise_sq_distances

SELECTIONS = ("krum", "multikrum")


class Bulyan(Strategy):
    name = "bulyan"
    needs_all_updates = True

    def __init__(self, bulyan_byzantine: int = 1, bulyan_selection: str = "krum") -> None:
        require(bulyan_byzantine >= 0, f"--bulyan-byzantine must be >= 0, got {bulyan_byzantine}")
        require(
            bulyan_selection in SELECTIONS,
            f"--bulyan-selection must be one of {', '.join(SELECTIONS)}, got {bulyan_selection!r}",
        )
        self.byzantine = int(bulyan_byzantine)
        self.selection = bulyan_selection

    def params(self) -> dict[str, float | str]:
        return {"bulyan_byzantine": self.byzantine, "bulyan_selection": self.selection}

    def min_updates(self) -> tuple[int, str]:
        f = self.byzantine
        return (
            4 * f + 3,
            f"Bulyan's n >= 4f + 3 with --bulyan-byzantine {f}; a smaller f needs fewer",
        )

    def select(self, updates: UpdateSet) -> list[int]:
        """Row indices of the θ = n - 2f updates chosen, in the order chosen (ties: the lower
        index, as Flower's argmin / stable sort over the updates in order)."""
        n, f = updates.count, self.byzantine
        theta = n - 2 * f
        dist = pairwise_sq_distances(updates)
        if self.selection == "multikrum":
            return np.argsort(krum_scores(dist, f), kind="stable")[:theta].tolist()
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(theta):
            scores = krum_scores(dist[np.ix_(remaining, remaining)], f)
            chosen.append(remaining.pop(int(np.argmin(scores))))
        return chosen

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        updates = require_updates(agg, self.name)
        n, f = updates.count, self.byzantine
        needed, why = self.min_updates()
        if n < needed:
            # The coordinator refuses, at start-up, settings under which a round can close with
            # fewer (assembly.py); reaching this is a bug, not a configuration to work around.
            raise ValueError(f"strategy bulyan got {n} updates but needs {needed} ({why})")
        chosen = np.array(sorted(self.select(updates)))
        beta = len(chosen) - 2 * f
        delta = np.empty(updates.vectors.shape[1], dtype=np.float32)
        for cols, block in updates.blocks():
            delta[cols] = closest_to_median_mean(block[chosen], beta)
        return add_to_floats(global_model, delta)


def closest_to_median_mean(values: np.ndarray, beta: int) -> np.ndarray:
    """Per column of `values` (rows, columns): the float32 mean of the `beta` values closest to
    the column's median (np.median's: the mean of the middle two for an even count)."""
    rows = values.shape[0]
    ordered = np.sort(values, axis=0)
    mid = rows // 2
    median = ordered[mid] if rows % 2 else (ordered[mid - 1] + ordered[mid]) / np.float32(2)
    # Window s holds ordered[s : s + beta]; its farther end from the median decides.
    starts = rows - beta + 1
    reach = np.empty((starts, values.shape[1]), dtype=np.float32)
    for s in range(starts):
        reach[s] = np.maximum(median - ordered[s], ordered[s + beta - 1] - median)
    best = np.argmin(reach, axis=0)
    out = np.empty(values.shape[1], dtype=np.float32)
    for s in range(starts):
        cols = best == s
        if cols.any():
            out[cols] = ordered[s : s + beta, cols].mean(axis=0, dtype=np.float32)
    return out
