"""FedAvgM (Hsu et al., 2019, "Measuring the effects of non-identical data distribution"):

    v <- beta * v + delta;   x <- x + eta * v

with delta the example-weighted mean client delta, beta the server momentum, eta the server
learning rate. beta = 0, eta = 1 is exactly FedAvg.
"""

from __future__ import annotations

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import (
    AggregateInput,
    Strategy,
    add_to_floats,
    load_named_state,
    require,
)


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9) -> None:
        require(server_lr > 0, f"--server-lr must be > 0, got {server_lr}")
        require(
            0 <= server_momentum < 1, f"--server-momentum must be in [0, 1), got {server_momentum}"
        )
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.velocity: np.ndarray | None = None

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        delta = agg.mean_delta.astype(np.float32)
        if self.velocity is None:
            self.velocity = np.zeros_like(delta)
        self.velocity = np.float32(self.server_momentum) * self.velocity + delta
        return add_to_floats(global_model, np.float32(self.server_lr) * self.velocity)

    def params(self) -> dict[str, float]:
        return {"server_lr": self.server_lr, "server_momentum": self.server_momentum}

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {"velocity": self.velocity.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.velocity = load_named_state(self.name, arrays, ("velocity",)).get("velocity")
