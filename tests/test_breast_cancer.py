"""The breast-cancer example: disjoint splits, leak-free standardization, a model that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.breast_cancer import BreastCancerTask, _splits
from fedclient.partition import Partition
from fedclient.task import TrainConfig

pytestmark = pytest.mark.timeout(60)


def test_splits_are_disjoint_and_standardized_on_the_training_pool_only() -> None:
    splits = _splits()
    sizes = {k: len(v[1]) for k, v in splits.items()}
    assert sizes == {"train": 409, "local_test": 46, "server_test": 114}
    rows = [tuple(r) for _, (x, _) in splits.items() for r in x]
    assert len(set(rows)) == len(rows)  # no example in two splits
    x_train = splits["train"][0]
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-4)
    # The held-out split was not used: its statistics are not exactly standard.
    assert np.abs(splits["server_test"][0].mean(axis=0)).max() > 0.01


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_every_partitioner_gives_each_client_train_and_test_data(scheme: str) -> None:
    task = BreastCancerTask()
    parts = [task.load_partition(Partition(i, 5, scheme, 0.3)) for i in range(5)]
    assert sum(len(p.train) for p in parts) == 409  # type: ignore[arg-type]
    assert sum(len(p.test) for p in parts if p.test is not None) == 46  # type: ignore[arg-type]


def test_one_client_learns_the_task() -> None:
    task = BreastCancerTask()
    torch.manual_seed(0)
    model = task.build_model()
    data = task.load_partition(Partition(0, 1))
    task.train(model, data.train, TrainConfig(local_epochs=10, lr=0.05, batch_size=16))
    assert task.evaluate(model, task.server_test_data())["accuracy"] >= 0.93  # 108 of 114
