"""What every aggregation strategy implements, and the helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedcore.tensors import FlatModel, float_vector, with_float_vector


@dataclass(frozen=True)
class AggregateInput:
    """One closed round's updates, already folded by the streaming accumulator."""

    round: int
    mean_delta: np.ndarray  # example-weighted mean of the clients' float32 delta vectors
    total_weight: float
    num_updates: int


class Strategy(ABC):
    """Turns the global model and a round's aggregate into the next global model.

    Strategies are pure (numpy only). Anything they carry across rounds (server momentum,
    optimizer moments) is exposed through state_arrays/load_state_arrays so a resumed run
    continues exactly where it stopped.
    """

    name: ClassVar[str]

    def round_config(self, round_number: int) -> dict[str, str]:
        """Extra knobs sent to clients with the round config (e.g. FedProx's mu)."""
        return {}

    @abstractmethod
    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel: ...

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"strategy {self.name} keeps no state, got {sorted(arrays)}")


def add_to_floats(model: FlatModel, delta: np.ndarray) -> FlatModel:
    """model + delta over the floating tensors (computed in float32, rounded to each dtype)."""
    return with_float_vector(model, float_vector(model) + delta)
