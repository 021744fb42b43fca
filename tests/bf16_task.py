"""A tiny classifier whose weights are bfloat16 (`--task tests.bf16_task:task`): exchanged at
bf16 end to end (tests/test_native_dtype.py)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from fedclient.partition import Partition
from fedclient.task import LocalData, Task


def _data(seed: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class Bf16Task(Task):
    """The default loops cast its float32 inputs to bfloat16 (the model's dtype)."""

    def build_model(self) -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return net.to(torch.bfloat16)

    def load_partition(self, partition: Partition) -> LocalData:
        return LocalData(_data(partition.index, 64))

    def server_test_data(self) -> Dataset:
        return _data(1000, 128)


task = Bf16Task()
