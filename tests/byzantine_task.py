"""Test-only Tasks for the Byzantine test: an attacker is an ordinary client whose Task lies.

`attacker` trains like an honest digits client, then rewrites its weights so that the delta it
submits is -10 x the honest one (sign flip, scaled). Nothing in the product knows about it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from examples.digits import DigitsTask
from fedclient.partition import Partition
from fedclient.task import LocalData, Task, TrainConfig, TrainResult

SCALE = -10.0


class SignFlipTask(Task):
    def __init__(self, inner: Task, scale: float = SCALE) -> None:
        self.inner = inner
        self.scale = scale

    def build_model(self) -> torch.nn.Module:
        return self.inner.build_model()

    def load_partition(self, partition: Partition) -> LocalData:
        return self.inner.load_partition(partition)

    def default_config(self) -> TrainConfig:
        return self.inner.default_config()

    def server_test_data(self) -> Dataset | None:
        return self.inner.server_test_data()

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = self.inner.train(model, data, config)
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    value.copy_(base[name] + self.scale * (value - base[name]))
        return result


attacker = SignFlipTask(DigitsTask())
