"""FedAvg (McMahan et al., 2017): the example-weighted mean of the client models.

x <- x + eta * mean_delta with server learning rate eta (1 by default, which is exactly averaging
the client models; Reddi et al. 2021, eq. 1). In FedSGD mode (`--mode fedsgd`) clients send the
negated gradient, so this is plain SGD on the averaged gradient with learning rate --server-lr.
"""

from __future__ import annotations

import numpy as np

from fedcore.tensors import FlatModel
from fedserver.strategies.base import AggregateInput, Strategy, add_to_floats, require


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        require(server_lr > 0, f"--server-lr must be > 0, got {server_lr}")
        self.server_lr = float(server_lr)

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        # Averaging deltas against a common base equals averaging the models themselves.
        # The mean is the round's (the accumulator's sum, consumed at close): summed into in
        # place, it becomes the new model, so aggregating a large model copies nothing.
        if self.server_lr == 1.0:
            return add_to_floats(global_model, agg.mean_delta, consume=True)
        delta = np.multiply(agg.mean_delta, np.float32(self.server_lr), dtype=np.float32)
        return add_to_floats(global_model, delta, consume=True)

    def params(self) -> dict[str, float]:
        return {"server_lr": self.server_lr}
