"""FedAvg (McMahan et al., 2017): the example-weighted mean of the client models."""

from __future__ import annotations

from fedcore.tensors import FlatModel
from fedserver.strategies.base import AggregateInput, Strategy, add_to_floats


class FedAvg(Strategy):
    name = "fedavg"

    def apply(self, global_model: FlatModel, agg: AggregateInput) -> FlatModel:
        # Averaging deltas against a common base equals averaging the models themselves.
        return add_to_floats(global_model, agg.mean_delta)
