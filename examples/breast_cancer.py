"""A Task on scikit-learn's bundled Wisconsin breast-cancer set (569 tumours, 30 features, binary).

Run it like digits: `fedserver run --task examples.breast_cancer:task`, clients with
`fedclient run --task examples.breast_cancer:task --partition I/N [--partitioner dirichlet]`.

Three fixed, stratified splits (seed 0), the same in every process:
  * 20% server test set: the coordinator's held-out evaluation;
  * of the remaining 80%, 10% form the local-test pool and 90% the training pool; both pools are
    cut among clients by the same partitioner, so a client's test slice has the same kind of
    skew as its training slice (federated evaluation sees the clients' own distributions).
Features are standardized with the mean and std of the training pool only, so neither test
split leaks into the statistics (in a real deployment they would come from a federated pass
over the training data, or from a public reference set).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from fedclient.partition import Partition, partition_indices
from fedclient.task import LocalData, Task, TrainConfig

__all__ = ["BreastCancerTask", "task"]

NUM_FEATURES = 30
SERVER_TEST_FRACTION = 0.2
LOCAL_TEST_FRACTION = 0.1
SPLIT_SEED = 0


@functools.cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"local_test"|"server_test": (x standardized float32, y int64)}, read-only."""
    data = load_breast_cancer()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    x_pool, x_server, y_pool, y_server = train_test_split(
        x, y, test_size=SERVER_TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    x_train, x_local, y_train, y_local = train_test_split(
        x_pool, y_pool, test_size=LOCAL_TEST_FRACTION, stratify=y_pool, random_state=SPLIT_SEED
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0
    out = {}
    for name, (xs, ys) in {
        "train": (x_train, y_train),
        "local_test": (x_local, y_local),
        "server_test": (x_server, y_server),
    }.items():
        xs = ((xs - mean) / std).astype(np.float32)
        xs.flags.writeable = False
        ys.flags.writeable = False
        out[name] = (xs, ys)
    return out


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(x), torch.tensor(y))


class BreastCancerTask(Task):
    """A small MLP 30 -> hidden -> 2 (hidden = 0: logistic regression)."""

    def __init__(self, hidden: int = 16) -> None:
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        self.hidden = hidden

    def default_config(self) -> TrainConfig:
        return TrainConfig(local_epochs=5, lr=0.05, batch_size=16)

    def build_model(self) -> torch.nn.Module:
        if self.hidden == 0:
            return torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 2))
        return torch.nn.Sequential(
            torch.nn.Linear(NUM_FEATURES, self.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, 2),
        )

    def load_partition(self, partition: Partition) -> LocalData:
        splits = _splits()
        x_train, y_train = splits["train"]
        x_test, y_test = splits["local_test"]
        train_idx = partition_indices(y_train, partition)
        test_idx = partition_indices(y_test, partition)
        test = _dataset(x_test[test_idx], y_test[test_idx]) if len(test_idx) else None
        return LocalData(train=_dataset(x_train[train_idx], y_train[train_idx]), test=test)

    def server_test_data(self) -> TensorDataset:
        return _dataset(*_splits()["server_test"])


task = BreastCancerTask()
