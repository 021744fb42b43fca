"""Digits Tasks for the simulation tests (`fedserver simulate --task tests.sim_tasks:...`).

`noisy`: trains, then perturbs every float tensor with draws from numpy's and `random`'s
global generators (as tasks with augmentation or dropout-like noise do), so the model depends
on how those generators were seeded.

`failing`: client FAIL_TRAIN's training and client FAIL_EVALUATE's evaluation raise
ValueError (a bug in a task), every round.

`personal`: FedPer, its last bias stays on the client.

`crashing`: client FAIL_TRAIN's training exits its worker process, every round.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from examples.digits import DigitsTask
from fedclient.partition import Partition
from fedclient.task import LocalData, TrainConfig, TrainResult

FAIL_TRAIN = 1
FAIL_EVALUATE = 2


class NoisyDigits(DigitsTask):
    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        result = super().train(model, data, config)
        with torch.no_grad():
            for p in model.parameters():
                noise = np.random.standard_normal(tuple(p.shape)).astype(np.float32)
                p.add_(torch.from_numpy(noise) * 1e-2 * random.random())
        return result


class FailingDigits(DigitsTask):
    """Knows which client it serves from the partition it was last asked to load (a worker
    loads a client's data right before training or evaluating it)."""

    index = -1

    def load_partition(self, partition: Partition) -> LocalData:
        self.index = partition.index
        return super().load_partition(partition)

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        if self.index == FAIL_TRAIN:
            raise ValueError(f"client {self.index}: a bug in train()")
        return super().train(model, data, config)

    def evaluate(self, model: torch.nn.Module, data: Dataset) -> dict[str, float]:
        if self.index == FAIL_EVALUATE:
            raise ValueError(f"client {self.index}: a bug in evaluate()")
        return super().evaluate(model, data)


class PersonalDigits(DigitsTask):
    personal_tensors = "2.bias"


noisy = NoisyDigits()
failing = FailingDigits()
personal = PersonalDigits()


class CrashingDigits(FailingDigits):
    """Client FAIL_TRAIN's training ends its whole worker process (a segfault in a native
    library, the OOM killer), every round."""

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        if self.index == FAIL_TRAIN:
            os._exit(3)
        return super().train(model, data, config)


crashing = CrashingDigits()
