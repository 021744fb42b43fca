"""A torch Task the size of bench.synthetic's models that does not train: every parameter
plus a constant (no optimizer, so optimizer state does not count in the client's memory).

    fedclient run --task tests.large_task:params_550000000 ...   # against
    fedserver run --task bench.synthetic:params_550000000 ...    # the same manifest, no torch

The coordinator builds the model with numpy (bench/synthetic.py), so its memory is its own;
this client builds the same tensors (names, shapes) uninitialised, loads the pulled model
into them and adds STEP to each. tests/test_large_model_round.py runs it through a round.
"""

from __future__ import annotations

import re

import torch
from torch.utils.data import TensorDataset

from bench.synthetic import SyntheticTask
from fedclient.partition import Partition
from fedclient.task import LocalData, Task, TrainConfig, TrainResult

STEP = 0.125  # what "training" adds to every parameter
EXAMPLES = 3  # the update's weight


class _Layer(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        # Uninitialised: no page is touched until the pulled model is loaded into it.
        self.weight = torch.nn.Parameter(torch.empty(size), requires_grad=False)


class _Model(torch.nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        for i, size in enumerate(sizes):
            self.add_module(f"layer{i}", _Layer(size))


class LargeTask(Task):
    def __init__(self, num_params: int) -> None:
        self.synthetic = SyntheticTask(num_params)

    def build_model(self) -> torch.nn.Module:
        manifest = self.synthetic.manifest()
        return _Model([t.numel for t in manifest.tensors])

    def load_partition(self, partition: Partition) -> LocalData:
        return LocalData(TensorDataset(torch.zeros(EXAMPLES, 1)))

    def train(self, model: torch.nn.Module, data: object, config: TrainConfig) -> TrainResult:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(STEP)
        return TrainResult(EXAMPLES, {})


def __getattr__(name: str) -> LargeTask:
    """`params_<P>`, as bench.synthetic names its models."""
    match = re.fullmatch(r"params_(\d+)", name)
    if match is None:
        raise AttributeError(name)
    return LargeTask(int(match.group(1)))
