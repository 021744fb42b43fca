"""Coordinate-wise median (Yin et al., ICML 2018): each coordinate of the update is the median
of the clients' values for it. Unweighted: num_examples is self-reported, so an attacker could
inflate it. Tolerates fewer than half of the updates being arbitrary.
"""

from __future__ import annotations

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import AggregateInput, Strategy, add_to_floats, coordinatewise


class Median(Strategy):
    name = "median"
    needs_all_updates = True

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        return add_to_floats(global_model, coordinatewise(agg, self.name, _median))


def _median(block: np.ndarray) -> np.ndarray:
    return np.median(block, axis=0)
