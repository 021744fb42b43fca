"""A no-train Task of P float32 parameters: what `fedclient run` holds in bench.large_model.

The clients' side of bench/synthetic.py: the same tensor names and shapes (so its manifest
fingerprint matches the torch-free coordinator task's at Join), built as a torch module that
`fedclient` loads every global model into. Local "training" adds a fixed 1e-4 to every
parameter in place, with no optimizer, no data and no gradients, so the client's memory is the
client's own: the model it holds, the model it downloaded and the update it sends.

    fedclient run --task bench.large_task:params_100000000 ...
"""

from __future__ import annotations

import re

import torch
from torch.utils.data import Dataset, TensorDataset

from bench.synthetic import SyntheticTask
from fedclient.partition import Partition
from fedclient.task import LocalData, Task, TrainConfig, TrainResult
from fedcore.tensors import FlatModel

DELTA = 1e-4


class NoTrainTask(Task):
    """`num_params` float32 parameters named as bench.synthetic names them; train adds DELTA."""

    def __init__(self, num_params: int) -> None:
        self.synthetic = SyntheticTask(num_params)

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        for spec in self.synthetic.manifest().tensors:
            layer, attr = spec.name.split(".")
            holder = torch.nn.Module()
            # zeros: the pages are touched only when the first global model is loaded into them.
            holder.register_parameter(attr, torch.nn.Parameter(torch.zeros(spec.shape)))
            model.add_module(layer, holder)
        return model

    def initial_model(self, seed: int) -> FlatModel:
        return self.synthetic.initial_model(seed)  # the coordinator's round-0 model, bit for bit

    def load_partition(self, partition: Partition) -> LocalData:
        # One example nobody reads: fedclient wants a data set; train() never opens it.
        return LocalData(TensorDataset(torch.zeros(1, 1), torch.zeros(1)))

    def server_test_data(self) -> Dataset | None:
        return None

    def train(self, model: torch.nn.Module, data: Dataset, config: TrainConfig) -> TrainResult:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(DELTA)
        return TrainResult(num_examples=1, metrics={})


def __getattr__(name: str) -> NoTrainTask:
    """`params_<P>` for any P, as bench.synthetic names its sizes."""
    match = re.fullmatch(r"params_(\d+)", name)
    if match is None:
        raise AttributeError(name)
    return NoTrainTask(int(match.group(1)))
