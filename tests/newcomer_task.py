"""Tasks with the mistakes a newcomer makes, for tests/test_task_check.py and test_join_checks.py.

The tests copy this file into a temporary folder as `blobs.py` and run `--task blobs:NAME` from
there, as a user would with their own file. Every task has the same model as `task` (so a
coordinator running `blobs:task` admits them) except `float_target` and `wide`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedclient.partition import Partition
from fedclient.task import LocalData, Task


def _blobs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 4-D, float64 features (as numpy hands them out), int64 labels."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) + y[:, None]
    return x, y


class Blobs(Task):
    """Correct."""

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 3)

    def load_partition(self, partition: Partition) -> LocalData:
        x, y = _blobs()
        return LocalData(TensorDataset(x.float(), y), TensorDataset(x.float(), y))


class Float64(Blobs):
    """Features left float64."""

    def load_partition(self, partition: Partition) -> LocalData:
        x, y = _blobs()
        return LocalData(TensorDataset(x, y))


class Bare(Blobs):
    """A TensorDataset instead of LocalData."""

    def load_partition(self, partition: Partition) -> Any:
        x, y = _blobs()
        return TensorDataset(x.float(), y)


class FloatTarget(Blobs):
    """Real-valued targets under the default multiclass objective."""

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 1)

    def load_partition(self, partition: Partition) -> LocalData:
        x, y = _blobs()
        return LocalData(TensorDataset(x.float(), y.float()))


class Wide(Blobs):
    """Correct, but another model than `task`'s (a client of the wrong coordinator)."""

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 5)


task, float64, bare, float_target, wide = Blobs(), Float64(), Bare(), FloatTarget(), Wide()
